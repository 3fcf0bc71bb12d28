"""Errors that penrun reports to the user as a message, without a traceback."""


class ConfigError(ValueError):
    """Bad input (a config value, a data file, a checkpoint): the message names the value
    and what would be valid. Raised before any long work starts."""
