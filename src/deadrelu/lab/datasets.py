"""Small, local data sets for the demo and the experiments; nothing is ever downloaded.

* ``digits``: scikit-learn's 1,797 real 8×8 handwritten digits (shipped inside scikit-learn).
* ``mnist``: the standard MNIST IDX files from a directory you name (``.gz`` or not), or
  through torchvision when it is installed and already has the files.
* ``mnist1d``: MNIST-1D generated locally by the ``mnist1d`` package, or read from a
  ``mnist1d.npz`` file (arrays ``x``, ``y``, ``x_test``, ``y_test``) in a directory you name.
* ``regression``: the synthetic task ``y = 2x₀ − 1.5x₁ + 0.5x₂x₃ + noise`` (50 samples).

Every loader returns a :class:`Dataset` of float32 inputs. By default they are what the
lesson on dead ReLUs feeds a network: pixel intensities in [0, 1] (digits ÷ 16, MNIST ÷ 255,
as ``torchvision``'s ``ToTensor`` gives; MNIST-1D min–max scaled with training-split
statistics). ``standardize=True`` instead gives every feature zero mean and unit variance
over the training split (so validation data never leaks into training) — which, measured,
protects ReLU units: see ``deadrelu experiment preprocessing``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .._imports import require
from ..errors import DataError
from .idx import read_idx

__all__ = ["Dataset", "DATASETS", "MNIST_FILES", "load_dataset"]

#: Names :func:`load_dataset` accepts.
DATASETS = ("digits", "mnist", "mnist1d", "regression")

#: The four standard MNIST files: (train images, train labels, test images, test labels).
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class Dataset:
    """A train/validation split held as tensors.

    Attributes:
        name: the data set's name, e.g. ``"digits"``.
        x_train: float32 inputs, ``(n_train, features)``.
        y_train: int64 class labels ``(n_train,)`` or float32 targets ``(n_train, 1)``.
        x_val: float32 validation inputs.
        y_val: validation labels / targets.
        task: ``"classification"`` or ``"regression"``.
        classes: number of classes (0 for regression).
        source: where the data came from, in words.

    Example:
        >>> ds = load_dataset("regression", seed=0)
        >>> ds.x_train.shape, ds.task
        (torch.Size([50, 4]), 'regression')
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    task: str
    classes: int
    source: str

    @property
    def features(self) -> int:
        """Input width."""
        return int(self.x_train.shape[1])

    @property
    def outputs(self) -> int:
        """Output width a model needs: the number of classes, or 1 for regression."""
        return self.classes if self.task == "classification" else 1

    def describe(self) -> dict:
        """A JSON-ready summary (sizes and source, no data)."""
        return {
            "name": self.name,
            "task": self.task,
            "train": int(self.x_train.shape[0]),
            "validation": int(self.x_val.shape[0]),
            "features": self.features,
            "classes": self.classes,
            "source": self.source,
        }


def _standardise(x_train: torch.Tensor, x_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each feature by training-set mean and std; constant features keep std 1 (no division by 0)."""
    mean = x_train.mean(0, keepdim=True)
    std = x_train.std(0, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x_train - mean) / std, (x_val - mean) / std


def _unit_range(x_train: torch.Tensor, x_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min–max scale to [0, 1] with the training split's global range (validation may leave it slightly)."""
    low, high = x_train.min(), x_train.max()
    span = (high - low).clamp_min(1e-8)
    return (x_train - low) / span, (x_val - low) / span


def _stratified_split(y: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class split, so both halves keep the class balance."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _subsample(x: torch.Tensor, y: torch.Tensor, limit: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if limit is None or limit >= len(x):
        return x, y
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(x), generator=g)[:limit].sort().values
    return x[keep], y[keep]


def _digits(seed: int, val_fraction: float, standardize: bool) -> Dataset:
    datasets = require("sklearn.datasets", "demo")
    bunch = datasets.load_digits()
    # Pixel intensities are whole numbers 0..16; ÷ 16 puts them in [0, 1] like MNIST's ToTensor.
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    tr, va = _stratified_split(y, val_fraction, seed)
    x_tr, x_va = _standardise(x[tr], x[va]) if standardize else (x[tr], x[va])
    scaling = "standardised per feature" if standardize else "pixels / 16, in [0, 1]"
    return Dataset("digits", x_tr, y[tr], x_va, y[va], "classification", 10,
                   f"scikit-learn load_digits (1,797 real 8x8 images, shipped with scikit-learn; {scaling})")


def _find_mnist(data_dir: Path) -> list[Path] | None:
    """The four MNIST files under ``data_dir`` (or torchvision's ``MNIST/raw`` below it), or None."""
    for base in (data_dir, data_dir / "MNIST" / "raw", data_dir / "raw"):
        found = []
        for stem in MNIST_FILES:
            for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
                if (base / name).is_file():
                    found.append(base / name)
                    break
        if len(found) == len(MNIST_FILES):
            return found
    return None


def _mnist_via_torchvision(root: Path) -> tuple[torch.Tensor, ...] | None:
    """Read MNIST through torchvision from files it already has; download=False, always."""
    if not _available("torchvision"):
        return None
    tv = require("torchvision.datasets", "torchvision")
    try:
        train = tv.MNIST(str(root), train=True, download=False)
        test = tv.MNIST(str(root), train=False, download=False)
    except (RuntimeError, OSError):
        return None
    return train.data, train.targets, test.data, test.targets


def _available(module: str) -> bool:
    from .._imports import available

    return available(module)


def _check_mnist(arrays: tuple[torch.Tensor, ...], names: tuple[str, ...]) -> None:
    """MNIST's shape: images N×H×W uint8, labels N integers in 0..9, train and test images the same H×W."""
    for images, labels, img_name, lab_name in ((arrays[0], arrays[1], names[0], names[1]),
                                               (arrays[2], arrays[3], names[2], names[3])):
        if images.ndim != 3 or images.dtype != torch.uint8:
            raise DataError(f"{img_name} must hold uint8 images (N, height, width), "
                            f"got {images.dtype} of shape {tuple(images.shape)}")
        if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise DataError(f"{lab_name} must hold one integer label per image (N,), "
                            f"got {labels.dtype} of shape {tuple(labels.shape)}")
        if len(images) == 0:
            raise DataError(f"{img_name} holds no images")
        if len(images) != len(labels):
            raise DataError(f"{img_name} holds {len(images)} images but {lab_name} holds {len(labels)} labels")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high > 9:
            raise DataError(f"{lab_name} holds label {high if high > 9 else low}; MNIST labels are 0..9")
    if arrays[0].shape[1:] != arrays[2].shape[1:]:
        raise DataError(f"{names[0]} holds {tuple(arrays[0].shape[1:])} images but {names[2]} holds "
                        f"{tuple(arrays[2].shape[1:])} ones; train and test images must be the same size")


def _mnist(data_dir: str | os.PathLike[str] | None, seed: int, limit: int | None, standardize: bool) -> Dataset:
    root = Path(data_dir).expanduser() if data_dir is not None else Path("~/.cache/deadrelu/mnist").expanduser()
    files = _find_mnist(root)
    if files is not None:
        x_tr, y_tr, x_va, y_va = (read_idx(p) for p in files)
        names = tuple(str(p) for p in files)
        source = f"MNIST IDX files in {files[0].parent}"
    else:
        arrays = _mnist_via_torchvision(root)
        if arrays is None:
            raise DataError(
                f"MNIST files not found in {root}: put {', '.join(MNIST_FILES)} (each may end in .gz) "
                f"in that directory, or pass --data-dir DIR naming the directory that holds them "
                "(deadrelu never downloads data)"
            )
        x_tr, y_tr, x_va, y_va = arrays
        names = tuple(f"torchvision's MNIST {part} in {root}" for part in
                      ("train images", "train labels", "test images", "test labels"))
        source = f"MNIST through torchvision from {root}"
    _check_mnist((x_tr, y_tr, x_va, y_va), names)
    x_tr, y_tr = _subsample(x_tr, y_tr, limit, seed)
    x_va, y_va = _subsample(x_va, y_va, limit, seed + 1)
    x_tr = x_tr.reshape(len(x_tr), -1).float() / 255.0
    x_va = x_va.reshape(len(x_va), -1).float() / 255.0
    if standardize:
        # One global mean/std (not per pixel): border pixels are constant 0 and per-pixel scaling
        # would blow up the few that are almost constant.
        mean, std = x_tr.mean(), x_tr.std().clamp_min(1e-8)
        x_tr, x_va = (x_tr - mean) / std, (x_va - mean) / std
    source += "; standardised" if standardize else "; pixels / 255, in [0, 1]"
    return Dataset("mnist", x_tr, y_tr.long(), x_va, y_va.long(), "classification", 10, source)


def _read_mnist1d_npz(data_dir: str | os.PathLike[str]) -> tuple[dict, str]:
    """The four arrays of a ``mnist1d.npz`` (``data_dir`` or the file in it) and the file's name."""
    path = Path(data_dir).expanduser()
    path = path / "mnist1d.npz" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"no MNIST-1D file at {path}: write an .npz with arrays x, y, x_test, y_test there")
    np = require("numpy", "cli")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path} holds a single array, not an .npz with arrays x, y, x_test, y_test")
        with loaded as z:
            missing = [k for k in ("x", "y", "x_test", "y_test") if k not in z.files]
            if missing:
                raise DataError(f"{path} lacks array {missing[0]!r}; MNIST-1D needs x, y, x_test, y_test")
            arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
    except DataError:
        raise
    except Exception as err:  # a damaged zip, pickled objects, a truncated array
        raise DataError(f"cannot read {path} as .npz: {type(err).__name__}: {err}") from None
    return arrays, str(path)


def _check_mnist1d(arrays: dict, where: str) -> None:
    """MNIST-1D's shape: inputs (N, length) of finite numbers, the same length in both splits,
    labels N integers in 0..9; one DataError naming ``where`` and the array otherwise."""
    np = require("numpy", "cli")
    for xs, ys in (("x", "y"), ("x_test", "y_test")):
        x, y = np.asarray(arrays[xs]), np.asarray(arrays[ys])
        if x.dtype.kind not in "iuf" or x.ndim != 2:
            raise DataError(f"{where}: {xs} must hold numbers of shape (samples, length), "
                            f"got {x.dtype} of shape {x.shape}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise DataError(f"{where}: {xs} holds no data (shape {x.shape})")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DataError(f"{where}: {xs} holds {int((~np.isfinite(x)).sum())} NaN or infinite value(s)")
        if y.dtype.kind not in "iu" or y.ndim != 1:
            raise DataError(f"{where}: {ys} must hold one integer label per sample (N,), "
                            f"got {y.dtype} of shape {y.shape}")
        if len(y) != len(x):
            raise DataError(f"{where}: {xs} holds {len(x)} samples but {ys} holds {len(y)} labels")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high > 9:
            raise DataError(f"{where}: {ys} holds label {high if high > 9 else low}; MNIST-1D labels are 0..9")
    if arrays["x"].shape[1] != arrays["x_test"].shape[1]:
        raise DataError(f"{where}: x holds samples of length {arrays['x'].shape[1]} but x_test of length "
                        f"{arrays['x_test'].shape[1]}; both splits must have the same length")


def _mnist1d(data_dir: str | os.PathLike[str] | None, seed: int, standardize: bool) -> Dataset:
    if data_dir is not None:
        arrays, where = _read_mnist1d_npz(data_dir)
        source = f"MNIST-1D arrays from {where}"
    else:
        if not _available("mnist1d"):
            raise DataError(
                "mnist1d needs the mnist1d package to generate the data locally: pip install "
                '"deadrelu[mnist1d]" — or pass --data-dir naming a mnist1d.npz with arrays x, y, x_test, y_test'
            )
        data_mod = require("mnist1d.data", "mnist1d")
        args = data_mod.get_dataset_args()
        args.seed = seed
        np = require("numpy", "cli")
        state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; give the caller theirs back
        try:
            arrays = data_mod.make_dataset(args)  # generates in memory; never the package's download path
        finally:
            np.random.set_state(state)
        where = f"the mnist1d package's data (seed {seed})"
        source = f"MNIST-1D generated locally by the mnist1d package (seed {seed})"
    _check_mnist1d(arrays, where)
    np = require("numpy", "cli")
    # Cast in NumPy, not torch: torch.as_tensor refuses big-endian arrays (an .npz written on or for
    # such a machine) and longdouble ones; the labels were checked to be 0..9, so int64 holds them.
    x_tr = torch.from_numpy(np.ascontiguousarray(arrays["x"], dtype=np.float32))
    x_va = torch.from_numpy(np.ascontiguousarray(arrays["x_test"], dtype=np.float32))
    x_tr, x_va = _standardise(x_tr, x_va) if standardize else _unit_range(x_tr, x_va)
    source += "; standardised per feature" if standardize else "; min-max scaled to [0, 1]"
    y_tr = torch.from_numpy(np.ascontiguousarray(arrays["y"], dtype=np.int64))
    y_va = torch.from_numpy(np.ascontiguousarray(arrays["y_test"], dtype=np.int64))
    return Dataset("mnist1d", x_tr, y_tr, x_va, y_va, "classification", 10, source)


def _regression(seed: int, samples: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 4, generator=g)
        noise = 0.1 * torch.randn(n, generator=g)
        y = 2 * x[:, 0] - 1.5 * x[:, 1] + 0.5 * x[:, 2] * x[:, 3] + noise
        return x, y.unsqueeze(1)

    x_tr, y_tr = draw(samples)
    x_va, y_va = draw(samples)  # a fresh draw from the same law, for validation loss
    return Dataset("regression", x_tr, y_tr, x_va, y_va, "regression", 0,
                   f"synthetic y = 2x0 - 1.5x1 + 0.5x2x3 + N(0, 0.1^2), {samples} training samples, seed {seed}")


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    limit: int | None = None,
    samples: int = 50,
    standardize: bool = False,
) -> Dataset:
    """Load one of :data:`DATASETS` as a train/validation :class:`Dataset`.

    Args:
        name: ``"digits"``, ``"mnist"``, ``"mnist1d"`` or ``"regression"``.
        data_dir: where ``mnist`` finds its IDX files / ``mnist1d`` its ``mnist1d.npz``.
        seed: seeds the split (digits), the subsample (mnist) or the generator (mnist1d, regression).
        val_fraction: share of digits held out for validation.
        limit: keep at most this many training (and validation) samples of mnist.
        samples: training samples of the regression task.
        standardize: zero mean, unit variance per feature (training-split statistics) instead
            of the default [0, 1] pixel scale. The regression task's inputs are already
            standard normal and ignore it.

    Returns:
        The :class:`Dataset`; the same arguments always give the same tensors.

    Raises:
        DataError: unknown name, or files missing / unreadable (the message says what to put where).
        ModuleNotFoundError: scikit-learn (digits) or numpy (mnist1d .npz) is not installed.

    Example:
        >>> ds = load_dataset("digits")
        >>> ds.features, ds.classes, len(ds.x_train) + len(ds.x_val)
        (64, 10, 1797)
        >>> float(ds.x_train.min()), float(ds.x_train.max())
        (0.0, 1.0)
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if data_dir is not None and name in ("digits", "regression"):
        raise DataError(f"the {name} data set reads no files: a data directory (--data-dir) applies to mnist and "
                        "mnist1d only; drop it, or choose one of those")
    if name == "digits":
        return _digits(seed, val_fraction, standardize)
    if name == "mnist":
        return _mnist(data_dir, seed, limit, standardize)
    if name == "mnist1d":
        return _mnist1d(data_dir, seed, standardize)
    if name == "regression":
        if samples < 2:
            raise DataError(f"the regression task needs at least 2 samples, got {samples}")
        return _regression(seed, samples)
    raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
