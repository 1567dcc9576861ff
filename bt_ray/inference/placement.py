"""Ray connection, resource checks, placement groups and actor options: the one home of `.options(...)`.

placement.mode decides where replicas and training go (DESIGN.md section 2):
  cpu        replicas and training workers on CPUs
  split      each replica on its own GPU(s), training workers on other GPUs
  timeshare  each GPU holds one replica and one training worker; replicas sleep during Θ
Replicas are reserved as one placement group that must be placed within placement.timeout_s,
or the run fails naming what was asked and what the cluster has. Environment variables for
bt-ray's actors are set here (runtime_env) and nowhere else.
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
    # vLLM (GPU replicas): no usage reports (its sampler is chosen in vllm_compat.engine_env).
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
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


# placement.mode=timeshare: each GPU holds one replica and, during Θ, one training worker. Ray
# counts GPUs logically, so the two split each GPU: no two replicas fit on one GPU (0.6 + 0.6 > 1),
# and a trainer (0.4) fits only beside one replica. The replica sleeps while the trainer runs.
TIMESHARE_REPLICA_GPU = 0.6
TIMESHARE_TRAIN_GPU = 0.4


def check_resources(config: RunConfig, totals: dict[str, float]) -> None:
    """Refuse a config that cannot fit the cluster, naming the keys to change.

    cpu and split: replicas stay up during training, so both need their own resources.
    timeshare: training runs on the replicas' GPUs, one worker per replica at most.
    """
    inf, tr, mode = config.inference, config.train, config.placement.mode
    need = resource_need(config)
    need_cpu, need_gpu = need["CPU"], need["GPU"]
    problems = []
    if need_cpu > totals["CPU"]:
        problems.append(
            f"inference.replicas x inference.cpus_per_replica + train.num_workers x train.cpus_per_worker = "
            f"{inf.replicas} x {inf.cpus_per_replica:g} + {tr.num_workers} x {tr.cpus_per_worker:g} = {need_cpu:g} "
            f"CPUs, but the Ray cluster has {totals['CPU']:g}; lower those keys (fractions like 0.5 are allowed) "
            f"or add nodes")
    if mode == "timeshare" and tr.num_workers > inf.replicas:
        problems.append(f"train.num_workers: placement.mode=timeshare trains on the replicas' GPUs, so at most "
                        f"inference.replicas={inf.replicas} workers; lower train.num_workers or use split")
    if need_gpu > totals["GPU"]:
        problems.append(
            f"placement.mode={mode} needs {need_gpu:g} GPUs (inference.replicas={inf.replicas} x "
            f"inference.gpus_per_replica={inf.gpus_per_replica:g}"
            f"{'' if mode == 'timeshare' else f' + train.num_workers={tr.num_workers if tr.use_gpu else 0}'}), "
            f"but the Ray cluster has {totals['GPU']:g}; lower those keys, use placement.mode=timeshare to share "
            f"GPUs, or placement.mode=cpu with inference.gpus_per_replica=0 and train.use_gpu=false on a CPU machine")
    if problems:
        raise ConfigError(problems)


def reserved(config: RunConfig) -> dict[str, dict[str, float]]:
    """The Ray CPUs and GPUs of a run's pool (held for the whole run) and of its trainer (while Θ trains);
    placement timeshare: one whole GPU per replica, and training runs on those GPUs."""
    inf, tr = config.inference, config.train
    timeshare = config.placement.mode == "timeshare"
    replica_gpus = 1.0 if timeshare else inf.gpus_per_replica
    worker_gpus = 1.0 if tr.use_gpu and not timeshare else 0.0
    return {"pool": {"CPU": inf.replicas * inf.cpus_per_replica, "GPU": inf.replicas * replica_gpus},
            "train": {"CPU": tr.num_workers * tr.cpus_per_worker, "GPU": tr.num_workers * worker_gpus}}


def resource_need(config: RunConfig) -> dict[str, float]:
    """The Ray CPUs and GPUs one run holds at its peak (a sweep packs runs by this)."""
    parts = reserved(config)
    return {kind: float(parts["pool"][kind] + parts["train"][kind]) for kind in ("CPU", "GPU")}


def replica_bundles(config: RunConfig) -> list[dict[str, float]]:
    """One placement-group bundle per replica: its CPUs and its GPU(s) (a GPU share in timeshare)."""
    inf = config.inference
    gpus = TIMESHARE_REPLICA_GPU if config.placement.mode == "timeshare" else inf.gpus_per_replica
    bundle = {k: float(v) for k, v in {"CPU": inf.cpus_per_replica, "GPU": gpus}.items() if v > 0}
    if not bundle:
        raise ConfigError("inference.cpus_per_replica: a replica must reserve some resource; set it > 0 "
                          "(e.g. 0.5)")
    return [dict(bundle) for _ in range(inf.replicas)]


def train_gpus_per_worker(config: RunConfig) -> float:
    """GPUs each Ray Train worker asks for: a whole one, the timeshare share, or none on CPUs."""
    if not config.train.use_gpu:
        return 0.0
    return TIMESHARE_TRAIN_GPU if config.placement.mode == "timeshare" else 1.0


REPLICA_FIX = "Lower inference.replicas or the per-replica resources, free the cluster, or add nodes."


def reserve(bundles: list[dict[str, float]], name: str, timeout_s: float, what: str, fix: str = REPLICA_FIX) -> Any:
    """A placement group for `bundles`, or ResourceError (naming `what` and ending with `fix`) if the
    cluster cannot place it in `timeout_s`. Ray would otherwise wait forever for a group that never fits.
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(bundles, strategy="PACK", name=name)
    if group.wait(timeout_seconds=timeout_s):
        return group
    remove_placement_group(group)
    raise ResourceError(f"could not place {what} within placement.timeout_s={timeout_s:g}s: {shortage(bundles)} {fix}")


def shortage(bundles: list[dict[str, float]]) -> str:
    """What was asked for and what the Ray cluster has, in total and free."""
    import ray

    asked: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            asked[key] = asked.get(key, 0.0) + value
    return (f"asked for {len(bundles)} x {{{_fmt(bundles[0])}}} = {_fmt(asked)}; the Ray cluster has "
            f"{_fmt(_plain(ray.cluster_resources()))} in total and "
            f"{_fmt({k: _plain(ray.available_resources()).get(k, 0.0) for k in asked})} free.")


def release(group: Any) -> None:
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(group)


def replica_options(config: RunConfig, run_name: str, index: int, group: Any = None,
                    bundle: int | None = None) -> dict[str, Any]:
    """Actor options of replica slot `index`, placed in `bundle` (default: `index`) of `group`."""
    inf = config.inference
    options = {
        "name": f"{run_name}/replica-{index}",
        "num_cpus": inf.cpus_per_replica,
        "num_gpus": TIMESHARE_REPLICA_GPU if config.placement.mode == "timeshare" else inf.gpus_per_replica,
        "max_restarts": 0,
        "runtime_env": {"env_vars": dict(ACTOR_ENV)},
    }
    if group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=index if bundle is None else bundle)
    return options


def wait_ready(refs: list, what: str, timeout_s: float) -> list:
    """ray.get with a timeout: actors already placed that do not finish starting fail instead of hanging."""
    import ray

    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        raise ResourceError(
            f"{len(pending)} of {len(refs)} {what} were placed but did not finish starting within {timeout_s:.0f}s "
            f"(model loading or engine start-up hung or is very slow); see their logs under "
            f"/tmp/ray/session_latest/logs/")
    return ray.get(ready)


def alive_nodes() -> list[dict]:
    """Ray's alive nodes: {"NodeID", "NodeManagerAddress", ...} each."""
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def marker_visible(marker: str, token: str, node_ids: list[str], timeout_s: float = 120.0) -> dict[str, bool]:
    """Per node: does a task pinned there read `token` in the file `marker`? (storage.check_shared)"""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return None

    task = ray.remote(read)
    refs = {node: task.options(num_cpus=0, name=f"bt-ray/check-output-dir@{node[:8]}", max_retries=0,
                               scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(marker)
            for node in node_ids}
    ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    if pending:
        late = [node[:12] for node, ref in refs.items() if ref in pending]
        raise ResourceError(f"checking that output_dir is shared: node(s) {', '.join(late)} did not answer within "
                            f"{timeout_s:.0f}s; see their logs under /tmp/ray/session_latest/logs/")
    return {node: ray.get(ref) == token for node, ref in refs.items()}


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())


def _plain(resources: dict[str, float]) -> dict[str, float]:
    """Ray's resources without its bookkeeping entries (node:<ip>, memory, placement-group shares)."""
    return {k: float(v) for k, v in sorted(resources.items())
            if not k.startswith("node:") and "_group_" not in k and k not in ("memory", "object_store_memory")}
