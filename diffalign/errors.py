"""Errors a user can fix. The CLI prints them as one line (``error: ...``) and exits with 2."""


class ConfigError(ValueError):
    """A bad config value, name, path or data row; the message names the key and the valid choices."""
