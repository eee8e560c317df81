"""Fuzzing ``deadrelu scan`` (hypothesis): random bytes, damaged files and random option strings.

Whatever the input, the command exits 0 or 2; a 2 is exactly one line on stderr; never a
traceback; the input file is byte-for-byte unchanged. Calls ``main`` in process (fast) with
a bounded number of examples.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from deadrelu.cli.main import main  # noqa: E402
from deadrelu.lab.idx import write_idx  # noqa: E402

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "fuzz_mods.py").write_text(
        textwrap.dedent(
            """
            import torch

            def make():
                torch.manual_seed(0)
                return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            """
        )
    )
    torch.save(torch.randn(12, 4), d / "x.pt")
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()).state_dict(), d / "sd.pt")
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))


def run(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["scan", *args, "--no-progress"])
        except SystemExit as done:  # argparse usage errors
            code = done.code
    return code, err.getvalue()


def check(code: int, err: str) -> None:
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("deadrelu scan: error: "), err


def valid_bytes(kind: str, tmp: Path) -> bytes:
    """A well-formed file of each data format, to damage."""
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    path = tmp / f"valid.{kind}"
    if kind == "pt":
        torch.save(torch.from_numpy(x), path)
    elif kind == "npy":
        np.save(path, x)
    elif kind == "npz":
        np.savez(path, x=x, labels=np.arange(6))
    elif kind == "csv":
        path.write_text("a,b,c,d\n" + "\n".join(",".join(f"{v:.3f}" for v in row) for row in x))
    elif kind in ("idx", "idx.gz"):
        write_idx(path, torch.from_numpy((np.abs(x) * 40).astype(np.uint8)).reshape(6, 2, 2))
        raw = path.read_bytes()
        return gzip.compress(raw) if kind == "idx.gz" else raw
    return path.read_bytes()


_NAMES = {"pt": "data.pt", "npy": "data.npy", "npz": "data.npz", "csv": "data.csv",
          "idx": "t10k-images-idx3-ubyte", "idx.gz": "t10k-images-idx3-ubyte.gz"}  # fmt: skip


def scan_data_file(work: Path, kind: str, content: bytes) -> tuple[int, str]:
    path = work / _NAMES[kind]
    path.write_bytes(content)
    code, err = run(["fuzz_mods:make", "--data", str(path)])
    assert path.read_bytes() == content  # the input is never modified
    return code, err


@FUZZ
@given(kind=st.sampled_from(sorted(_NAMES)), content=st.binary(max_size=600))
def test_random_bytes_as_data(work, kind, content):
    check(*scan_data_file(work, kind, content))


@FUZZ
@given(kind=st.sampled_from(sorted(_NAMES)), cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=3))
def test_truncated_or_corrupted_data_files(work, tmp_path_factory, kind, cut, flips):
    raw = bytearray(valid_bytes(kind, tmp_path_factory.getbasetemp()))
    for where, value in flips:
        raw[min(int(where * len(raw)), len(raw) - 1)] = value
    check(*scan_data_file(work, kind, bytes(raw[: int(cut * len(raw))])))


@FUZZ
@given(name=st.sampled_from(["model.pt", "model.pt2", "model.pth", "model.bin"]), content=st.binary(max_size=600),
       trust=st.booleans())  # fmt: skip
@example(name="model.pt2", content=b"\x00" * 100, trust=True)  # torch 2.14's export.load logs a traceback first
@example(name="model.pt", content=b"\x1f\x8b", trust=False)  # a cut gzip header: tarfile.is_tarfile raised EOFError
def test_random_bytes_as_model_or_weights(work, name, content, trust):
    path = work / name
    path.write_bytes(content)
    flag = ["--trust-pickle"] if trust else []
    check(*run([str(path), *flag, "--data", str(work / "x.pt")]))
    check(*run(["fuzz_mods:make", "--weights", str(path), *flag, "--data", str(work / "x.pt")]))
    assert path.read_bytes() == content


@FUZZ
@given(cut=st.floats(0, 1))
def test_truncated_state_dict(work, tmp_path_factory, cut):
    raw = (work / "sd.pt").read_bytes()
    path = tmp_path_factory.getbasetemp() / "cut_sd.pt"
    path.write_bytes(raw[: int(cut * len(raw))])
    check(*run(["fuzz_mods:make", "--weights", str(path), "--data", str(work / "x.pt")]))


_NUMBERISH = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["1e20", "-0", "0x10", "1_000", " 3", "nan", "-inf", "1e-400", "", "٣"]),
    st.text(max_size=6),
)


@FUZZ
@given(
    option=st.sampled_from(["--threshold", "--batch-size", "--dormant-tau", "--asleep-rate", "--max-batches"]),
    value=_NUMBERISH,
)
def test_random_numeric_option_strings(work, option, value):
    before = (work / "x.pt").read_bytes()
    code, err = run(["fuzz_mods:make", "--data", str(work / "x.pt"), f"{option}={value}"])
    check(code, err)
    assert (work / "x.pt").read_bytes() == before
    if code == 0 and option in ("--threshold", "--dormant-tau", "--asleep-rate"):
        assert np.isfinite(float(value))  # nan and inf never reach the scan
