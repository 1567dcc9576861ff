import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with this machine's 2 CPUs, shared by the integration tests."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
