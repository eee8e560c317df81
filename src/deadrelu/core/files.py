"""Writing result files without ever leaving a half-written one behind.

>>> import tempfile, pathlib
>>> target = pathlib.Path(tempfile.mkdtemp()) / "report.json"
>>> atomic_write_text(target, "{}\\n").read_text()
'{}\\n'
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

from ..errors import DeadReluError

__all__ = ["atomic_write_text", "is_stream_path"]


def is_stream_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a stream rather than a file to replace: ``/dev/stdout`` and the
    like (``/dev/…``, ``/proc/…``: a redirect or pipe behind them) or an existing FIFO, socket or
    device. Such a path is written to as it is; renaming a file onto it would replace the node."""
    text = os.fspath(path)
    if text.startswith(("/dev/", "/proc/")):
        return True
    try:
        mode = os.stat(text).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically: the file is either the old one or the complete new one.

    The text goes to a temporary file in the target's own directory (so the final rename never
    crosses file systems), which is removed if anything fails. A symlink is written through: its
    target is replaced, the link stays.

    Returns:
        The path written.

    Raises:
        DeadReluError: the path is a directory, or the directory is missing or not writable, or
            the disk is full. The existing file, if any, is left as it was.
    """
    target = Path(path)
    if is_stream_path(target):
        return _write_stream(target, text)
    final = Path(os.path.realpath(target)) if target.is_symlink() else target
    if final.is_dir():
        raise DeadReluError(f"cannot write {target}: it is a directory")
    directory = final.parent if str(final.parent) else Path(".")
    if not directory.is_dir():
        raise DeadReluError(f"cannot write {target}: directory {directory} does not exist")
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # keep the permissions a user gave the file
            os.chmod(tmp_name, final.stat().st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, final)
        tmp_name = None
    except OSError as err:
        raise DeadReluError(f"cannot write {target}: {err.strerror or err}") from err
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    return target


def _write_stream(target: Path, text: str) -> Path:
    """``text`` written straight to a stream path, appended: ``/dev/stdout`` redirected to a file
    must not truncate what was printed before it (flushed first, so it comes in order)."""
    sys.stdout.flush()
    try:
        with open(target, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        raise DeadReluError(f"cannot write {target}: {err.strerror or err}") from err
    return target
