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
    from distar.run import guard
    from distar.run.in_process import InProcess

    for name, value in RANK_ENV.items():
        monkeypatch.setenv(name, value)

    class DeepSpeedHere(InProcess):
        def updates(self, generator, fake, timing):
            self.engines = {"generator": engines.engine_for(generator, self.cfg, self.cfg.optim.generator),
                            "fake_score": engines.engine_for(fake, self.cfg, self.cfg.optim.fake_score)}
            for engine in self.engines.values():
                engines.time_zero(engine, timing)
            return tuple(engines.EngineUpdate(e) for e in self.engines.values())

        def snapshot(self):  # as distar.cluster.train_worker.RayTrain keeps the guard's generator
            engines.save_all(self.engines, str(guard.folder(self.cfg)))

        def rewind(self):
            engines.load_all(self.engines, str(guard.folder(self.cfg)))

        all_ranks_agree = staticmethod(engines.all_ranks_agree)
        gathered = staticmethod(engines.gathered)

    return DeepSpeedHere
