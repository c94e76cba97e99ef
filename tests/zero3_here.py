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
    from distar.cluster import engines
    from distar.run.in_process import InProcess

    for name, value in RANK_ENV.items():
        monkeypatch.setenv(name, value)

    class DeepSpeedHere(InProcess):
        def updates(self, generator, fake, timing):
            self.engines = engines.Engines(generator, fake, self.cfg, timing, self.rank)
            self.ema = self.engines.ema
            return self.engines.updates()

        def _write(self, folder):  # as distar.cluster.train_worker.RayTrain keeps checkpoints and the guard's generator
            self.engines.write(str(folder))

        def _read(self, folder):
            self.engines.read(str(folder))

        all_ranks_agree = staticmethod(engines.all_ranks_agree)
        gathered = staticmethod(engines.gathered)

    return DeepSpeedHere
