"""The one error type users see: a single sentence, no traceback."""


class UserError(Exception):
    """Bad input or environment, described in one sentence for the person running the tool."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; raised from the signal handler so that every cleanup runs.

    A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it; not a
    KeyboardInterrupt, so the command-line framework does not turn it into a bare exit first.
    `note` says, in one sentence, what was kept and how to continue.
    """

    def __init__(self, signum: int, note: str = ""):
        super().__init__(signum)
        self.signum = signum
        self.note = note
