"""The one error type users see: a single sentence, no traceback."""


class UserError(Exception):
    """Bad input or environment, described in one sentence for the person running the tool."""
