"""Errors a user can cause and fix: the CLI prints them as one line and exits non-zero."""


class ZeroCError(ValueError):
    """Bad input from the user (a file, a flag, a request). The message says what and where."""


class ConfigError(ZeroCError):
    """A model directory or config file that cannot be used; the message names file and field."""
