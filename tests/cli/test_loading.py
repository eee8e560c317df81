"""Model and data loaders behind the CLI, and the IDX reader."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from deadrelu.errors import DataError, DeadReluError
from deadrelu.lab.idx import read_idx, write_idx
from deadrelu.cli.loading import inputs_for, load_data, load_model


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["f-idx3-ubyte", "f-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, dtype, name):
    t = (torch.rand(4, 3, 2) * 100).to(dtype)
    write_idx(tmp_path / name, t)
    back = read_idx(tmp_path / name)
    assert back.dtype == dtype and torch.equal(back, t)


def test_idx_reads_the_standard_big_endian_layout(tmp_path):
    # Hand-written bytes: magic 0x00000803 (uint8, 3 dims), dims 2×1×2, then the pixels.
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, 1, 2, 3, 4])
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    assert read_idx(tmp_path / "x-idx3-ubyte.gz").tolist() == [[[1, 2]], [[3, 4]]]
    ints = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2]) + (258).to_bytes(4, "big") + (-1).to_bytes(4, "big", signed=True)
    (tmp_path / "i").write_bytes(ints)
    assert read_idx(tmp_path / "i").tolist() == [258, -1]


@pytest.mark.parametrize(
    "content, message",
    [(b"\x01\x02\x08\x01", "not an IDX file"), (bytes([0, 0, 8, 2, 0, 0]), "truncated"),
     (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), "header says 5 items")],
)  # fmt: skip
def test_idx_errors(tmp_path, content, message):
    (tmp_path / "bad").write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_idx(tmp_path / "bad")


def test_numpy_files(tmp_path):
    x = np.random.default_rng(0).normal(size=(7, 3))
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", labels=np.zeros(7), X=x)
    np.save(tmp_path / "img.npy", (np.arange(14) % 256).astype(np.uint8).reshape(7, 2))
    np.save(tmp_path / "ids.npy", np.arange(14).reshape(7, 2))
    a = load_data(str(tmp_path / "a.npy"))
    assert a.dtype == torch.float64 and a.shape == (7, 3)  # its own precision, until the model's dtype is known
    assert torch.equal(load_data(str(tmp_path / "b.npz")), a)
    # cast to the model's floating dtype: NumPy's float64 for a float32 model, kept for a float64 one
    assert inputs_for(torch.nn.Linear(3, 1), a).dtype == torch.float32
    assert torch.equal(inputs_for(torch.nn.Linear(3, 1).double(), a), a)
    assert inputs_for(torch.nn.Linear(3, 1).half(), a).dtype == torch.float16
    assert inputs_for(torch.nn.ReLU(), a).dtype == torch.float32  # no parameters: float32
    img = load_data(str(tmp_path / "img.npy"))
    assert img.dtype == torch.float32 and float(img.max()) <= 1.0
    assert load_data(str(tmp_path / "ids.npy")).dtype == torch.int64  # token ids stay integers
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with pytest.raises(DataError, match="expected numbers"):
        load_data(str(tmp_path / "s.npy"))


def test_csv(tmp_path):
    (tmp_path / "h.csv").write_text("a,b\n1,2\n3,4\n")
    assert load_data(str(tmp_path / "h.csv")).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    with pytest.raises(DataError, match="row 2 has 1 columns"):
        load_data(str(tmp_path / "ragged.csv"))
    (tmp_path / "text.csv").write_text("1,2\nx,4\n")
    with pytest.raises(DataError, match="line 2 has a non-numeric value"):
        load_data(str(tmp_path / "text.csv"))
    (tmp_path / "empty.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="no numeric rows"):
        load_data(str(tmp_path / "empty.csv"))


def test_pt_dict_and_flatten(tmp_path):
    torch.save({"images": torch.rand(5, 1, 4, 4), "labels": torch.zeros(5)}, tmp_path / "d.pt")
    assert load_data(str(tmp_path / "d.pt"), flatten=True).shape == (5, 16)
    torch.save({"a": torch.rand(2), "b": torch.rand(2)}, tmp_path / "amb.pt")
    with pytest.raises(DataError, match="name the inputs"):
        load_data(str(tmp_path / "amb.pt"))


def test_idx_directory_errors(tmp_path):
    with pytest.raises(DataError, match="no MNIST image file"):
        load_data(str(tmp_path))


def test_weights_that_do_not_fit(tmp_path):
    torch.save({"weight": torch.zeros(3, 3)}, tmp_path / "w.pt")
    (tmp_path / "m_mod.py").write_text("import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(DeadReluError, match="do not fit the model"):
            load_model("m_mod:make", str(tmp_path / "w.pt"))
        assert isinstance(load_model("m_mod:make"), torch.nn.Module)
    finally:
        sys.path.remove(str(tmp_path))
