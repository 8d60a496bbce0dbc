"""The config layer: every setting's schema (one dataclass per section, a docstring per field)
and the loader that composes conf/ presets and command-line overrides over them.

It imports nothing of mmdit but utils/, so every layer above may read its settings from here.
"""


class ConfigError(ValueError):
    """A config that cannot be composed or fails validation; the message says why."""
