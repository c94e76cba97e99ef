"""What every job's command line shares: bad arguments end in one line and exit status 2, like
every other bad input."""

from __future__ import annotations

import argparse
import sys

from distar.errors import RunFailed


class Parser(argparse.ArgumentParser):
    def __init__(self, prog: str, doc: str):
        super().__init__(prog=prog, description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


PREFIXES = ("config error:", "space error:", "error:")  # messages that already say what kind of error they are


def exit_status(error: BaseException, interrupted: str, prefix: str = "config error:") -> int:
    """Print a job's last line for `error` and return its exit status: 130 after Ctrl-C (with
    `interrupted` unless the error says more), 1 for a run that started and failed, 2 for bad input."""
    if isinstance(error, KeyboardInterrupt):
        print(f"interrupted: {str(error) or interrupted}", file=sys.stderr)
        return 130
    if isinstance(error, RunFailed):
        print(f"error: {error}", file=sys.stderr)
        return 1
    text = str(error)
    print(text if text.startswith(PREFIXES) else f"{prefix} {text}", file=sys.stderr)
    return 2
