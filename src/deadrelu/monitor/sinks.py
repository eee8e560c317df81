"""Where :class:`deadrelu.Monitor` writes its evaluations: JSONL, CSV, TensorBoard, Weights & Biases.

A sink receives one :class:`deadrelu.monitor.LogRecord` per evaluation (step, loss,
per-site state fractions, the lifecycle events since the last record and the window
:class:`~deadrelu.Report`). File sinks open in append mode and flush every record,
so a crash, a full disk or a closed file never loses lines already written; the
monitor turns a failing sink into one :class:`SinkWarning` (or a :class:`SinkError`
with ``on_sink_error="raise"``) and the training run goes on.

The sink base class, its error and warning and a record's layouts are in
:mod:`deadrelu.monitor.sink_protocol`, finding and cutting a torn last record in
:mod:`deadrelu.monitor.log_tails`, the TensorBoard and W&B sinks in
:mod:`deadrelu.monitor.framework_sinks`. This module holds the file sinks (JSONL, CSV), the
callback sink and the conversion of the monitor's ``sinks=`` option, and every sink name is
importable from here.

Example:
    >>> import deadrelu, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "health.jsonl")
    >>> sink = deadrelu.monitor.sinks.JSONLSink(path)
    >>> sink.path.name
    'health.jsonl'
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import warnings
from pathlib import Path
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any, Callable

from ..core.files import refuse_directory_name
from ..errors import DeadReluError
from .framework_sinks import TensorBoardSink, WandbSink
from .log_tails import last_record_end, repair_torn_tail, unterminated_tail
from .sink_protocol import SCHEMA_VERSION, Sink, SinkError, SinkWarning, record_metrics, record_to_dict

if TYPE_CHECKING:
    from .records import LogRecord

__all__ = [
    "Sink",
    "JSONLSink",
    "CSVSink",
    "TensorBoardSink",
    "WandbSink",
    "CallbackSink",
    "SinkError",
    "SinkWarning",
    "as_sink",
    "as_sinks",
    "record_metrics",
    "repair_torn_tail",
    "SCHEMA_VERSION",
]

CSV_COLUMNS = (
    "step", "site", "units", "batches", "active", "asleep", "dead", "dormant", "nonfinite", "alive", "loss", "unobserved",
)  # fmt: skip

#: Longest line (bytes) the file sinks read to check an existing file: a JSONL first line, an
#: unterminated last line. A longer one is not read into memory; the file is refused untouched.
_CHECK_LIMIT = 1 << 24


def _is_json_object(data: bytes) -> bool:
    """Whether the bytes are one JSON object (surrounding whitespace allowed), as a JSON Lines record is."""
    try:
        return isinstance(json.loads(data.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


def _unloggable_kind(mode: int) -> str | None:
    """What a file of this ``st_mode`` is when a log cannot be appended to it (None: it can). A
    regular file and a character device (``/dev/null``, ``/dev/full``, a terminal) open at once; a
    named pipe blocks the opening until a reader comes (the run would hang at attach), a socket
    cannot be opened, and appending to a block device would write over a disk."""
    if stat.S_ISREG(mode) or stat.S_ISCHR(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (opening it waits for a reader)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


class _FileSink(Sink):
    """Append-mode text file (or an open text stream) written one flushed record at a time."""

    def __init__(self, target: str | os.PathLike[str] | IO[str]) -> None:
        self._owned = not hasattr(target, "write")
        self._fh: IO[str] | None = None
        self._created: tuple[Path, int, int] | None = None  # (path, device, inode) of a file open() created
        if self._owned:
            refuse_directory_name(target)  # type: ignore[arg-type]  # "logs/" names a folder: Path() would drop the "/"
            path = Path(target)  # type: ignore[arg-type]
            if path.is_dir():
                raise DeadReluError(f"{self.__class__.__name__} needs a file path, but {path} is a directory")
            kind = self._unloggable(path)
            if kind is not None:
                raise DeadReluError(self._refusal(path, kind))
            if not path.parent.exists():
                raise DeadReluError(f"cannot log to {path}: the folder {path.parent} does not exist")
            self.path: Path | None = path
            self.name = f"{self.__class__.__name__}({path})"
        else:
            self.path = None
            self._fh = target  # type: ignore[assignment]
            self.name = f"{self.__class__.__name__}({getattr(target, 'name', 'stream')})"

    #: Whether a record may span lines inside double quotes (CSV) — decides where a record ends.
    _quoted = False

    @staticmethod
    def _unloggable(path: Path) -> str | None:
        """What ``path`` is when a log cannot be appended to it (None: it can, or it does not exist yet)."""
        try:
            return _unloggable_kind(os.stat(path).st_mode)
        except OSError:  # missing (created when opened) or not reachable: opening it says why
            return None

    def _refusal(self, path: Path, kind: str) -> str:
        cls = self.__class__.__name__
        message = f"{cls} needs a regular file to append to, but {path} is {kind}"
        if kind.startswith("a named pipe"):  # the stream form writes to a pipe the caller opened
            message += f"; to log into it, open it yourself and pass the stream, {cls}(open(path, 'w'))"
        return message

    def open(self) -> None:
        if self._owned and self._fh is None:
            assert self.path is not None
            self._created = None  # only a file this very open creates may be removed by abort()
            self.check()
            self._settle_tail(self.path)
            self._fh = self._open_append(self.path)

    def check(self) -> None:
        """Refuse, reading only, a path this sink cannot append to (see the format's own checks).

        Raises:
            SinkError: when the path is now a named pipe, a socket or a block device, or holds a
                file the format refuses; the file is left as it is.
        """
        if self._owned and self._fh is None:
            assert self.path is not None
            kind = self._unloggable(self.path)
            if kind is not None:
                raise SinkError(self._refusal(self.path, kind))
            self._check_existing(self.path)

    def _check_existing(self, path: Path) -> None:
        """Refuse an existing file that is not of this sink's format (each format says)."""

    def abort(self) -> None:
        created, self._created = self._created, None
        if created is None or self._fh is not None:
            return
        try:
            st = os.stat(created[0])
        except OSError:
            return
        # Only the very file this sink created, still empty: never another one put there since.
        if (st.st_dev, st.st_ino) == created[1:] and st.st_size == 0 and stat.S_ISREG(st.st_mode):
            os.unlink(created[0])

    def _open_append(self, path: Path) -> IO[str]:
        """The file opened to append (never truncated: earlier runs' lines, and this run's after a
        re-attach, survive). It is opened without blocking and its kind checked on the open file, so
        a path that became a named pipe since the sink was made is refused instead of hanging.

        Raises:
            SinkError: when the path is (now) a named pipe, a socket or a block device.
        """
        nonblocking = getattr(os, "O_NONBLOCK", 0)  # 0 on Windows, which has no named pipes in the file system
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | nonblocking
        created = False
        try:
            try:  # O_EXCL tells, without a race, whether this open creates the file (see abort)
                fd, created = os.open(path, flags | os.O_EXCL, 0o666), True
            except FileExistsError:
                fd = os.open(path, flags, 0o666)
        except OSError as err:
            kind = self._unloggable(path)
            if kind is not None:  # a pipe without a reader (ENXIO), a socket
                raise SinkError(self._refusal(path, kind)) from err
            raise
        try:
            kind = _unloggable_kind(os.fstat(fd).st_mode)
            if kind is not None:  # a pipe that has a reader
                raise SinkError(self._refusal(path, kind))
            if nonblocking:
                os.set_blocking(fd, True)  # writes wait for a slow device, as a plain open's do
            if created:
                st = os.fstat(fd)
                self._created = (path, st.st_dev, st.st_ino)
        except BaseException:
            os.close(fd)
            raise
        return open(fd, "a", encoding="utf-8", newline="")

    def _is_whole_record(self, tail: bytes) -> bool:
        """Whether an unterminated last line is a whole record that only lacks its newline (each
        format says; by default every unterminated line counts as torn)."""
        return False

    def _settle_tail(self, path: Path) -> None:
        """Make the file end with an end of line before appending, so the next record starts on a
        line of its own instead of merging with the last one: a whole last record that lacks only
        its newline (a file written by ``json.dump``, an editor that strips the final newline) gets
        the newline; a torn one (a full disk or a kill mid-write) is cut off, with a warning.

        Raises:
            SinkError: when the unterminated last line is too long to check; the file is left as it is.
        """
        found = unterminated_tail(path, self._quoted)
        if found is None:
            return
        start, size = found
        if size - start > _CHECK_LIMIT:  # neither cut (it may be whole) nor read into memory
            raise SinkError(
                f"{self.name}: the file's last line runs {size - start} bytes without an end of line, too long to "
                "check whether it is a whole record; log to a new file (nothing was written to this one)"
            )
        with open(path, "r+b") as fh:
            fh.seek(start)
            tail = fh.read()
            if not tail.endswith(b"\n") and self._is_whole_record(tail):
                fh.seek(0, os.SEEK_END)
                fh.write(b"\n")
                return
            fh.truncate(start)
        # A tail that ends with a newline is a CSV row cut inside a quoted value (see unterminated_tail).
        what = "cut inside a quoted value" if tail.endswith(b"\n") else "without an end of line"
        warnings.warn(
            f"{self.name}: removed a torn last record ({size - start} bytes {what}) before appending",
            SinkWarning,
            stacklevel=4,
        )

    def _emit(self, text: str) -> None:
        if self._fh is None:
            self.open()
        assert self._fh is not None
        # One write per complete record, flushed at once, so a later failure cannot take earlier lines with it.
        try:
            self._fh.write(text)
            self._fh.flush()
        except (OSError, ValueError):
            if self._owned:  # drop the handle: the next write reopens and repairs a torn tail first
                fh, self._fh = self._fh, None
                try:
                    fh.close()
                except (OSError, ValueError):
                    pass
            raise

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None and self._owned:
            fh.close()


class JSONLSink(_FileSink):
    """One JSON object per line per evaluation (always available; no extra needed).

    Each line: ``{"kind": "deadrelu.monitor", "schema_version": 1, "step", "loss",
    "sites": [{"site", "units", "batches", "active", "asleep", "dead", "dormant",
    "nonfinite", "unobserved", "alive"}], "events": [{"step", "site", "unit", "kind"}]}``.

    Appending to an existing file: a file whose first line is not a JSON object, or whose
    unterminated last line does not start like one, is refused untouched (so is one whose first
    or unterminated last line is longer than 16 MiB, too long to check). An unterminated last
    line that parses as a JSON object is a whole record that lacks only its newline: the newline
    is added and the record kept. Any other unterminated last line is a torn record and is cut.
    The rule cannot mistake a torn record for a whole one: an object ends with its closing
    brace, so no part of one cut short (``{"a": 12`` of ``{"a": 123}``) parses as an object.

    Args:
        target: a file path (opened in append mode) or an open text stream.

    Raises:
        DeadReluError: when the path is a folder, a named pipe, a socket or a block device (a
            character device such as ``/dev/null`` is fine), or its folder does not exist.

    Example:
        >>> import io
        >>> buf = io.StringIO()
        >>> JSONLSink(buf).name
        'JSONLSink(stream)'
    """

    def _check_existing(self, path: Path) -> None:
        """Refuse, before the torn-tail repair touches it, a file that is not JSON Lines: its first
        line must be a JSON object, and an unterminated last line must be the start of one.

        Raises:
            SinkError: naming what is wrong; the file is left as it is.
        """
        if not path.is_file() or path.stat().st_size == 0:
            return
        refuse = f"{self.name}: the file is not a JSON Lines log; log to a new file (nothing was written to this one)"
        with open(path, "rb") as fh:
            first = fh.readline(_CHECK_LIMIT + 1)  # bounded: a huge one-line file is never read whole
            fh.seek(last_record_end(path, quoted=False))
            tail = fh.read(1 << 16)
        if tail and not tail.lstrip().startswith(b"{"):
            raise SinkError(f"{refuse} (it ends with {tail[:60]!r}, which is not the start of a JSON record)")
        if not first.endswith(b"\n"):
            if len(first) <= _CHECK_LIMIT:
                return  # the file's only line, unterminated: _settle_tail tells a whole record from a torn one
            # No end of line within the limit: unless it visibly is not an object, it is too long to
            # parse, and an unchecked first line must not let a foreign file be cut and appended to.
            if first.lstrip().startswith(b"{"):
                raise SinkError(f"{refuse} (its first line is longer than {_CHECK_LIMIT >> 20} MiB, too long to check)")
            raise SinkError(f"{refuse} (its first line is not a JSON object)")
        if not _is_json_object(first):
            raise SinkError(f"{refuse} (its first line is not a JSON object)")

    def _is_whole_record(self, tail: bytes) -> bool:
        return _is_json_object(tail)

    def write(self, record: "LogRecord") -> None:
        self._emit(json.dumps(record_to_dict(record), allow_nan=False) + "\n")


class CSVSink(_FileSink):
    """One CSV row per site per evaluation; the header is written only to an empty file.

    Columns: ``step, site, units, batches, active, asleep, dead, dormant, nonfinite, alive, loss, unobserved``.
    Appending to a file that an earlier version wrote (its header a subset of these columns, e.g.
    without ``unobserved``) keeps that file's columns, so every row has the width of its header;
    a file whose header is not a deadrelu header is refused and left untouched. Whether the file
    is empty is asked at the first write, so a second sink on the same path (two monitors, or the
    path listed twice) adds rows under the header the first one wrote instead of a second header.
    A value holding a line break (``\\r`` too), a quote or a comma is quoted, so every row parses
    with the header's width.

    An unterminated last line is kept, and given its newline, when it is a whole row: the csv
    module reads it as exactly as many values as the header has, no quoted value is left open,
    and its last value fits its column (a number, or empty for ``loss``; anything for ``site``).
    Otherwise it is a torn row and is cut: a row cut at a comma has fewer values, one cut just
    after its last comma ends in an empty number. CSV is not self-delimiting, so a row cut inside
    its last value (``0.25`` left as ``0.2``) cannot be told from a whole one and is kept. A lone
    unterminated header is kept when it is the full header; a shorter start of it is cut, and the
    full header written in its place begins with the same bytes. A file that ends inside a quoted
    value (cut just after a line break in a quoted site name) ends with a newline but not with a
    row: that torn row is cut too.

    Args:
        target: a file path (opened in append mode) or an open text stream.

    Raises:
        DeadReluError: when the path is a folder, a named pipe, a socket or a block device (a
            character device such as ``/dev/null`` is fine), or its folder does not exist.

    Example:
        >>> import io
        >>> CSVSink(io.StringIO()).name
        'CSVSink(stream)'
    """

    _quoted = True

    def __init__(self, target: str | os.PathLike[str] | IO[str]) -> None:
        super().__init__(target)
        self._columns: tuple[str, ...] | None = None  # settled at the first write
        self._header: tuple[str, ...] | None = None  # the existing file's, read when it is opened

    def _file_columns(self) -> tuple[tuple[str, ...], bool]:
        """The columns rows go in and whether the header still has to be written (the existing
        file's header was checked when it was opened, see :meth:`open`).

        Raises:
            SinkError: when another writer left the file holding only part of a header.
        """
        if self._fh is None:
            self.open()
        if self._is_empty():
            return CSV_COLUMNS, True
        header = self._header
        if header is None and self.path is not None:
            # Another sink on this path (two monitors, the path listed twice) wrote since this one
            # opened an empty file: follow the header it wrote instead of writing a second one.
            header = self._existing_header()
            if header is None:
                raise SinkError(f"{self.name}: another writer left the file holding part of a header; log to a new file")
        if header is None:  # a stream that already holds text: nothing to read a header from
            return CSV_COLUMNS, False
        if header != CSV_COLUMNS:
            missing = [c for c in CSV_COLUMNS if c not in header]
            warnings.warn(
                f"{self.name}: appending in the file's own {len(header)} columns"
                + (f"; {', '.join(missing)} not logged (start a new file to get them)" if missing else ""),
                SinkWarning,
                stacklevel=3,
            )
        return header, False

    def _is_empty(self) -> bool:
        """Whether nothing is in the file yet, asked of the file itself when the sink owns it: the
        handle's position is from when it was opened and misses another sink's writes since."""
        assert self._fh is not None
        if self._owned:
            return os.fstat(self._fh.fileno()).st_size == 0
        try:  # an append-mode stream stands at its end, so position 0 means "empty"
            return self._fh.tell() == 0
        except (OSError, ValueError):  # unseekable stream (a pipe): assume fresh
            return True

    def open(self) -> None:
        # The header is checked before the torn-tail repair: a foreign file is left as it is.
        if self._fh is None:
            self._header = self._existing_header()
        super().open()

    def _check_existing(self, path: Path) -> None:
        self._existing_header()

    def _existing_header(self) -> tuple[str, ...] | None:
        """The complete header line of the file being appended to (None: no file, an empty one, or
        a torn deadrelu header that the torn-tail repair will cut).

        Raises:
            SinkError: when the file does not start with a deadrelu CSV header.
        """
        if self.path is None or not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        refuse = f"{self.name}: the file is not a deadrelu CSV; log to a new file (nothing was written to this one)"
        with open(self.path, "rb") as fh:
            first = fh.readline(1 << 16)  # bounded: a deadrelu header is about 100 bytes
        if not first.endswith(b"\n") and len(first) == 1 << 16:
            raise SinkError(f"{refuse} (its first line is longer than 64 KiB, far longer than a deadrelu header)")
        try:
            text = first.decode("utf-8")
        except UnicodeDecodeError:
            raise SinkError(f"{refuse} (its first line is not UTF-8 text)") from None
        if not text.endswith("\n"):  # the only line, unterminated: the full header or a torn start of it
            if text == ",".join(CSV_COLUMNS):
                return CSV_COLUMNS  # whole: _settle_tail adds its newline
            if ",".join(CSV_COLUMNS).startswith(text):
                return None
            raise SinkError(f"{refuse} (its only line, {text[:80]!r}, is not a deadrelu header)")
        try:
            header = tuple(next(csv.reader([text.rstrip("\r\n")]), ()))
        except csv.Error as err:
            raise SinkError(f"{refuse} ({err})") from None
        unknown = [c for c in header if c not in CSV_COLUMNS]
        if unknown or "step" not in header or "site" not in header or len(set(header)) != len(header):
            raise SinkError(f"{refuse} (its first line {','.join(header)[:200]!r} is not a deadrelu CSV header)")
        return header

    def _is_whole_record(self, tail: bytes) -> bool:
        header = self._header
        if header is None:  # the file's only line is a torn start of our header
            return False
        try:
            text = tail.decode("utf-8")
        except UnicodeDecodeError:  # cut inside a multi-byte character
            return False
        if text.count('"') % 2:  # a quoted value is still open: the row was cut inside it
            return False
        try:
            rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
        except csv.Error:
            return False
        if len(rows) != 1 or len(rows[0]) != len(header):  # cut at or before a comma: too few values
            return False
        if tuple(rows[0]) == header:  # the lone header itself, see _existing_header
            return True
        column, last = header[-1], rows[0][-1]
        if column == "site" or (column == "loss" and last == ""):  # the only columns that may hold text or nothing
            return True
        try:  # every other column is a number: empty or half an exponent ("1e-") means the row was cut
            float(last)
        except ValueError:
            return False
        return True

    def write(self, record: "LogRecord") -> None:
        lines = []
        if self._columns is None:
            columns, needs_header = self._file_columns()
            if needs_header:
                lines.append(_csv_line(columns))
        else:
            columns = self._columns
        for row in record.rows:
            d = row.to_dict()
            lines.append(_csv_line(["" if d.get(c) is None else d[c] for c in columns]))
        self._emit("".join(lines))
        self._columns = columns


def _csv_line(values: Any) -> str:
    r"""One CSV row ending in ``\n``, with every value that holds a line break, a quote or a comma quoted.

    The csv module quotes a value that holds a character of the line terminator: with ``"\n"``
    alone a lone ``\r`` (a module named ``"a\rb"``) would be written bare, and every CSV reader
    breaks the row there. With ``"\r\n"`` both are quoted; the terminator is then swapped back
    for the ``\n`` the log's rows end with (the row's own ``\r\n`` is last, after any quote).

    >>> _csv_line([2, "a\rb", 0.5])
    '2,"a\rb",0.5\n'
    """
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(values)
    return buf.getvalue()[:-2] + "\n"


class CallbackSink(Sink):
    """Call ``fn(record)`` at every evaluation (what a plain callable in ``sinks=`` becomes).

    Example:
        >>> seen = []
        >>> sink = CallbackSink(seen.append)
    """

    def __init__(self, fn: Callable[["LogRecord"], Any]) -> None:
        self.fn = fn
        self.name = f"CallbackSink({getattr(fn, '__qualname__', type(fn).__name__)})"

    def write(self, record: "LogRecord") -> None:
        self.fn(record)


_SINK_FORMS = "a Sink, a .jsonl/.csv path or a callable"


def _short(value: Any) -> str:
    """A value as messages show it: its type and a shortened repr (just ``None`` for None)."""
    if value is None:
        return "None"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def as_sink(spec: Any) -> Sink:
    """Turn a ``sinks=`` entry into a :class:`Sink`: a Sink, a ``.jsonl``/``.csv`` path, or a callable.

    Raises:
        DeadReluError: for anything else (a path with another suffix, a folder, an open stream,
            a sink class instead of an instance, a number, None, ...), before any file is opened.

    Example:
        >>> as_sink("health.csv").name
        'CSVSink(health.csv)'
    """
    if isinstance(spec, Sink):
        return spec
    if isinstance(spec, type):
        # A class is callable, so it would pass as a callback sink that builds a throw-away object
        # from every record and logs nothing.
        if issubclass(spec, Sink):
            hint = f"pass an instance, e.g. {spec.__name__}(...) with its arguments"
        else:
            hint = "pass an instance of it, a Sink object, or a function taking a LogRecord"
        raise DeadReluError(f"a sink must be {_SINK_FORMS}, not the class {spec.__name__}: {hint}")
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if not isinstance(text, str) or not text:
            raise DeadReluError(f"a sink path must be a non-empty text path ending in .jsonl or .csv, got {_short(spec)}")
        path = Path(text)
        if path.is_dir():
            raise DeadReluError(
                f"cannot log to {text!r}: it is a directory; name a file in it ending in .jsonl or .csv "
                f"(e.g. {str(path / 'health.jsonl')!r}), or pass TensorBoardSink({text!r}) for TensorBoard event files"
            )
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return JSONLSink(spec)
        if suffix == ".csv":
            return CSVSink(spec)
        raise DeadReluError(
            f"cannot tell the log format of {text!r} ({'suffix ' + repr(path.suffix) if path.suffix else 'no suffix'}): "
            "use a .jsonl or .csv path, or a Sink object (TensorBoardSink, WandbSink, ...)"
        )
    if hasattr(spec, "write") and not callable(spec):
        raise DeadReluError(
            f"a sink must be {_SINK_FORMS}, not a {type(spec).__name__} with a write() method: wrap an open "
            "text stream as JSONLSink(stream) or CSVSink(stream), or subclass deadrelu.monitor.sinks.Sink"
        )
    if callable(spec):
        return CallbackSink(spec)
    raise DeadReluError(f"a sink must be {_SINK_FORMS}, not {_short(spec)}")


def as_sinks(spec: Any) -> list[Sink]:
    """Turn the monitor's ``sinks=`` option into sinks: one sink (a :class:`Sink`, a ``.jsonl``/``.csv``
    path or a callable) or an iterable of them; None means none. Nothing is opened or written.

    Raises:
        DeadReluError: for an entry :func:`as_sink` refuses (the message names its index) or an
            option that is neither a sink nor an iterable of sinks.

    Example:
        >>> [s.name for s in as_sinks("health.jsonl")], [s.name for s in as_sinks(["a.csv", print])]
        (['JSONLSink(health.jsonl)'], ['CSVSink(a.csv)', 'CallbackSink(print)'])
    """
    if spec is None:
        return []
    if isinstance(spec, (Sink, str, os.PathLike)) or hasattr(spec, "write"):
        return [as_sink(spec)]  # one sink, not the characters of a path or the lines of a stream
    if isinstance(spec, (bytes, bytearray)):
        raise DeadReluError(f"sinks must be {_SINK_FORMS}, or a list of them; got {_short(spec)} (pass a path as str)")
    if isinstance(spec, Mapping):
        raise DeadReluError(f"sinks must be {_SINK_FORMS}, or a list of them; got a mapping ({type(spec).__name__})")
    try:
        entries = list(spec)
    except TypeError:
        if callable(spec):
            return [as_sink(spec)]
        raise DeadReluError(f"sinks must be {_SINK_FORMS}, or a list of them; got {_short(spec)}") from None
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(as_sink(entry))
        except DeadReluError as err:
            raise type(err)(f"sinks[{i}]: {err}") from err.__cause__
    return out
