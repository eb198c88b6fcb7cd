"""The one exception type whose message is shown to the user as a single line."""


class AuditError(Exception):
    """A user-facing error: bad input, missing file, mismatched SAE. Its message is one line."""
