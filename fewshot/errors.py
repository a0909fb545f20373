"""The errors a user can fix. Every command ends them in one line that says what is wrong and what to do
(cli.guarded); anything else is a bug of ours, reported with a log of its traceback."""


class UserError(ValueError):
    """A problem the user can fix; the message says what is wrong and what to do.

    A ValueError, like the checks hegraphadapter.py makes of its inputs, so that one `except ValueError`
    catches both.
    """


class DataError(UserError):
    """A problem with the data, a file or the settings."""


class Diverged(UserError):
    """Training diverged: the loss became NaN or infinite; the message names the setting to lower."""
