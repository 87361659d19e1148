"""The one exception type a user sees as a single line (see cli.main), and its helpers."""

from pathlib import Path


class UserError(Exception):
    """Bad input or environment: the message says what is wrong, which file, what to do."""


class DataError(UserError):
    """A data set, shard or manifest that cannot be used as it is."""


def make_dir(path: Path, what: str = "") -> Path:
    """mkdir -p, or one UserError saying which directory cannot be written (before any work)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot write {what or path}: {e.strerror} ({e.filename}); choose a writable directory"
        ) from None
    return path
