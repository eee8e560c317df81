"""Data set loaders: digits, MNIST from IDX files the tests write, MNIST-1D from .npz, regression; missing data."""

from __future__ import annotations

import pytest
import torch

from deadrelu.lab.datasets import MNIST_FILES, load_dataset
from deadrelu.errors import DataError
from deadrelu.lab.idx import write_idx


def _write_mnist(root, n_train=30, n_test=12, gz=False):
    """Small MNIST-shaped IDX files with a known pattern: image i is filled with the value i."""
    g = torch.Generator().manual_seed(1)
    x_tr = torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.int64).to(torch.uint8)
    y_tr = (torch.arange(n_train) % 10).to(torch.uint8)
    x_te = torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.int64).to(torch.uint8)
    y_te = (torch.arange(n_test) % 10).to(torch.uint8)
    suffix = ".gz" if gz else ""
    root.mkdir(parents=True, exist_ok=True)
    for name, t in zip(MNIST_FILES, (x_tr, y_tr, x_te, y_te)):
        write_idx(root / (name + suffix), t)
    return x_tr, y_tr, x_te, y_te


def test_digits_split_is_seeded_stratified_in_unit_range_or_standardised():
    a = load_dataset("digits", seed=0, standardize=True)
    b = load_dataset("digits", seed=0, standardize=True)
    c = load_dataset("digits", seed=1, standardize=True)
    assert len(a.x_train) + len(a.x_val) == 1797
    assert a.features == 64 and a.classes == 10 and a.task == "classification"
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.y_val, c.y_val)
    # Every class is in the validation split in proportion (stratified, 20%).
    counts = torch.bincount(a.y_val, minlength=10)
    assert counts.min() >= 30 and counts.max() <= 40
    # Standardised with training statistics: training features have mean 0 and std 1 (or are constant).
    assert a.x_train.mean(0).abs().max() < 1e-5
    std = a.x_train.std(0)
    assert torch.all(((std - 1).abs() < 1e-4) | (std == 0))
    # The default is the lesson's input: the raw pixel values 0..16 divided by 16, same split.
    from sklearn.datasets import load_digits

    raw = load_dataset("digits", seed=0)
    assert torch.equal(raw.y_train, a.y_train)
    pixels = torch.as_tensor(load_digits().data, dtype=torch.float32)
    rows = {tuple(r.tolist()) for r in pixels / 16}
    assert all(tuple(r.tolist()) in rows for r in raw.x_train[:50])
    assert float(raw.x_train.min()) == 0.0 and float(raw.x_train.max()) == 1.0


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_written_idx_files(tmp_path, gz):
    x_tr, y_tr, x_te, y_te = _write_mnist(tmp_path, gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path, standardize=True)
    assert ds.x_train.shape == (30, 784) and ds.x_val.shape == (12, 784)
    assert torch.equal(ds.y_train, y_tr.long()) and torch.equal(ds.y_val, y_te.long())
    raw = x_tr.reshape(30, -1).float()
    # By default the inputs are ToTensor's: pixels / 255.
    assert torch.equal(load_dataset("mnist", data_dir=tmp_path).x_train, raw / 255.0)
    # Standardised: the pixels affinely rescaled, same order of values, training mean 0, std 1.
    slope = (ds.x_train[0, 1] - ds.x_train[0, 0]) / (raw[0, 1] - raw[0, 0])
    assert torch.allclose(ds.x_train, (raw - raw.mean()) * slope, atol=1e-4)
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-4


def test_mnist_in_torchvision_layout_and_limit(tmp_path):
    _write_mnist(tmp_path / "MNIST" / "raw")
    ds = load_dataset("mnist", data_dir=tmp_path, limit=10)
    assert len(ds.x_train) == 10 and len(ds.x_val) == 10


def test_mnist_missing_files_names_them(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("mnist", data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg
    for name in MNIST_FILES:
        assert name in msg


def test_mnist_disagreeing_files(tmp_path):
    _write_mnist(tmp_path)
    write_idx(tmp_path / MNIST_FILES[1], torch.zeros(7, dtype=torch.uint8))
    with pytest.raises(DataError, match="disagree"):
        load_dataset("mnist", data_dir=tmp_path)


def test_mnist1d_from_npz(tmp_path):
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    x, x_test = rng.normal(size=(40, 40)) * 3 + 1, rng.normal(size=(10, 40))
    y, y_test = np.arange(40) % 10, np.arange(10)
    np.savez(tmp_path / "mnist1d.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    ds = load_dataset("mnist1d", data_dir=tmp_path, standardize=True)
    assert ds.x_train.shape == (40, 40) and ds.x_val.shape == (10, 40)
    assert torch.equal(ds.y_train, torch.as_tensor(y).long())
    assert ds.x_train.mean(0).abs().max() < 1e-5
    unit = load_dataset("mnist1d", data_dir=tmp_path)  # default: min-max scaled with training statistics
    assert float(unit.x_train.min()) == 0.0 and float(unit.x_train.max()) == pytest.approx(1.0)
    xt = torch.as_tensor(x, dtype=torch.float32)
    assert torch.allclose(unit.x_train, (xt - xt.min()) / (xt.max() - xt.min()), atol=1e-6)


def test_mnist1d_npz_missing_array(tmp_path):
    np = pytest.importorskip("numpy")
    np.savez(tmp_path / "mnist1d.npz", x=np.zeros((4, 40)), y=np.zeros(4))
    with pytest.raises(DataError, match="x_test"):
        load_dataset("mnist1d", data_dir=tmp_path)


def test_mnist1d_missing_file(tmp_path):
    with pytest.raises(DataError, match="mnist1d.npz"):
        load_dataset("mnist1d", data_dir=tmp_path)


def test_mnist1d_without_package_or_file_says_what_to_install():
    from deadrelu._imports import available

    if available("mnist1d"):
        pytest.skip("mnist1d is installed here")
    with pytest.raises(DataError, match=r"deadrelu\[mnist1d\]"):
        load_dataset("mnist1d")


def test_regression_follows_its_formula():
    ds = load_dataset("regression", seed=3)
    assert ds.x_train.shape == (50, 4) and ds.y_train.shape == (50, 1) and ds.task == "regression"
    x = ds.x_train
    clean = 2 * x[:, 0] - 1.5 * x[:, 1] + 0.5 * x[:, 2] * x[:, 3]
    residual = ds.y_train[:, 0] - clean
    assert 0.03 < float(residual.std()) < 0.2  # only the N(0, 0.1²) noise is left
    assert torch.equal(ds.x_train, load_dataset("regression", seed=3).x_train)


def test_unknown_dataset_and_bad_arguments():
    with pytest.raises(DataError, match="choose one of"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.5)
    with pytest.raises(DataError, match="at least 2"):
        load_dataset("regression", samples=1)


def test_mnist1d_generated_by_the_package_leaves_numpy_rng_alone():
    pytest.importorskip("mnist1d.data")
    np = pytest.importorskip("numpy")
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    ds = load_dataset("mnist1d", seed=0)
    assert np.random.rand() == expected  # the package reseeds numpy globally; we give the state back
    assert ds.x_train.shape == (4000, 40) and ds.x_val.shape == (1000, 40)
    assert sorted(torch.unique(ds.y_train).tolist()) == list(range(10))
    assert torch.equal(ds.x_train, load_dataset("mnist1d", seed=0).x_train)


def _npz(path, **changes):
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    arrays = dict(x=rng.normal(size=(20, 8)), y=np.arange(20) % 10, x_test=rng.normal(size=(10, 8)), y_test=np.arange(10))
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(x_test=[[0.0] * 9] * 10), "x holds samples of length 8 but x_test of length 9"),
        (dict(y=[10] * 20), "y holds label 10; MNIST-1D labels are 0..9"),
        (dict(y_test=[-1] * 10), "y_test holds label -1"),
        (dict(y=[1.0] * 20), "y must hold one integer label per sample (N,), got float64 of shape (20,)"),
        (dict(y=[[1]] * 20), "y must hold one integer label per sample (N,), got int64 of shape (20, 1)"),
        (dict(y=[1] * 19), "x holds 20 samples but y holds 19 labels"),
        (dict(x=[[float("inf")] * 8] * 20), "x holds 160 NaN or infinite value(s)"),
        (dict(x_test=[[float("nan")] + [0.0] * 7] * 10), "x_test holds 10 NaN or infinite value(s)"),
        (dict(x=[["a"] * 8] * 20), "x must hold numbers of shape (samples, length), got <U1"),
        (dict(x=[True] * 20), "x must hold numbers of shape (samples, length), got bool of shape (20,)"),
        (dict(x_test=[[]] * 10), "x_test holds no data (shape (10, 0))"),
    ],
)
def test_mnist1d_npz_is_validated_like_mnist(tmp_path, changes, message):
    path = _npz(tmp_path / "mnist1d.npz", **changes)
    with pytest.raises(DataError) as info:
        load_dataset("mnist1d", data_dir=tmp_path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_mnist1d_npz_that_is_no_npz_is_one_data_error(tmp_path):
    np = pytest.importorskip("numpy")
    np.save(tmp_path / "one.npy", np.zeros((4, 4)))
    (tmp_path / "one.npy").rename(tmp_path / "mnist1d.npz")
    with pytest.raises(DataError, match="holds a single array"):
        load_dataset("mnist1d", data_dir=tmp_path)
    (tmp_path / "mnist1d.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="cannot read .*mnist1d.npz as .npz"):
        load_dataset("mnist1d", data_dir=tmp_path)


@pytest.mark.parametrize("name", ["digits", "regression"])
def test_a_data_dir_for_a_dataset_that_reads_no_files_is_refused(tmp_path, name):
    with pytest.raises(DataError, match=f"the {name} data set reads no files"):
        load_dataset(name, data_dir=tmp_path)
