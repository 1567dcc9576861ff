"""Ray connection, resource checks and actor options: the one home of `.options(...)`.

Environment variables for bt-ray's actors are set here (runtime_env) and
nowhere else.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from bt_ray.config import RunConfig
from bt_ray.errors import ConfigError, ResourceError

logger = logging.getLogger(__name__)

# Offline and quiet: no model hub, no LiteLLM cost-map download, no usage stats.
ACTOR_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def connect(address: str | None = None) -> bool:
    """Join the given cluster, RAY_ADDRESS (set inside `ray job submit`), or start a local one.

    Returns True when this call started a local cluster (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    for key, value in ACTOR_ENV.items():
        os.environ.setdefault(key, value)
    if address:
        ray.init(address=address, log_to_driver=True)
        logger.info("joined the Ray cluster at %s", address)
        return False
    # The dashboard serves Ray's state API (Ray Train's placement-group cleaner polls it, and warns
    # every few seconds without it); loopback only.
    context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    logger.info("started a local Ray cluster (%g CPUs, %g GPUs); dashboard http://%s", *cluster_totals().values(),
                context.dashboard_url)
    return True


def cluster_totals() -> dict[str, float]:
    import ray

    resources = ray.cluster_resources()
    return {"CPU": float(resources.get("CPU", 0)), "GPU": float(resources.get("GPU", 0))}


def check_resources(config: RunConfig, totals: dict[str, float]) -> None:
    """Refuse a config that cannot fit the cluster, naming the keys to change. Replicas stay up during training."""
    inf, tr = config.inference, config.train
    need_cpu = inf.replicas * inf.cpus_per_replica + tr.num_workers * tr.cpus_per_worker
    need_gpu = inf.replicas * inf.gpus_per_replica + (tr.num_workers if tr.use_gpu else 0)
    problems = []
    if need_cpu > totals["CPU"]:
        problems.append(
            f"inference.replicas x inference.cpus_per_replica + train.num_workers x train.cpus_per_worker = "
            f"{inf.replicas} x {inf.cpus_per_replica:g} + {tr.num_workers} x {tr.cpus_per_worker:g} = {need_cpu:g} "
            f"CPUs, but the Ray cluster has {totals['CPU']:g}; lower those keys (fractions like 0.5 are allowed) "
            f"or add nodes")
    if need_gpu > totals["GPU"]:
        problems.append(
            f"inference.gpus_per_replica x replicas + train GPUs = {need_gpu:g} GPUs, but the Ray cluster has "
            f"{totals['GPU']:g}; set inference.gpus_per_replica=0 and train.use_gpu=false on a CPU machine")
    if problems:
        raise ConfigError(problems)


def replica_options(config: RunConfig, run_name: str, index: int) -> dict[str, Any]:
    inf = config.inference
    return {
        "name": f"{run_name}/replica-{index}",
        "num_cpus": inf.cpus_per_replica,
        "num_gpus": inf.gpus_per_replica,
        "max_restarts": 0,
        "runtime_env": {"env_vars": dict(ACTOR_ENV)},
    }


def wait_ready(refs: list, what: str, timeout_s: float, asked: dict[str, float]) -> list:
    """ray.get with a timeout that explains a pending placement instead of hanging."""
    import ray

    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        available = ray.available_resources()
        raise ResourceError(
            f"{len(pending)} of {len(refs)} {what} did not start within {timeout_s:.0f}s. Asked for "
            f"{_fmt(asked)} each; the cluster has {_fmt(cluster_totals())} in total and "
            f"{_fmt({k: available.get(k, 0) for k in asked})} free. Free resources or lower the request.")
    return ray.get(ready)


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())
