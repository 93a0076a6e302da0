"""UserError: the one base class for mistakes in what a user gave (inputs, settings, paths, checkpoints).

The CLI prints a UserError as one line with exit status 2; anything else is a bug and raises with its
traceback. UserError is a ValueError, so code that catches ValueError keeps working.
"""


class UserError(ValueError):
    """Something the user gave is wrong or missing; the message says what and how to fix it."""
