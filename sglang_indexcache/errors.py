"""Errors that the command line turns into exit codes.

`UsageError` (and its subclasses) means the user gave something we cannot use: the CLI prints its
message as one line on stderr and exits 2. Anything else escaping a command is an internal error
(exit 1).
"""


class UsageError(ValueError):
    """Bad input from the user: a pattern, a file, a model directory, a data source, a flag."""


class PatternError(UsageError):
    """A pattern string that is not a valid F/S pattern (or not valid for a given model)."""


class PatternFileError(UsageError):
    """A pattern file that cannot be read, has an unknown format, or does not match the model."""


class ModelDirError(UsageError):
    """A model directory that is missing, has no config, or is not a DSA model."""


class DataError(UsageError):
    """A data source that is missing, empty, unreadable or lacks the requested text field."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what was kept and how to go on: the CLI prints the message as its one line."""
