"""A run's output files: checked before it trains, then written all or none.

:func:`plan_outputs` checks, before any training, that every output of a run (the PNG plots, the
result JSON, ``report.html``) can be written to its directory and that nothing there deadrelu did
not write would be replaced; :func:`write_outputs` then draws and writes them through an
:class:`OutputStage`, which renames them into place together, so an error, Ctrl-C or SIGTERM leaves
an earlier run's files exactly as they were. :func:`write_results` writes one result JSON. The demo
and the experiments write their outputs here (:mod:`deadrelu.lab.demo` re-exports these names).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .termination import sigterm_deferred, sigterm_raises
from ..core.files import atomic_write_text, backup_path, make_temporary, refuse_directory_name, remove_stale_temporaries
from ..errors import DeadReluError

__all__ = ["write_results", "OutputStage", "OutputPlan", "plan_outputs", "write_outputs", "interrupts_ignored"]


def write_results(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a result dict as JSON (atomically) and return the path.

    Example:
        >>> write_results({"kind": "example"}, "/tmp/deadrelu-doc/r.json").name
        'r.json'
    """
    refuse_directory_name(path)  # before Path() drops the trailing "/" of "res/"
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with sigterm_raises():  # a SIGTERM mid-write removes the temporary file (see lab/termination.py)
        atomic_write_text(target, json.dumps(result, indent=1, allow_nan=False) + "\n")
    return target


class OutputStage:
    """A run's output files, written under temporary names in their directory and renamed into place together.

    Nothing appears under a final name until :meth:`commit`; leaving the ``with`` block without
    committing (an error, Ctrl-C, SIGTERM) removes the temporaries and every directory the stage
    created, so an earlier run's files stay exactly as they were and no partial set is left behind.
    Within the block SIGTERM raises :class:`~deadrelu.lab.termination.Terminated` (main thread
    only), held back over the renames. Temporaries are named ``.NAME.PID.XXXXXXXX.tmp``; those
    of a process that is gone (killed outright, SIGKILL), for a name this stage writes, are
    removed when it writes that name.

    Example:
        >>> import tempfile
        >>> with OutputStage(Path(tempfile.mkdtemp()) / "o") as stage:
        ...     path = stage.add("a.txt", "hello")
        ...     stage.commit()
        >>> path.read_text()
        'hello'
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self._created: list[Path] = []
        self._staged: list[tuple[str, Path]] = []
        self._committed = False
        self._sigterm = contextlib.ExitStack()

    def __enter__(self) -> "OutputStage":
        self._sigterm.enter_context(sigterm_raises())
        missing = [d for d in (self.out_dir, *self.out_dir.parents) if not d.exists()]
        try:
            for directory in reversed(missing):
                with sigterm_deferred():  # made and recorded together, or neither
                    directory.mkdir()
                    self._created.append(directory)
        except BaseException:  # a name too long, a dangling link: leave no directory behind either
            self.__exit__()
            raise
        return self

    def add(self, name: str, data: str | bytes) -> Path:
        """Write one output under a temporary name; returns the path it will have once committed."""
        remove_stale_temporaries(self.out_dir, name)
        with sigterm_deferred():  # made and recorded together, so the cleanup knows every temporary
            fd, tmp = make_temporary(self.out_dir / name)
            self._staged.append((tmp, self.out_dir / name))
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        final = self.out_dir / name
        umask = os.umask(0)
        os.umask(umask)
        # an existing file keeps the permissions a user gave it; a new one gets what open() would give
        os.chmod(tmp, final.stat().st_mode & 0o7777 if final.is_file() else 0o666 & ~umask)
        return final

    def commit(self) -> None:
        """Rename every staged file into place.

        Ctrl-C is ignored during the renames: they take microseconds, and an interrupt between two of
        them would leave a half-replaced set, the one thing the stage exists to prevent. A SIGTERM
        then is held back and raised once every file is in place.
        """
        for _, final in self._staged:
            if final.is_dir():
                raise DeadReluError(f"cannot write {final}: it is a directory")
        with interrupts_ignored(), sigterm_deferred():
            done: list[tuple[Path, Path | None, bool]] = []  # (final, hard-linked backup, existed before)
            try:
                for tmp, final in self._staged:
                    existed, backup = final.exists(), None
                    if existed:
                        backup = backup_path(final)
                        try:
                            os.link(final, backup)  # the earlier file stays reachable until all are in
                        except OSError:  # no hard links here: that file cannot be restored
                            backup = None
                    done.append((final, backup, existed))
                    os.replace(tmp, final)
            except BaseException:  # one rename failed (a full disk): put the earlier set back
                for final, backup, existed in reversed(done):
                    with contextlib.suppress(OSError):
                        if backup is not None:
                            os.replace(backup, final)
                        elif not existed:
                            os.unlink(final)
                raise
            finally:
                for _, backup, _ in done:
                    if backup is not None:
                        with contextlib.suppress(OSError):
                            os.unlink(backup)
            self._committed = True

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._committed:
                return
            with sigterm_deferred():  # a (second) SIGTERM does not cut the cleanup short
                for tmp, _ in self._staged:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                for directory in reversed(self._created):
                    with contextlib.suppress(OSError):
                        directory.rmdir()  # only if still empty: never anything someone else put there
        finally:
            self._sigterm.close()  # SIGTERM's previous handler back


@dataclass
class OutputPlan:
    """What a run will write to ``out_dir``, checked before it trains, and the saved results its report adds.

    Attributes:
        out_dir: the output directory (created by the run if missing).
        experiment: the result's ``experiment`` (names its PNG files).
        results_name: the result JSON's file name.
        plots: write PNG files.
        html: write ``report.html``.
        saved: the valid results already in ``out_dir`` (not ``results_name``) that the report includes.
        saved_plots: their plots, drawn while checking them, file name → plot name → PNG.
    """

    out_dir: Path
    experiment: str
    results_name: str = "results.json"
    plots: bool = True
    html: bool = True
    saved: list[dict[str, Any]] = field(default_factory=list)
    saved_plots: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def file_names(self) -> list[str]:
        """Every file the run writes in ``out_dir``."""
        from .plots import plot_file_names

        return ((plot_file_names(self.experiment) if self.plots else []) + [self.results_name]
                + (["report.html"] if self.html else []))


def _check_out_dir(out_dir: Path, names: Sequence[str]) -> None:
    """The output directory can be created (or is a directory) and no output's name is taken by a directory.

    Checked for real, not from permission bits alone: the directories ``out_dir`` lacks and a file in it
    are created and removed again, so a dangling symbolic link, a name too long, or a file system that
    refuses (``/proc``, a read-only mount; root passes every ``os.access`` test) is found before
    training, not after it.
    """
    try:
        chain = (out_dir, *out_dir.parents)
        for link in chain:
            if link.is_symlink() and not link.exists():
                raise DeadReluError(
                    f"cannot write outputs to {out_dir}: {link} is a symbolic link to {os.readlink(link)}, which "
                    "does not exist; create that directory or choose another --out"
                )
        existing = next(d for d in (*chain, Path(".")) if d.exists())
        if not existing.is_dir():
            what = "it is a file" if existing == out_dir else f"{existing} is a file"
            raise DeadReluError(f"cannot write outputs to {out_dir}: {what}, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise DeadReluError(f"cannot write outputs to {out_dir}: {existing} is not writable")
        for name in names:
            if (out_dir / name).is_dir():
                raise DeadReluError(f"cannot write {out_dir / name}: it is a directory")
        _probe_out_dir(out_dir, [d for d in chain if not d.exists()])
    except OSError as err:  # ENAMETOOLONG from a stat, EPERM/EROFS/ENOENT from the probe
        raise DeadReluError(f"cannot write outputs to {out_dir}: {err.strerror or err}") from None


def _probe_out_dir(out_dir: Path, missing: Sequence[Path]) -> None:
    """Create the ``missing`` directories (deepest last) and one temporary file in ``out_dir``; remove them again."""
    created: list[Path] = []
    with sigterm_raises(), sigterm_deferred():  # microseconds: a SIGTERM is raised once all is removed again
        try:
            for directory in reversed(missing):
                directory.mkdir()
                created.append(directory)
            fd, probe = tempfile.mkstemp(prefix=".deadrelu-probe.", suffix=".tmp", dir=out_dir)
            os.close(fd)
            os.unlink(probe)
        finally:
            for directory in reversed(created):
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only if still empty


def _check_not_foreign(out_dir: Path, results_name: str, html: bool) -> None:
    """An existing result JSON or ``report.html`` in ``out_dir`` that deadrelu did not write is never replaced."""
    from .html_report import is_deadrelu_page, is_deadrelu_result

    checks = [(results_name, is_deadrelu_result, "deadrelu result")]
    if html:
        checks.append(("report.html", is_deadrelu_page, "report deadrelu wrote"))
    for name, ours, what in checks:
        path = out_dir / name
        if path.is_file() and not ours(path):
            raise DeadReluError(
                f"{path} exists and is not a {what}; it was left as it is: "
                "choose another --out directory, or move or delete that file"
            )


def plan_outputs(
    out_dir: str | os.PathLike[str], experiment: str, *, results_name: str = "results.json",
    plots: bool = True, html: bool = True,
) -> OutputPlan:
    """Check, before any training, that a run's outputs can be written; returns the plan :func:`write_outputs` follows.

    Raises:
        DeadReluError: ``out_dir`` or one of its parents is a file, an output's name is a directory, the
            result JSON or ``report.html`` exists there and is not deadrelu's (it is never replaced), or a
            result already in ``out_dir`` that the report would include is malformed (naming the file).
        ModuleNotFoundError: the plots or the report are asked for and matplotlib (``deadrelu[plot]``) is not
            installed: found here, not after the training.
    """
    plan = OutputPlan(Path(out_dir), experiment, results_name, plots, html)
    _check_out_dir(plan.out_dir, plan.file_names())
    _check_not_foreign(plan.out_dir, results_name, html)
    if plots or html:  # the PNG files and the report's images are drawn with matplotlib
        from .._imports import require

        require("matplotlib", "plot")
    if html:
        from .html_report import result_plots, saved_results

        plan.saved = saved_results(plan.out_dir, skip=results_name)
        plan.saved_plots = {r["_file"]: result_plots(r) for r in plan.saved}
    return plan


def write_outputs(plan: OutputPlan, result: dict[str, Any], t0: float | None = None) -> dict[str, str]:
    """Plots, the result JSON and ``report.html``, all or none (see :class:`OutputStage`); returns name → path.

    With ``t0`` (a ``time.perf_counter()``), ``result["wall_seconds"]`` is set just before it is saved.
    """
    pngs: dict[str, bytes] = {}
    if plan.plots or plan.html:
        from .plots import plot_pngs

        pngs = plot_pngs(result)  # drawn once, for the PNG files and the report
    page = None
    if t0 is not None:
        result["wall_seconds"] = time.perf_counter() - t0
    text = json.dumps(result, indent=1, allow_nan=False) + "\n"
    if plan.html:
        from .html_report import report_page

        from .html_report import result_plots, saved_results

        # Read again now: another run may have saved a result into the same folder while this one
        # trained. Plots drawn at planning time are reused for the results that did not change.
        before = {r["_file"]: r for r in plan.saved}
        saved = saved_results(plan.out_dir, skip=plan.results_name)
        plots = {r["_file"]: plan.saved_plots[r["_file"]] if before.get(r["_file"]) == r else result_plots(r) for r in saved}
        page = report_page(saved, {plan.results_name: result}, rendered={**plots, plan.results_name: pngs})
    outputs: dict[str, str] = {}
    with OutputStage(plan.out_dir) as stage:
        if plan.plots:
            for name, png in pngs.items():
                outputs[f"plot:{name}"] = str(stage.add(f"{result['experiment']}-{name}.png", png))
        outputs["results"] = str(stage.add(plan.results_name, text))
        if page is not None:
            outputs["report"] = str(stage.add("report.html", page))
        stage.commit()
    return outputs


@contextlib.contextmanager
def interrupts_ignored() -> Iterator[None]:
    """Ignore SIGINT for the block (main thread only: only there can Python set signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
