"""What every job's command line shares: bad arguments end in one line and exit status 2, like
every other bad input."""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    def __init__(self, prog: str, doc: str):
        super().__init__(prog=prog, description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
