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


def last_line(text: str | None) -> str | None:
    """The last non-empty line of a (traceback) text, at most 500 characters: where Python and Ray put the
    exception's own message."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:500] if lines else None


def describe(err: BaseException) -> str:
    """`Type: first line of the message` of an exception, for a record or a one-line report."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
