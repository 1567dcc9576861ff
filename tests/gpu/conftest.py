"""GPU fixtures (marker `gpu`; tests/conftest.py skips these tests without CUDA, so nothing here runs on CPU CI)."""

import asyncio
import sys

import pytest


def pytest_runtest_logreport(report):
    """Print a failure as it happens: a later hang, or the node's time running out, must not lose it
    (pytest prints its failure reports only at the end of the session)."""
    if report.failed:
        stderr = report.capstderr[-6000:]  # Ray's worker logs (NCCL, DeepSpeed) land here, not in the traceback
        print(f"\n--- FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n"
              f"--- its captured stderr, last 6000 chars\n{stderr}\n---", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def ray_gpu():
    """A local Ray cluster with this node's GPUs (training workers run there)."""
    import ray

    from bt_ray.inference.placement import connect

    owner = connect(None)
    yield ray
    if owner:
        ray.shutdown()


@pytest.fixture(scope="module")
def loop():
    """One event loop per module: vLLM's AsyncLLM keeps its output task on the loop it first ran on."""
    loop = asyncio.new_event_loop()
    yield loop
    # as asyncio.run ends: AsyncLLM.shutdown() only schedules its output task's cancel (the loop is not
    # running then), so run the loop until every task has ended; closing it first logs "Event loop is closed"
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
