"""Result files: written atomically, except to a stream path, which is written to and never replaced."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deadrelu.core.files import atomic_write_text


def test_a_stream_path_is_written_to_not_replaced(tmp_path):
    import stat

    from deadrelu.core.files import is_stream_path

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert is_stream_path(fifo) and is_stream_path("/dev/stdout") and not is_stream_path(tmp_path / "r.json")
    out = tmp_path / "out.txt"
    out.write_text("table\n")
    # /dev/stdout redirected to a file is that file through /proc: appended to, never renamed over
    with open(out, "a") as f:
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            atomic_write_text("/dev/stdout", "{}\n")
        finally:
            os.dup2(saved, 1)
            os.close(saved)
    assert out.read_text() == "table\n{}\n"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


# -- temporaries: named for their process, and what a killed write left is removed by the next one --
posix_only = pytest.mark.skipif(os.name != "posix", reason="whether a process runs is asked with os.kill(pid, 0)")


def _aged(path: Path) -> Path:
    """Back-date ``path`` past STALE_AFTER_S: a temporary a killed write left an hour ago."""
    from deadrelu.core.files import STALE_AFTER_S

    old = path.lstat().st_mtime - STALE_AFTER_S - 60
    os.utime(path, (old, old))
    return path


def _gone_pid() -> int:
    """The id of a process that ran and was reaped: no process has it now."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@posix_only
def test_a_temporary_a_killed_write_left_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    gone = _gone_pid()
    stale = tmp_path / f".r.json.{gone}.abcd1234.tmp"
    stale.write_text("left by a write killed outright")
    _aged(stale)
    atomic_write_text(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"] and target.read_text() == "new"


@posix_only
def test_only_dead_processes_temporaries_of_that_target_are_removed(tmp_path):
    gone = _gone_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        removed = [f".r.json.{gone}.abcd1234.tmp", f".r.json.{gone}.x_y0z9qq.tmp"]
        kept = [
            f".r.json.{os.getppid()}.abcd1234.tmp",  # a live process (the one that started this one)
            f".r.json.{sleeper.pid}.abcd1234.tmp",  # a live write, started just now
            f".r.json.{os.getpid()}.abcd1234.tmp",  # this process's own
            f".other.json.{gone}.abcd1234.tmp",  # another target
            ".r.json.abcd1234.tmp",  # no process id: not ours to judge
            f".r.json.{gone}.abcd1234.tmp.keep",  # not the naming
            f"r.json.{gone}.abcd1234.tmp",  # not hidden: not the naming
        ]
        for name in removed + kept:
            (tmp_path / name).write_text("x")
            _aged(tmp_path / name)
        young = f".r.json.{gone}.young123.tmp"  # maybe a live write from another machine sharing the folder
        (tmp_path / young).write_text("x")
        kept.append(young)
        atomic_write_text(tmp_path / "r.json", "new")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["r.json"])


@posix_only
@pytest.mark.parametrize("failing", ["iterdir", "unlink"])
def test_cleanup_trouble_never_fails_the_write(tmp_path, monkeypatch, failing):
    # A folder one may write into but not list (mode 0o300), or a leftover one may not remove:
    # simulated, since root (CI containers) lists and removes everything.
    stale = tmp_path / f".r.json.{_gone_pid()}.abcd1234.tmp"
    stale.write_text("x")
    _aged(stale)
    tried = []
    real = getattr(Path, failing)

    def denied(self, *args, **kwargs):
        if self in (tmp_path, stale):
            tried.append(self)
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, failing, denied)
    atomic_write_text(tmp_path / "r.json", "new")
    monkeypatch.undo()
    assert tried, "the write did not try to clean up"
    assert (tmp_path / "r.json").read_text() == "new" and stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", stale.name])


def test_the_temporary_carries_the_process_id_and_is_removed_on_failure(tmp_path, monkeypatch):
    from deadrelu.errors import DeadReluError

    target = tmp_path / "r.json"
    target.write_text("old")
    seen = []

    def no_rename(src, dst):
        seen.append(Path(src).name)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(DeadReluError, match="No space left on device"):
        atomic_write_text(target, "new")
    assert len(seen) == 1 and re.fullmatch(rf"\.r\.json\.{os.getpid()}\.[A-Za-z0-9_]{{8}}\.tmp", seen[0]), seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"] and target.read_text() == "old"


@posix_only
def test_the_native_kernel_builds_through_the_same_temporaries(tmp_path, monkeypatch):
    from deadrelu.core import native

    path = tmp_path / "cache" / "unit_stats-0123abcd.so"
    path.parent.mkdir()
    stale = path.parent / f".{path.name}.{_gone_pid()}.abcd1234.tmp"
    stale.write_bytes(b"half a library")
    _aged(stale)
    outputs = []

    def fake_cc(cmd, **kwargs):
        outputs.append(Path(cmd[-1]).name)
        Path(cmd[-1]).write_bytes(b"built")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(native, "_compiler", lambda: "cc")
    monkeypatch.setattr(native.subprocess, "run", fake_cc)
    native._compile(path)
    assert re.fullmatch(rf"\.unit_stats-0123abcd\.so\.{os.getpid()}\.[A-Za-z0-9_]{{8}}\.tmp", outputs[0]), outputs
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name] and path.read_bytes() == b"built"
