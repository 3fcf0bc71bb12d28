"""Errors in the words of the config: a library message names its argument (`image_size=3 ...`),
the command line names the key a user sets (`data.image_size=3 ...`)."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

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


def composition_error(err: Exception) -> str:
    """One line from Hydra's and OmegaConf's errors: the key, the value and what is valid."""
    cause = err if getattr(err, "full_key", None) else err.__cause__
    if getattr(cause, "full_key", None) and getattr(cause, "msg", None):
        reason = cause.msg.splitlines()[0]
        if cause.value is not None:
            return f"{cause.full_key}={cause.value!r} is invalid: {reason}"
        return f"{cause.full_key}: {reason}"
    text = " ".join(str(err).split())
    node = re.search(r"full_key: (\S+) .*object_type=NoneType", text)
    if node:  # a node of another task (null here) given a value
        return f"{node.group(1)} cannot be set here: the chosen task does not use it"
    # Hydra's "Could not find 'net/nope'" lists the options, then its search path: keep the options.
    return text.split(" Config search path")[0]


def fail(message: str, status: int = 2) -> NoReturn:
    """Stop the command with a one-line error (status 2: bad input)."""
    print(f"penrun: error: {message}", file=sys.stderr)
    sys.exit(status)
