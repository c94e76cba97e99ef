"""Errors a user causes and can fix (bad config, missing model, unreadable prompts, missing package).

Entry points catch `UserError`, print its message as one line and exit with status 2; any
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """str() is the whole message to print, starting with the config field or path at fault."""


class RunFailed(UserError):
    """The run started but cannot go on (too many non-finite updates, a pool that keeps failing).
    Entry points print `error: <message>` and exit with status 1."""
