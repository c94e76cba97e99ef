"""What every job's command line shares: one parser whose bad arguments end in one line and exit
status 2, the config arguments, and the ending of a job that a user error, Ctrl-C or SIGTERM stops.

SIGTERM (`ray job stop`, Kubernetes, a scheduler's kill) takes Ctrl-C's path: whoever handles
SIGINT at that moment (Ray Train aborting its run, Tune stopping its trials, or Python raising
KeyboardInterrupt) handles it, so pools shut down and MLflow runs end KILLED the same way; only
the exit status (143, not 130) and the last line say which signal it was.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

from distar.errors import UserError


class Parser(argparse.ArgumentParser):
    def __init__(self, prog: str, doc: str):
        super().__init__(prog=prog, description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def add_config(self, what: str = "run config YAML (see jobs/configs/); default: the embedded default run") -> None:
        """--config FILE and repeatable --set PATH=VALUE, as every job that reads a run config takes them."""
        self.add_argument("--config", metavar="FILE", help=what)
        self.add_argument("--set", metavar="PATH=VALUE", action="append", default=[], dest="overrides",
                          help="override one config field, e.g. --set objective.alpha=0.5 (repeatable; VALUE is YAML)")


_terminated = False  # set by the SIGTERM handler: the interruption under way came from SIGTERM


def _on_sigterm(signum, frame) -> None:
    global _terminated
    _terminated = True
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIGINT ignored or left to the OS: end as Ctrl-C would in Python
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def exit_status(error: BaseException, interrupted: str) -> int:
    """Print a job's last line for `error` and return its exit status: 130 after Ctrl-C, 143 after
    SIGTERM (with `interrupted` unless the error says more), else the user error's own status."""
    if isinstance(error, KeyboardInterrupt):
        word, status = ("terminated", 143) if _terminated else ("interrupted", 130)
        print(f"{word}: {str(error) or interrupted}", file=sys.stderr)
        return status
    assert isinstance(error, UserError), error
    print(error, file=sys.stderr)
    return error.status


def run(body: Callable[[], int | None], interrupted: str = "stopped") -> int:
    """A job's exit status: its body's (0 when it returns nothing), or the ending of the user
    error, Ctrl-C or SIGTERM that stopped it. Bugs keep their tracebacks."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return body() or 0
    except (KeyboardInterrupt, UserError) as e:
        return exit_status(e, interrupted)
