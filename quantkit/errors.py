"""The one exception type for mistakes a user can act on.

Library code raises ``QuantkitError`` with a message that says what is wrong and how to fix it
(one line, naming the file, field or option). The CLI prints that line and exits with status 2;
any other exception is a bug and shows a traceback only with ``--debug``.
"""


class QuantkitError(Exception):
    """Bad input: a missing folder, an unknown architecture, a recipe field out of range, ..."""
