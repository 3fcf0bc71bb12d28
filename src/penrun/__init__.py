"""penrun: the von Mises-Fisher model of penultimate activations, as an experiment runner."""

from penrun.errors import ConfigError

__all__ = ["ConfigError"]
__version__ = "0.1.0"
