"""The one exception type that clrun reports to users as a single line."""


class ClrunError(Exception):
    """A user-facing problem (bad input, missing file); printed as one line, exit code 2."""
