"""Errors in the words of the config: a library message names its argument (`image_size=3 ...`),
the command line names the key a user sets (`data.image_size=3 ...`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from penrun.errors import InputError


class ConfigError(InputError):
    """A bad config value: the message names the key, the value and what would be valid."""


@contextmanager
def config_keys(**keys: str) -> Iterator[None]:
    """Re-raise a library ValueError as a ConfigError whose message names config keys: each
    `argument=` in the message becomes `key=` for argument=key in `keys`."""
    try:
        yield
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        message = str(err)
        for argument, key in keys.items():
            message = re.sub(rf"(?<![\w.]){re.escape(argument)}=", f"{key}=", message)
        raise ConfigError(message) from err
