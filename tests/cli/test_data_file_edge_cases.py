"""Data files and data functions at the edges of what `--data` reads: --flatten on a data function's
batches, CSVs with a byte-order mark, NumPy files in big-endian byte order, longdouble and uint64."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from deadrelu.cli.loading import GuardedBatches, load_data
from deadrelu.errors import DataError
from deadrelu.lab.datasets import load_dataset


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # as in test_cli_scan.py: keep any PYTHONPATH the suite runs under (a source checkout) in front
    paths = [p for p in (os.environ.get("PYTHONPATH"), str(Path(__file__).parents[1])) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(
        [sys.executable, "-m", "deadrelu", *args], capture_output=True, text=True, cwd=cwd, timeout=120, env=env
    )


# --- --flatten on the batches of a package.module:function ---------------------------------------


def test_flatten_applies_to_each_batch_of_a_data_function_end_to_end(tmp_path):
    (tmp_path / "flatmods.py").write_text(textwrap.dedent("""
        import torch
        def net():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        def whole():
            torch.manual_seed(0)
            return torch.randn(30, 2, 4)
        def batches():
            return list(whole().split(10))
        def pairs():
            return [(b, torch.zeros(len(b))) for b in whole().split(10)]
        def dicts():
            # a dict batch is keyword arguments: Sequential.forward's is named input
            return ({"input": b, "labels": torch.zeros(len(b))} for b in whole().split(10))
        def single_samples():
            return list(torch.randn(3, 8))
    """))
    expected = run_cli("scan", "flatmods:net", "--data", "flatmods:whole", "--flatten", "--batch-size", "10",
                       "--no-progress", cwd=tmp_path)
    assert expected.returncode == 0, expected.stderr
    assert "3 batch(es), 30 sample(s)" in expected.stdout
    for fn in ("batches", "pairs", "dicts"):
        got = run_cli("scan", "flatmods:net", "--data", f"flatmods:{fn}", "--flatten", "--no-progress", cwd=tmp_path)
        assert got.returncode == 0, (fn, got.stderr)
        assert got.stdout == expected.stdout, fn
    # Unbatched samples cannot be flattened per sample: one line, exit 2, no traceback.
    bad = run_cli("scan", "flatmods:net", "--data", "flatmods:single_samples", "--flatten", "--no-progress",
                  cwd=tmp_path)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "batch 1 from flatmods:single_samples has shape (8,)" in bad.stderr
    assert "batch dimension first" in bad.stderr


Pair = collections.namedtuple("Pair", "inputs target")


def test_flatten_keeps_each_batch_form_and_flattens_only_the_inputs():
    x, y = torch.arange(48.0).reshape(4, 3, 2, 2), torch.arange(4)
    flat = x.reshape(4, 12)
    batches = [x, (x, y), [x, y], Pair(x, y), {"images": x, "labels": y}, {"pixels": x, "y": y},
               torch.empty(0, 3, 2, 2)]
    out = list(GuardedBatches(batches, "mod:fn", flatten=True))
    assert torch.equal(out[0], flat)
    assert type(out[1]) is tuple and torch.equal(out[1][0], flat) and out[1][1] is y
    assert type(out[2]) is list and torch.equal(out[2][0], flat) and out[2][1] is y
    assert type(out[3]) is Pair and torch.equal(out[3].inputs, flat) and out[3].target is y
    assert torch.equal(out[4]["images"], flat) and out[4]["labels"] is y
    assert torch.equal(out[5]["pixels"], flat) and out[5]["y"] is y  # the only key that is not a label
    assert out[6].shape == (0, 12)  # an empty batch flattens too (reshape(0, -1) cannot)
    # without flatten the batches are passed on untouched
    assert all(a is b for a, b in zip(GuardedBatches(batches, "mod:fn"), batches))


def test_flatten_through_load_data_of_a_spec(tmp_path, monkeypatch):
    (tmp_path / "flatspec_mod.py").write_text(
        "import torch\ndef gen():\n    return (torch.ones(5, 2, 3) for _ in range(2))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    shapes = [b.shape for b in load_data("flatspec_mod:gen", flatten=True)]
    assert shapes == [(5, 6), (5, 6)]
    assert [b.shape for b in load_data("flatspec_mod:gen")] == [(5, 2, 3), (5, 2, 3)]


@pytest.mark.parametrize(
    "batch, message",
    [
        (torch.tensor(1.0), r"batch 1 from mod:fn has shape \(\): --flatten needs a batch dimension first"),
        ((), r"batch 1 from mod:fn is an empty tuple"),
        (("a", 1), r"the inputs \(first item\) of batch 1 from mod:fn is a str, not a tensor"),
        ({"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3)},
         r"batch 1 from mod:fn holds \['attention_mask', 'input_ids'\]; name the inputs one of x"),
        ({"x": [1, 2]}, r"entry 'x' of batch 1 from mod:fn is a list, not a tensor"),
        (3, r"batch 1 from mod:fn is a int: --flatten flattens a tensor"),
        (torch.ones(2, 3).to_sparse(), r"batch 1 from mod:fn holds a sparse"),
        (torch.nn.utils.rnn.pack_sequence([torch.ones(3, 2), torch.ones(2, 2)]), r"PackedSequence"),
    ],
)
def test_flatten_refuses_a_batch_it_cannot_flatten_in_one_line(batch, message):
    with pytest.raises(DataError, match=message) as info:
        list(GuardedBatches([batch], "mod:fn", flatten=True))
    assert "\n" not in str(info.value)


# --- CSV with a byte-order mark --------------------------------------------------------------------


@pytest.mark.parametrize("header", ["", "a,b,c\n"])
def test_csv_with_a_byte_order_mark_keeps_its_first_row(tmp_path, header):
    text = header + "1.5,2,3\n4,5,6\n"
    (tmp_path / "bom.csv").write_text(text, encoding="utf-8-sig")  # as Excel's "CSV UTF-8" saves
    (tmp_path / "plain.csv").write_text(text, encoding="utf-8")
    assert (tmp_path / "bom.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    bom = load_data(str(tmp_path / "bom.csv"))
    assert bom.tolist() == [[1.5, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert torch.equal(bom, load_data(str(tmp_path / "plain.csv")))


# --- NumPy byte order, longdouble, uint64 ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [">f2", ">f4", ">f8", ">i2", ">i4", ">i8", ">u2", ">u4", ">u8", "<f4", "<i8"])
def test_big_endian_numpy_files_load_as_their_native_values(tmp_path, dtype):
    values = (np.arange(24).reshape(6, 4) * 3 + 1).astype(dtype)
    np.save(tmp_path / "x.npy", values)
    np.savez(tmp_path / "x.npz", x=values, y=np.arange(6).astype(">i8"))
    native = values.astype(values.dtype.newbyteorder("="))
    expected = torch.from_numpy(native if native.dtype.kind == "f" else native.astype(np.int64))  # ids: int64
    for name in ("x.npy", "x.npz"):
        got = load_data(str(tmp_path / name))
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


@pytest.mark.parametrize("order", ["=", ">"])
def test_longdouble_becomes_float64(tmp_path, order):
    values = np.linspace(-2, 2, 15).reshape(5, 3).astype(np.dtype(np.longdouble).newbyteorder(order))
    np.save(tmp_path / "x.npy", values)
    got = load_data(str(tmp_path / "x.npy"))
    assert got.dtype == torch.float64
    assert torch.equal(got, torch.from_numpy(values.astype(np.float64)))


@pytest.mark.skipif(np.finfo(np.longdouble).max <= np.finfo(np.float64).max,
                    reason="longdouble is float64 on this platform")
def test_longdouble_past_float64s_range_is_refused(tmp_path):
    values = np.ones((2, 3), dtype=np.longdouble)
    values[1, 2] = np.longdouble(10) ** 400
    values[0, 0] = np.inf  # an infinity already in the file is data, not an overflow
    np.save(tmp_path / "x.npy", values)
    with pytest.raises(DataError, match=r"holds float(96|128) values beyond float64's range"):
        load_data(str(tmp_path / "x.npy"))


@pytest.mark.parametrize("dtype", ["<u8", ">u8"])
def test_uint64_values_past_int64_are_refused_not_wrapped(tmp_path, dtype):
    values = np.array([[1, 2], [2**63, 3]], dtype=dtype)
    np.save(tmp_path / "x.npy", values)
    with pytest.raises(DataError, match=r"holds uint64 value 9223372036854775808, past int64's largest"):
        load_data(str(tmp_path / "x.npy"))
    np.save(tmp_path / "ok.npy", np.array([[0, 2**63 - 1]], dtype=dtype))
    assert load_data(str(tmp_path / "ok.npy")).tolist() == [[0, 2**63 - 1]]


def test_other_numpy_dtypes_are_one_data_error(tmp_path):
    np.save(tmp_path / "t.npy", np.array([["2020-01-01"]], dtype="M8[D]"))
    with pytest.raises(DataError, match=r"holds datetime64\[D\] data; expected numbers"):
        load_data(str(tmp_path / "t.npy"))


def test_big_endian_scan_end_to_end_is_not_a_traceback(tmp_path):
    np.save(tmp_path / "be.npy", np.random.default_rng(0).normal(size=(20, 8)).astype(">f4"))
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())), tmp_path / "m.pt")
    got = run_cli("scan", "m.pt", "--data", "be.npy", "--no-progress", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert "20 sample(s)" in got.stdout


# --- MNIST-1D .npz in big-endian byte order --------------------------------------------------------


def _mnist1d_arrays(x_dtype: str, y_dtype: str) -> dict:
    r = np.random.RandomState(0)
    return {"x": r.rand(40, 12).astype(x_dtype), "y": (np.arange(40) % 10).astype(y_dtype),
            "x_test": r.rand(10, 12).astype(x_dtype), "y_test": (np.arange(10) % 10).astype(y_dtype)}


@pytest.mark.parametrize("x_dtype, y_dtype", [(">f8", ">i8"), (">f4", ">u2"), ("longdouble", "<i8")])
def test_mnist1d_npz_of_any_byte_order_loads_like_the_native_one(tmp_path, x_dtype, y_dtype):
    (tmp_path / "odd").mkdir()
    (tmp_path / "native").mkdir()
    np.savez(tmp_path / "odd" / "mnist1d.npz", **_mnist1d_arrays(x_dtype, y_dtype))
    native = {k: v.astype(np.float64 if k.startswith("x") else np.int64)
              for k, v in _mnist1d_arrays(x_dtype, y_dtype).items()}
    np.savez(tmp_path / "native" / "mnist1d.npz", **native)
    for standardize in (False, True):
        got = load_dataset("mnist1d", data_dir=tmp_path / "odd", standardize=standardize)
        want = load_dataset("mnist1d", data_dir=tmp_path / "native", standardize=standardize)
        for field in ("x_train", "y_train", "x_val", "y_val"):
            a, b = getattr(got, field), getattr(want, field)
            assert a.dtype == b.dtype and torch.equal(a, b), (field, standardize)
        assert got.x_train.dtype == torch.float32 and got.y_train.dtype == torch.int64
