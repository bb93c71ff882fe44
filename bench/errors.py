"""Errors that mean "the user asked for something wrong": the CLI prints one line and exits 2."""


class UsageError(Exception):
    """Bad input from the user (config, CLI argument, file). Shown as one line, exit status 2."""


class ConfigError(UsageError):
    """A configuration field holds a value that is not allowed."""


def check_output_dir(path, what: str) -> None:
    """`path` is a folder about to be created or written into: every part of it that exists must be a writable
    folder (a regular file in the way would end in NotADirectoryError half-way through the work)."""
    import os
    from pathlib import Path

    path = Path(path).expanduser().absolute()
    for folder in [path, *path.parents]:
        if folder.exists():
            if not folder.is_dir():
                raise UsageError(f"{what}: {folder} is a file, not a folder; give a folder path (it is created "
                                 f"if missing)")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UsageError(f"{what}: {folder} is not writable; give a folder you may write to")
            return
