"""The error penrun reports to a user as one line, without a traceback."""


class InputError(ValueError):
    """Bad input from outside (a value, a data file, a checkpoint, a folder): the message names
    the value and what would be valid. Raised before any long work starts. The command line
    prints it as `penrun: error: ...` and exits with status 2."""
