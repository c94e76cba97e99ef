"""Errors a user causes and can fix (bad config, missing model, unreadable prompts, missing package).

Each kind of error knows how it is printed and which exit status it ends a job with, so no
caller reads a message to tell them apart. `str(error)` is the job's last output: every line of
the message after the error's kind, e.g. `config error: objective.alpha: ...`. Any other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the config field, argument or path at fault. Exit status 2."""

    kind = "error"
    status = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message  # without the kind: for messages that quote another error

    def __str__(self) -> str:
        return "\n".join(f"{self.kind}: {line}" for line in self.message.splitlines() or [""])


class RunFailed(UserError):
    """The run started but cannot go on (too many non-finite updates, a pool that keeps failing). Exit status 1."""

    status = 1
