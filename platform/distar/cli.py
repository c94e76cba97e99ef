"""What every job's command line shares: one parser whose bad arguments end in one line and exit
status 2, the config arguments, and the ending of a job that a user error or Ctrl-C stops."""

from __future__ import annotations

import argparse
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


def exit_status(error: BaseException, interrupted: str) -> int:
    """Print a job's last line for `error` and return its exit status: 130 after Ctrl-C (with
    `interrupted` unless the error says more), else the user error's own status."""
    if isinstance(error, KeyboardInterrupt):
        print(f"interrupted: {str(error) or interrupted}", file=sys.stderr)
        return 130
    assert isinstance(error, UserError), error
    print(error, file=sys.stderr)
    return error.status


def run(body: Callable[[], int | None], interrupted: str = "stopped") -> int:
    """A job's exit status: its body's (0 when it returns nothing), or the ending of the user
    error or Ctrl-C that stopped it. Bugs keep their tracebacks."""
    try:
        return body() or 0
    except (KeyboardInterrupt, UserError) as e:
        return exit_status(e, interrupted)
