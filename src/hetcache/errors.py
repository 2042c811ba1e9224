"""User-facing errors: one line that says what is wrong and what to do.

The CLI catches `UserError`, prints its message on one line and exits with code 2, so bad input never ends
in a traceback. Library code raises it for anything the caller can fix (a missing file, an unknown model,
sizes that cannot be fitted).
"""


class UserError(Exception):
    """An input problem the user can fix; the message says what to do."""
