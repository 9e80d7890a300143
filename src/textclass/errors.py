"""User-facing errors.

A `UserError` is a mistake the user can fix (bad file, column, label, config value). The CLI prints its
message as one line and exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


class UserError(Exception):
    """A problem in the user's input, with what to do about it.

    The message should name the file/line/column/key and the fix, in one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # always a single line
        self.message = " ".join(message.split())

    def __str__(self) -> str:
        return self.message


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command, with what it kept (`--resume` works, or nothing was written).

    Still a KeyboardInterrupt, so Python callers stop as they expect; the CLI prints the message as one
    line and exits 130.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
