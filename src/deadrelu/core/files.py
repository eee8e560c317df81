"""Writing result files without ever leaving a half-written one behind.

Every file deadrelu replaces is first written to a temporary in its own folder and renamed into
place. The temporary for ``NAME`` is ``.NAME.PID.XXXXXXXX.tmp`` (:func:`make_temporary`): the
process id is what lets a later write tell what a process killed outright left behind (SIGKILL,
a power cut: no cleanup code ran) from what a process still running is writing, and
:func:`remove_stale_temporaries` removes only the former.

>>> import tempfile, pathlib
>>> target = pathlib.Path(tempfile.mkdtemp()) / "report.json"
>>> atomic_write_text(target, "{}\\n").read_text()
'{}\\n'
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import sys
import tempfile
import time
from pathlib import Path

from ..errors import DeadReluError

__all__ = [
    "atomic_write_text", "is_stream_path", "names_directory", "refuse_directory_name", "make_temporary", "backup_path",
    "remove_stale_temporaries",
]

#: A temporary (``.NAME.PID.XXXXXXXX.tmp``, :func:`make_temporary`) or backup link
#: (``.NAME.PID.bak``, :func:`backup_path`). The eight characters are ``tempfile.mkstemp``'s.
_TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.(?:[A-Za-z0-9_]{8}\.tmp|bak)")

#: How old (seconds since its last change) a dead process's temporary must be before it is removed.
#: The process id is only asked on this machine: a write from another host into a shared folder
#: (an NFS home's kernel cache, which every node of a cluster job compiles into at once) or from
#: another container's pid namespace has a process id no process here has. No write of deadrelu's
#: takes this long, so a temporary this old is no live write's, wherever it runs.
STALE_AFTER_S = 600.0


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


def _separators() -> str:
    """The characters that end a directory part of a path here: ``/`` and the platform's own."""
    return "".join(sorted({"/", os.sep, os.altsep or "/"}))


def names_directory(path: str | os.PathLike[str]) -> bool:
    """Whether the text of ``path`` names a directory whatever is on disk: it ends in a separator
    (``out/``), or its last part is ``.`` or ``..``. ``Path()`` drops a trailing ``/`` and ``/.``,
    so ``Path("out/")`` would name a file ``out``: ask this before a path becomes a ``Path``.

    Example:
        >>> names_directory("out/"), names_directory("out/."), names_directory("out/r.json")
        (True, True, False)
    """
    text = os.fsdecode(path)
    last = re.split(f"[{re.escape(_separators())}]", text)[-1]
    return bool(text) and last in ("", ".", "..")


def refuse_directory_name(path: str | os.PathLike[str], what: str = "") -> None:
    """Refuse, in one line, a file name that names a directory (``out/``, ``out/.``: see :func:`names_directory`).

    ``what`` is put before the path in the message: the option it came from (``"--json "``).

    Raises:
        DeadReluError: ``path`` names a directory: it is one, or it does not exist or is a file.

    Example:
        >>> refuse_directory_name("out/r.json")  # a file name: nothing raised
        >>> refuse_directory_name("no-such-dir/", "--json ")
        Traceback (most recent call last):
        deadrelu.errors.DeadReluError: cannot write --json no-such-dir/: a path ending in '/' names a directory, and no-such-dir does not exist; give a file name
    """
    if not names_directory(path):
        return
    text = os.fsdecode(path)
    if os.path.isdir(text):
        raise DeadReluError(f"cannot write {what}{text}: it is a directory")
    seps = _separators()
    last = re.split(f"[{re.escape(seps)}]", text)[-1]  # "", "." or ".."
    base = text[: len(text) - len(last)].rstrip(seps)  # out/, out/. and out/.. all need out to be a directory
    ending = text[len(base) :]
    state = "is not a directory" if os.path.lexists(base) else "does not exist"
    raise DeadReluError(
        f"cannot write {what}{text}: a path ending in {ending!r} names a directory, and {base} {state}; give a file name"
    )


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically: the file is either the old one or the complete new one.

    The text goes to a temporary file in the target's own directory (so the final rename never
    crosses file systems), ``.NAME.PID.XXXXXXXX.tmp``, which is removed if anything fails; the
    temporaries of the same target that a process killed outright left there are removed first
    (:func:`remove_stale_temporaries`). A symlink is written through: its target is replaced, the
    link stays. A stream path (``/dev/stdout``, a FIFO) is appended to instead.

    Returns:
        The path written.

    Raises:
        DeadReluError: the path is a directory or names one (``out/``), or the directory is
            missing or not writable, or the disk is full. The existing file, if any, is left as it was.
    """
    refuse_directory_name(path)  # before Path(), which drops the trailing "/" of "out/"
    target = Path(path)
    if is_stream_path(target):
        return _write_stream(target, text)
    final = Path(os.path.realpath(target)) if target.is_symlink() else target
    if final.is_dir():
        raise DeadReluError(f"cannot write {target}: it is a directory")
    directory = final.parent if str(final.parent) else Path(".")
    if not directory.is_dir():
        raise DeadReluError(f"cannot write {target}: directory {directory} does not exist")
    # Left by a write killed outright, these would stay for good: one listing of the folder per write.
    remove_stale_temporaries(directory, final.name)
    tmp_name = None
    try:
        fd, tmp_name = make_temporary(directory / final.name)
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


# A file name may be 255 bytes on the usual file systems; a temporary adds ".", ".PID.XXXXXXXX.tmp".
_NAME_MAX = 255
_ADDED = len(".") + len(".4194304.") + len("XXXXXXXX.tmp")


def _stem(name: str) -> str:
    """The part of a temporary's or backup's name that stands for the file ``name``: the name itself,
    or — where the name is so long that the temporary's would pass 255 bytes — its first bytes and
    a digest of the whole, so a long ``--json`` file name is still written."""
    if len(name.encode()) + _ADDED <= _NAME_MAX:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    head = name.encode()[: _NAME_MAX - _ADDED - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


def make_temporary(final: str | os.PathLike[str]) -> tuple[int, str]:
    """Create a new, empty temporary file for ``final`` in ``final``'s folder, named ``.NAME.PID.XXXXXXXX.tmp``.

    The caller writes it, renames it onto ``final`` and removes it if anything fails; what a
    process killed before that left behind, :func:`remove_stale_temporaries` removes later.

    Returns:
        The open file descriptor and the temporary's path, as ``tempfile.mkstemp`` gives them.

    Raises:
        OSError: the folder is missing or not writable.

    Example:
        >>> import tempfile
        >>> fd, tmp = make_temporary(Path(tempfile.mkdtemp()) / "report.json")
        >>> os.close(fd); Path(tmp).name.startswith(f".report.json.{os.getpid()}.") and tmp.endswith(".tmp")
        True
    """
    target = Path(final)
    return tempfile.mkstemp(prefix=f".{_stem(target.name)}.{os.getpid()}.", suffix=".tmp", dir=target.parent)


def backup_path(final: str | os.PathLike[str]) -> Path:
    """The name of a hard-link backup of ``final`` kept while a set of files is replaced: ``.NAME.PID.bak``.

    Example:
        >>> backup_path("out/results.json") == Path(f"out/.results.json.{os.getpid()}.bak")
        True
    """
    target = Path(final)
    return target.with_name(f".{_stem(target.name)}.{os.getpid()}.bak")


def _process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (POSIX; elsewhere always False: nothing is removed)."""
    if os.name != "posix" or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # EPERM: it runs, as another user; a number no pid can be
        return False
    return False


def remove_stale_temporaries(directory: str | os.PathLike[str], name: str) -> list[Path]:
    """Remove what a killed process left for the file ``name`` in ``directory``; returns the paths removed.

    Only files of this module's naming for this ``name`` whose process no longer runs on this
    machine and that have not changed for :data:`STALE_AFTER_S` seconds: a temporary
    ``.NAME.PID.XXXXXXXX.tmp``, and a backup link ``.NAME.PID.bak`` while it
    is still the same file as ``NAME`` (otherwise it is the only copy of an earlier version, and
    stays). This process's files, another live process's, other names and other files are never
    touched. On systems other than POSIX nothing is removed (whether a process runs is asked with
    ``os.kill(pid, 0)``). A folder that cannot be listed, or a file that cannot be removed, is
    left as it is: cleaning up never stops the write it comes before.

    Example:
        >>> import tempfile
        >>> remove_stale_temporaries(tempfile.mkdtemp(), "results.json")
        []
    """
    folder = Path(directory)
    removed, now = [], time.time()
    try:
        stem = _stem(name)
        entries = [p for p in folder.iterdir() if p.name.startswith(f".{stem}.")]
    except OSError:
        return []
    for path in entries:
        match = _TEMPORARY_NAME.fullmatch(path.name)
        if not match or match["name"] != stem or not _process_gone(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if now - path.lstat().st_mtime < STALE_AFTER_S:
                continue  # maybe a live write on another machine or in another container (see STALE_AFTER_S)
            if path.suffix == ".bak" and not (path.is_file() and os.path.samefile(path, folder / name)):
                continue
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(path)
    return removed
