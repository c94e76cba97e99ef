"""What `make setup` installs, checked where a run would trip on it."""

import subprocess
import sys

# One gloo rank brings DeepSpeed's communication up, as every trainer rank does at start.
INIT_ONE_RANK = """
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
print("initialised")
"""


def test_a_lock_left_by_a_killed_op_build_does_not_hang_the_next_run(tmp_path):
    """DeepSpeed on CPU loads a shared-memory op at start. Built just in time, torch guards the
    build with a lock file that a run killed mid-build leaves behind, and every later run on the
    machine then waits on it forever (seen: trainer ranks parked in FileBaton.wait, CI out of
    time). `make setup` compiles the op into the install, so a run never takes that lock."""
    from distar.cluster.session import free_port

    stale = tmp_path / "torch_extensions" / "deepspeed_shm_comm"
    stale.mkdir(parents=True)
    (stale / "lock").touch()  # exactly what a SIGKILLed build leaves
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"), "DS_ACCELERATOR": "cpu",
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PATH": "/usr/bin:/bin"}
    try:
        done = subprocess.run([sys.executable, "-c", INIT_ONE_RANK], env=env,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError("DeepSpeed waited on the stale build lock: its shm op is not installed "
                             "(run `make setup` again; the Makefile compiles it with DS_BUILD_SHM_COMM=1)") from None
    assert done.returncode == 0, done.stderr[-2000:]
    assert "initialised" in done.stdout
