"""The `deepspeed_here` fixture: the Ray runtime's DeepSpeed engines on one gloo rank in this
process, the CPU twin of a Ray Train worker without Ray (tests/conftest.py shares it)."""

import pytest

from distar.cluster.session import free_port


@pytest.fixture(scope="session")
def deepspeed_here():
    """The in-process runtime with the Ray runtime's DeepSpeed engines in place of AdamW, on one
    gloo rank in this process (the CPU twin of a Ray Train worker); returns its class."""
    import deepspeed
    import torch.distributed as dist

    from distar.cluster import engines
    from distar.run.in_process import InProcess

    class DeepSpeedHere(InProcess):
        def updates(self, generator, fake):
            self.engines = [engines.engine_for(generator, self.cfg, self.cfg.optim.generator),
                            engines.engine_for(fake, self.cfg, self.cfg.optim.fake_score)]
            return tuple(engines.EngineUpdate(e) for e in self.engines)

        @staticmethod
        def all_ranks_agree(ok: bool) -> bool:
            return engines.all_ranks_agree(ok)

    with pytest.MonkeyPatch.context() as env:
        for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                            "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}.items():
            env.setenv(name, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield DeepSpeedHere
        dist.destroy_process_group()
