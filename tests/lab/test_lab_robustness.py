"""The lab verbs keep the CLI's promise under abuse: a user error is one line on stderr and exit 2, an
interrupt or a failure while writing leaves every file as it was, and tables, plots and the report
never misstate a number (cut, dropped as markup, drawn as 0 for a diverged run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from deadrelu.cli.main import main

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

SMALL = ["--seeds", "1", "--epochs", "1", "--checkpoint-epoch", "1", "--workers", "1", "--no-progress"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "evidence.md"


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """One small demo's outputs (results.json, plots, report.html)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", *SMALL, "--no-live", "--out", str(out)]) == 0
    return out


def _one_line_usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    return err


# -- 1. a learning rate float32 cannot hold ------------------------------------------------------------
def test_a_learning_rate_beyond_float32_is_refused_by_the_option(tmp_path, capsys):
    import torch

    from deadrelu.cli.options import FLOAT32_MAX

    assert FLOAT32_MAX == torch.finfo(torch.float32).max
    for argv in (["demo", "--lr", "1e300", *SMALL], ["experiment", "activations", "--lr", "1e300", "--no-progress"]):
        err = _one_line_usage_error([*argv, "--out", str(tmp_path / "o")], capsys)
        assert "--lr" in err and "float32" in err
    assert not (tmp_path / "o").exists()


# -- 2. seeds torch cannot take ------------------------------------------------------------------------
def test_a_seed_out_of_range_is_refused_by_the_option(tmp_path, capsys):
    huge = "99999999999999999999999"
    for argv in (["demo", "--seed", huge, *SMALL], ["experiment", "init", "--seed", huge, "--no-progress"],
                 ["demo", "--seed", "-1", *SMALL]):
        err = _one_line_usage_error([*argv, "--out", str(tmp_path / "o")], capsys)
        assert "--seed" in err and "seed must be" in err
    # each seed is in range, the last of the run is not
    assert main(["demo", "--seed", str(2**32 - 1), "--seeds", "2", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert "--seeds 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- 3. outputs: checked before training, written all or none ------------------------------------------
def _no_training(monkeypatch):
    def trained(*_, **__):
        raise AssertionError("trained although the outputs could not be written")

    monkeypatch.setattr("deadrelu.lab.demo.seeds_story", trained)
    monkeypatch.setattr("deadrelu.lab.experiments.run_experiment", trained)


@pytest.mark.parametrize("taken", ["results.json", "report.html", "demo-layers.png"])
def test_an_output_name_taken_by_a_directory_is_found_before_training(taken, tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    (tmp_path / taken).mkdir()
    assert main(["demo", *SMALL, "--no-live", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and taken in err and "directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken]


def test_a_malformed_result_already_in_out_is_found_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    (tmp_path / "old.json").write_text('{"kind": "deadrelu.evidence", "experiment": "init"}')
    assert main(["experiment", "lr-sweep", "--seeds", "1", "--epochs", "1", "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "old.json" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]


def test_an_out_below_a_file_is_found_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    (tmp_path / "file.txt").write_text("x")
    assert main(["demo", *SMALL, "--no-live", "--out", str(tmp_path / "file.txt" / "o")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["demo", "experiment"])
@pytest.mark.parametrize("case", ["dangling link", "below a dangling link", "name too long", "in /proc"])
def test_an_out_that_cannot_be_created_is_found_before_training(verb, case, tmp_path, capsys, monkeypatch):
    # These pass every permission check (root passes os.access everywhere) but the directory cannot be
    # made: the run used to train in full and only then fail, with a raw "[Errno 17] File exists".
    _no_training(monkeypatch)
    (tmp_path / "link").symlink_to(tmp_path / "nowhere" / "dir")
    out = {"dangling link": tmp_path / "link", "below a dangling link": tmp_path / "link" / "sub",
           "name too long": tmp_path / ("a" * 300), "in /proc": Path("/proc/deadrelu-no-such-dir")}[case]
    if case == "in /proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    argv = ["demo", *SMALL, "--no-live"] if verb == "demo" else ["experiment", "lr-sweep", "--no-progress"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"cannot write outputs to {out}" in err, err
    if "dangling" in case:
        assert "symbolic link" in err and "does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the probe left nothing behind


@pytest.mark.parametrize("verb", ["demo", "experiment"])
def test_a_missing_plot_extra_is_found_before_training(verb, tmp_path, capsys, monkeypatch):
    # the plots and the report's images need matplotlib; it used to be found missing only after the training
    _no_training(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["demo", *SMALL, "--no-live"] if verb == "demo" else ["experiment", "lr-sweep", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and 'pip install "deadrelu[plot]"' in err, err
    assert not (tmp_path / "out").exists()


def test_an_interrupt_while_writing_leaves_the_earlier_run_intact(demo_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(demo_dir, out)
    before = _files(out)

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr("deadrelu.lab.html_report.render_html", interrupted)  # after the plots, before the page
    assert main(["demo", *SMALL, "--no-live", "--out", str(out)]) == 130
    assert _files(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    fresh = tmp_path / "new" / "deeper"
    assert main(["demo", *SMALL, "--no-live", "--out", str(fresh)]) == 130
    assert not (tmp_path / "new").exists()  # the directories the run created went too


def test_the_output_stage_is_all_or_nothing(tmp_path):
    from deadrelu.lab.demo import OutputStage

    (tmp_path / "keep.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with OutputStage(tmp_path) as stage:
            stage.add("keep.json", "new")
            stage.add("b.png", b"\x89PNG")
            raise KeyboardInterrupt
    assert _files(tmp_path) == {"keep.json": b"old"} and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(OSError):
        with OutputStage(tmp_path / "a" / "b") as stage:
            stage.add("x.txt", "x")
            raise OSError("disk full")
    assert not (tmp_path / "a").exists()
    with OutputStage(tmp_path) as stage:
        stage.add("keep.json", "new")
        stage.add("b.png", b"png")
        assert (tmp_path / "keep.json").read_text() == "old" and not (tmp_path / "b.png").exists()  # not yet
        stage.commit()
    assert _files(tmp_path) == {"b.png": b"png", "keep.json": b"new"}


def test_a_rename_failing_part_way_puts_the_earlier_set_back(tmp_path, monkeypatch):
    import os

    from deadrelu.lab.demo import OutputStage

    (tmp_path / "a.txt").write_text("old-a")
    (tmp_path / "b.txt").write_text("old-b")
    real, calls = os.replace, []

    def full_disk_on_the_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_disk_on_the_second)
    with pytest.raises(OSError, match="No space"):
        with OutputStage(tmp_path) as stage:
            stage.add("a.txt", "new-a")
            stage.add("b.txt", "new-b")
            stage.add("c.txt", "new-c")
            stage.commit()
    monkeypatch.setattr(os, "replace", real)
    assert _files(tmp_path) == {"a.txt": b"old-a", "b.txt": b"old-b"}  # no backups or temporaries left


def test_a_directory_the_stage_cannot_create_leaves_none_behind(tmp_path):
    from deadrelu.lab.demo import OutputStage

    with pytest.raises(OSError):
        with OutputStage(tmp_path / "new" / ("x" * 300)):
            pass
    assert not (tmp_path / "new").exists()


def test_a_result_saved_by_another_run_meanwhile_is_in_the_report(demo_dir, tmp_path):
    from deadrelu.lab.demo import plan_outputs, write_outputs

    out = tmp_path / "shared"
    out.mkdir()
    result = json.loads((demo_dir / "results.json").read_text())
    plan = plan_outputs(out, "demo", results_name="mine.json")
    shutil.copy(demo_dir / "results.json", out / "theirs.json")  # written while this run trained
    write_outputs(plan, result)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "theirs.json" in page and "mine.json" in page


# -- 3b. SIGTERM while the outputs are written ------------------------------------------------------------
# The child skips training (seeds_story returns the saved demo result, as seed 1) and sends itself SIGTERM at
# one exact point of the write: signal.raise_signal runs the Python handler before it returns.
_SIGTERM_CHILD = """
import json, os, signal, sys
from deadrelu.lab import demo

when, saved, out = sys.argv[1:4]
story = json.loads(open(saved).read())
story["config"]["seed"] = 1  # tells this run's files from the earlier run's
demo.seeds_story = lambda *args, **kwargs: {k: v for k, v in story.items() if k not in ("outputs", "wall_seconds")}
if when == "before the renames":  # every temporary written, none renamed yet
    commit = demo.OutputStage.commit

    def terminated_then_commit(self):
        signal.raise_signal(signal.SIGTERM)
        return commit(self)

    demo.OutputStage.commit = terminated_then_commit
else:  # one output renamed into place, the others not yet
    replace, calls = os.replace, []

    def terminated_at_the_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)
        return replace(src, dst)

    os.replace = terminated_at_the_second
from deadrelu.cli.main import main
sys.exit(main(["demo", "--no-progress", "--no-live", "--workers", "1", "--out", out]))
"""


def _run_sigterm_child(tmp_path: Path, when: str, saved: Path, out: Path):
    import subprocess

    script = tmp_path / "child.py"
    script.write_text(_SIGTERM_CHILD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), str(Path(__file__).resolve().parents[2] / "src")) if p),
        MPLBACKEND="agg")
    return subprocess.run([sys.executable, str(script), when, str(saved), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("existing", [True, False], ids=["over an earlier run", "into a new folder"])
def test_sigterm_before_the_renames_removes_every_temporary(existing, demo_dir, tmp_path):
    out = tmp_path / "new" / "out"
    if existing:
        out = tmp_path / "out"
        shutil.copytree(demo_dir, out)
    before = _files(out) if existing else {}
    done = _run_sigterm_child(tmp_path, "before the renames", demo_dir / "results.json", out)
    if existing:  # the earlier run's files exactly as they were, and nothing else (no .tmp)
        assert sorted(p.name for p in out.iterdir()) == sorted(before) and _files(out) == before
    else:  # the folders the run created went too
        assert not (tmp_path / "new").exists(), sorted(p.name for p in (tmp_path / "new").rglob("*"))
    assert done.returncode == 143 and done.stderr == "deadrelu demo: terminated\n", done.stderr


def test_sigterm_during_the_renames_waits_until_every_output_is_in_place(demo_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(demo_dir, out)
    before = _files(out)
    done = _run_sigterm_child(tmp_path, "during the renames", demo_dir / "results.json", out)
    after = _files(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary, no backup link
    assert done.returncode == 143 and done.stderr == "deadrelu demo: terminated\n", done.stderr
    assert json.loads(after["results.json"])["config"]["seed"] == 1  # this run's set, all of it:
    changed = [name for name in before if after[name] != before[name]]  # the files that show the seed
    assert {"demo-heatmap.png", "results.json", "report.html"} <= set(changed), changed


def test_sigterm_is_an_exception_only_inside_the_block_and_a_foreign_handler_is_left_alone():
    from deadrelu.lab.termination import Terminated, sigterm_deferred, sigterm_raises

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this test process already handles SIGTERM")
    with pytest.raises(Terminated) as ended:
        with sigterm_raises():
            signal.raise_signal(signal.SIGTERM)
    assert ended.value.code == 143 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    steps = []
    with pytest.raises(Terminated):
        with sigterm_raises(), sigterm_deferred():
            signal.raise_signal(signal.SIGTERM)
            steps.append("went on")  # held back until the deferred block ends
    assert steps == ["went on"] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    seen = []
    signal.signal(signal.SIGTERM, lambda *_: seen.append("theirs"))
    try:
        with sigterm_raises():
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert seen == ["theirs"]


def _no_such_process() -> int:
    """A process id that no process has: above the kernel's largest, else one just reaped."""
    import subprocess

    pid_max = Path("/proc/sys/kernel/pid_max")
    if pid_max.exists():
        return int(pid_max.read_text()) + 1
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


@pytest.mark.skipif(os.name != "posix", reason="whether a process runs is asked with os.kill(pid, 0)")
def test_a_later_run_removes_only_what_a_killed_run_left(tmp_path):
    from deadrelu.lab.demo import OutputStage

    gone, alive = _no_such_process(), os.getppid()
    (tmp_path / "results.json").write_text("old")
    (tmp_path / "plot.png").write_bytes(b"old png")
    stale = [f".results.json.{gone}.abcd1234.tmp", f".plot.png.{gone}.x_y0z9qq.tmp",
             f".results.json.{gone}.bak"]  # a backup link still the same file as results.json
    os.link(tmp_path / "results.json", tmp_path / stale[2])
    for name in stale[:2]:
        (tmp_path / name).write_text("left by a killed run")
    kept = [
        f".results.json.{alive}.abcd1234.tmp",  # a run that is still running
        ".results.json.abcd1234.tmp",  # no process id in the name: not this stage's to judge
        f".notes.txt.{gone}.abcd1234.tmp",  # a name this stage does not write
        f".plot.png.{gone}.bak",  # not the same file as plot.png: the only copy of an earlier version
        f".results.json.{gone}.abcd1234.tmp.keep",  # not the naming
    ]
    for name in kept:
        (tmp_path / name).write_text("not stale")
    an_hour_ago = time.time() - 3600  # older than STALE_AFTER_S: a live write from another machine is younger
    for name in [*stale, *kept, "results.json", "plot.png"]:
        os.utime(tmp_path / name, (an_hour_ago, an_hour_ago))
    with OutputStage(tmp_path) as stage:
        stage.add("results.json", "new")
        stage.add("plot.png", b"new png")
        stage.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["results.json", "plot.png"])
    assert (tmp_path / "results.json").read_text() == "new" and (tmp_path / "plot.png").read_bytes() == b"new png"
    assert all((tmp_path / name).read_text() == "not stale" for name in kept)


# -- 4. Ctrl-C with worker processes -------------------------------------------------------------------
class _InlinePool:
    """A ProcessPoolExecutor stand-in: runs each task at once, records how it was made and started."""

    made: list[dict] = []

    def __init__(self, **kwargs):
        self.kwargs = dict(kwargs, sigint_at_submit=[])
        _InlinePool.made.append(self.kwargs)

    def submit(self, fn, *args, **kwargs):
        self.kwargs["sigint_at_submit"].append(signal.getsignal(signal.SIGINT))
        future = Future()
        future.set_result(fn(*args, **kwargs))
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def test_worker_processes_ignore_ctrl_c_so_only_the_parent_reports_it(monkeypatch):
    from deadrelu.lab.datasets import load_dataset
    from deadrelu.lab.demo import DemoSetting, ignore_interrupts, init_worker, seeds_story

    monkeypatch.setattr("concurrent.futures.ProcessPoolExecutor", _InlinePool)
    _InlinePool.made.clear()
    setting = DemoSetting(checkpoint_epoch=1, epochs=1, strategies=("control",), hidden=(8, 8))
    seeds_story(load_dataset("digits"), seeds=(0, 1), setting=setting, progress=False, workers=2)
    (pool,) = _InlinePool.made
    assert pool["initializer"] is init_worker and pool["initargs"] == (os.getpid(),)
    # workers start inside submit; started with SIGINT ignored, they are deaf to it while importing torch
    assert set(pool["sigint_at_submit"]) == {signal.SIG_IGN}
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # the parent's own handler is back
    previous = signal.getsignal(signal.SIGINT)
    try:
        ignore_interrupts()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, previous)
        monkeypatch.setattr("deadrelu.lab.demo._kill_me_with_parent", lambda: True)  # no prctl on the test process
        init_worker(os.getppid())  # called as a worker of this process's parent: it carries on
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the worker's initializer ignores Ctrl-C too
    finally:
        signal.signal(signal.SIGINT, previous)


def _spawned_children(pid: int) -> list[int]:
    """Live multiprocessing workers whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z" and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
def test_workers_end_when_the_demo_is_killed(tmp_path):
    # `timeout`, a CI runner or a closed terminal kills the parent without any cleanup; its Ctrl-C-proof seed
    # workers used to train on and then hang forever writing their result into a pipe nobody reads.
    import subprocess
    import time

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"), MPLBACKEND="agg")
    parent = subprocess.Popen(
        [sys.executable, "-m", "deadrelu", "demo", "--seeds", "2", "--workers", "2", "--epochs", "100000",
         "--no-progress", "--no-live", "--out", str(tmp_path / "out")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            workers = _spawned_children(parent.pid)
        assert len(workers) == 2, "the demo started no two workers"
        # Killed while they are still starting, workers exit on their own (the parent's pipe closes): wait
        # until both have got their seed and train (spawning and importing torch take a few CPU seconds).
        while min(_cpu_seconds(w) for w in workers) < 10 and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert parent.poll() is None and all(_alive(w) for w in workers)
        parent.send_signal(signal.SIGTERM)
        parent.wait()
        deadline = time.monotonic() + 120  # far longer than a worker needs to notice; it would train for hours
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "workers outlived the demo that started them"
        assert not (tmp_path / "out").exists()
    finally:
        if parent.poll() is None:
            parent.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


# -- 5./6. tables on a terminal ------------------------------------------------------------------------
def _on_a_terminal(monkeypatch, columns: int) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", str(columns))


def test_rich_tables_keep_bracketed_text(tmp_path, capsys, monkeypatch):
    _on_a_terminal(monkeypatch, 400)
    assert main(["experiment", "lr-sweep", "--seeds", "1", "--epochs", "1", "--no-progress",
                 "--out", str(tmp_path / "lr")]) == 0
    out = capsys.readouterr().out
    assert "┃" in out and "dead% h1 mean [min-max]" in out  # drawn by rich, the legend kept
    assert main(["demo", *SMALL, "--no-live", "--out", str(tmp_path / "demo")]) == 0
    assert "median [min-max] of 1 seeds" in capsys.readouterr().out


def test_a_narrow_terminal_never_cuts_a_number(tmp_path, capsys, monkeypatch):
    from deadrelu.lab.demo import result_table

    _on_a_terminal(monkeypatch, 80)
    assert main(["demo", *SMALL, "--no-live", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    cells = {c for row in result_table(json.loads((tmp_path / "results.json").read_text()))[1:] for c in row[1:]}
    numbers = {c for c in cells if re.fullmatch(r"[0-9./-]+", c)}
    assert numbers and all(re.search(rf"(?<![0-9.]){re.escape(c)}(?![0-9.])", out) for c in numbers)


# -- 7. the live view goes where its terminal is ---------------------------------------------------------
def test_the_live_view_writes_to_stderr_not_to_a_redirected_stdout(capsys):
    from deadrelu.lab.datasets import load_dataset
    from deadrelu.lab.demo import DemoSetting, rescue_story

    setting = DemoSetting(checkpoint_epoch=1, epochs=1, strategies=("control",), hidden=(8, 8))
    rescue_story(load_dataset("digits"), setting=setting, live=True, progress=False)
    captured = capsys.readouterr()
    assert "deadrelu step" in captured.err and "deadrelu step" not in captured.out


# -- 8. report: a field only a plot reads ---------------------------------------------------------------
@pytest.mark.parametrize("edit, field", [
    (lambda r: r["runs"][0].pop("baseline"), "baseline"),
    (lambda r: r["checkpoint"].update(firing_rates=[]), "results.json"),
])
def test_report_names_the_file_when_a_plot_cannot_be_drawn(edit, field, demo_dir, tmp_path, capsys):
    story = json.loads((demo_dir / "results.json").read_text())
    edit(story)
    (tmp_path / "results.json").write_text(json.dumps(story))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.json" in err and field in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# -- 9. --lr and lr-sweep -------------------------------------------------------------------------------
def test_lr_sweep_refuses_options_naming_only_cli_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "lr-sweep sweeps its own learning rates and takes no --lr" in help_text
    for option, value in (("--lr", "0.1"), ("--data-dir", str(tmp_path))):
        assert main(["experiment", "lr-sweep", option, value, "--seeds", "1", "--epochs", "1", "--no-progress",
                     "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and option in err
        assert not re.search(r"\b(lrs|hidden|samples|data_dir)\b", err)
    assert not (tmp_path / "o").exists()


# -- 10. a diverged activation in the plot ---------------------------------------------------------------
def test_the_activations_plot_marks_a_diverged_activation():
    from deadrelu.lab.plots import activation_bars

    rows = [{"activation": "relu", "dead_fraction": 0.25, "dormant_fraction": 0.5, "val_accuracy": 0.9,
             "diverged": False},
            {"activation": "elu", "dead_fraction": 0.0, "dormant_fraction": 0.0, "val_accuracy": None,
             "diverged": True}]
    fig = activation_bars({"rows": rows, "epochs": 1, "lr": 50.0, "dataset": {"name": "digits"}})
    left = fig.axes[0]
    assert [t.get_text() for t in left.texts] == ["diverged"]
    at_elu = [p for p in left.patches if abs(p.get_x() + p.get_width() / 2 - 1) < 0.45]
    assert at_elu and all(p.get_height() > 0 and p.get_hatch() for p in at_elu)  # no silent 0% bar


# -- 11. report given a file ----------------------------------------------------------------------------
def test_report_of_a_file_says_it_is_a_file(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    assert main(["report", str(tmp_path / "results.json")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "does not exist" not in err


# -- 12. the report's CSP -------------------------------------------------------------------------------
def test_the_reports_csp_allows_no_script_and_is_the_documented_one():
    from deadrelu.lab.experiments import lr_sweep
    from deadrelu.lab.html_report import CSP, render_html

    page = render_html([dict(lr_sweep(lrs=(0.01,), seeds=(0,), epochs=1, progress=False), _file="lr-sweep.json")])
    assert "<script" not in page.lower() and "script-src" not in page
    assert f'http-equiv="Content-Security-Policy" content="{CSP}"' in page
    assert f"`{CSP}`" in DOCS.read_text(encoding="utf-8")
