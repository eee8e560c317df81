"""Where the last complete record of a JSONL or CSV log ends, and cutting off a torn one.

A file sink appends to a log that an earlier run may have left with a torn last record (a write
stopped half-way: a full disk, a kill); appending after it would glue the next record onto the
fragment. These functions find the bytes after the last complete record (for CSV following the
quotes, as a quoted value may hold a newline), and :func:`repair_torn_tail` cuts them off. The
file sinks of :mod:`deadrelu.monitor.sinks` decide, per format, whether such a tail is torn or a
whole record that lacks only its newline. ``repair_torn_tail`` is importable from
:mod:`deadrelu.monitor.sinks` too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["repair_torn_tail", "unterminated_tail", "last_record_end"]


_QUOTE = re.compile(rb'"')


def last_record_end(path: Path, quoted: bool) -> int:
    """Byte offset just after the last complete record: after the last newline (outside quotes for CSV)."""
    if not quoted:  # JSON Lines: json.dumps escapes newlines, so every newline ends a record
        with open(path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            while end > 0:
                start = max(0, end - (1 << 16))
                fh.seek(start)
                cut = fh.read(end - start).rfind(b"\n")
                if cut >= 0:
                    return start + cut + 1
                end = start
        return 0
    # CSV: a quoted field may hold a newline, so the quote state must be followed from the start.
    # Only the quotes are visited one by one (rare: a site name needs them); the newlines between
    # two quotes are found by rfind, so a log without quotes is read at the speed of a byte scan.
    inside, last, offset = False, 0, 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            begin = 0  # start of the stretch of this chunk not yet looked at
            for m in _QUOTE.finditer(chunk):
                if not inside:
                    cut = chunk.rfind(b"\n", begin, m.start())
                    if cut >= 0:
                        last = offset + cut + 1
                inside = not inside  # an escaped quote ("") toggles twice
                begin = m.end()
            if not inside:
                cut = chunk.rfind(b"\n", begin)
                if cut >= 0:
                    last = offset + cut + 1
            offset += len(chunk)
    return last


def _quote_left_open(path: Path) -> bool:
    """Whether the file ends inside a quoted CSV value: an odd number of quote characters (a
    doubled quote inside a value counts twice, so only an open value leaves the count odd)."""
    count = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            count += chunk.count(b'"')
    return count % 2 == 1


def unterminated_tail(path: Path, quoted: bool) -> tuple[int, int] | None:
    """``(start, size)`` of the bytes after the last complete record, or None when there are none
    (the file ends with a newline that ends a record, is empty, missing or not a regular file).

    For CSV (``quoted``) a final newline ends a record only outside quotes: a write cut just after
    a newline inside a quoted site name leaves the file ending with a newline but a value open."""
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size == 0:
        return None
    with open(path, "rb") as fh:
        fh.seek(size - 1)
        ends_line = fh.read(1) == b"\n"
    if ends_line and not (quoted and _quote_left_open(path)):  # the common case: the last write completed
        return None
    start = last_record_end(path, quoted)
    return None if start == size else (start, size)


def repair_torn_tail(path: str | os.PathLike[str], *, quoted: bool = False) -> int:
    """Cut a torn last record off a log file; return how many bytes were removed (0 if it was whole).

    Here a record is torn when the file does not end with a newline, or (CSV rules) ends inside a
    quoted value: a write stopped half-way (a full disk, a kill). Appending after it would glue the
    next record onto the fragment (an invalid JSON line, two CSV rows merged into one), so the
    fragment is removed first. Files
    that are empty, missing or not regular files (``/dev/full``, a pipe) are left alone.
    :class:`JSONLSink` and :class:`CSVSink` are stricter before they append: an unterminated last
    line that is a whole record of their format is kept (see their docs); only the rest is cut.

    Args:
        path: the JSONL or CSV file.
        quoted: CSV rules: a newline inside double quotes does not end a record, so a file that
            ends with a newline but leaves a quoted value open is torn too.

    Example:
        >>> import tempfile, pathlib
        >>> log = pathlib.Path(tempfile.mkdtemp()) / "h.jsonl"
        >>> _ = log.write_text('{"step": 1}\\n{"st')
        >>> repair_torn_tail(log), log.read_text()
        (4, '{"step": 1}\\n')
    """
    found = unterminated_tail(Path(path), quoted)
    if found is None:
        return 0
    start, size = found
    with open(path, "r+b") as fh:
        fh.truncate(start)
    return size - start
