"""The `deepspeed_here` fixture: the Ray runtime's DeepSpeed engines on one gloo rank in this
process, the CPU twin of a Ray Train worker without Ray (tests/conftest.py shares it)."""

import pytest

from distar.cluster.session import free_port

RANK_ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}  # what a launcher gives each rank


@pytest.fixture(scope="session")
def _gloo_rank():
    """One process group for the session: DeepSpeed cannot join a second one in a process."""
    import deepspeed
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as env:
        for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **RANK_ENV}.items():
            env.setenv(name, value)
        deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()


@pytest.fixture
def deepspeed_here(_gloo_rank, monkeypatch):
    """The in-process runtime with the Ray runtime's DeepSpeed engines in place of AdamW; returns
    its class. The rank's variables are set while the test runs only (ZeRO-3 reads them in forwards)."""
    from distar.cluster.local_engines import LocalEngines

    for name, value in RANK_ENV.items():
        monkeypatch.setenv(name, value)
    return LocalEngines
