"""Errors that mean "the user asked for something wrong": the CLI prints one line and exits 2."""


class UsageError(Exception):
    """Bad input from the user (config, CLI argument, file). Shown as one line, exit status 2."""


class ConfigError(UsageError):
    """A configuration field holds a value that is not allowed."""
