"""Load the models and data the CLI is pointed at, with one clear error for each way it can fail.

Models (``MODEL``):
    * a TorchScript file (``torch.jit.save``),
    * a ``torch.export`` program (``torch.export.save``, usually ``.pt2``),
    * a pickled ``nn.Module`` (``torch.save(model)``),
    * ``package.module:factory`` — a callable returning an ``nn.Module`` — with optional
      ``--weights state_dict.pt``.

Data (``--data``):
    * ``.pt``/``.pth``: a tensor, a tuple/list whose first item is the inputs, or a dict
      with an ``x``/``inputs``/``data``/``images`` entry;
    * ``.npy``, ``.npz`` (same keys as dicts, else the first array), ``.csv`` (numeric
      columns, an optional header row);
    * a directory holding MNIST IDX files (``*-images-idx3-ubyte``, optionally ``.gz``);
    * ``package.module:function`` returning a tensor or an iterable of batches.

Floating arrays become float32; uint8 arrays are images and become float32 in [0, 1];
other integer arrays stay int64 (token ids for embedding layers).
"""

from __future__ import annotations

import csv
import importlib
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import DataError, DeadReluError
from ..lab.idx import read_idx

__all__ = ["load_model", "load_data", "import_object"]

_INPUT_KEYS = ("x", "X", "inputs", "input", "data", "images", "features")


def import_object(spec: str) -> Any:
    """Import ``package.module:attr`` (the current directory is importable, as with ``python -m``).

    Raises:
        DeadReluError: when the module or attribute does not exist.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise DeadReluError(f"{spec!r} is not of the form package.module:name")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DeadReluError(f"cannot import {module_name!r} (from {spec!r}): {err}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DeadReluError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _is_spec(text: str) -> bool:
    return ":" in text and not Path(text).exists() and not (len(text) > 1 and text[1] == ":")


def load_model(source: str, weights: str | None = None) -> nn.Module:
    """Load a model from a file or a ``package.module:factory`` spec.

    Raises:
        DeadReluError: for a missing file, a file that holds no model, a factory that
            returns something else, or weights that do not fit.
    """
    if _is_spec(source):
        factory = import_object(source)
        if not callable(factory):
            raise DeadReluError(f"{source!r} is not callable")
        try:
            model = factory()
        except Exception as err:
            raise DeadReluError(f"calling {source}() raised {type(err).__name__}: {err}") from err
        if not isinstance(model, nn.Module):
            raise DeadReluError(f"{source}() returned a {type(model).__name__}, not a torch.nn.Module")
    else:
        path = Path(source)
        if not path.exists():
            raise DeadReluError(f"model file not found: {source}")
        if path.is_dir():
            raise DeadReluError(f"{source} is a directory, not a model file")
        model = _load_model_file(path)
    if weights is not None:
        _load_weights(model, weights)
    return model


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def _load_model_file(path: Path) -> nn.Module:
    names = _zip_names(path)
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            raise DeadReluError(f"{path} looks like TorchScript but could not be loaded: {err}") from err
    if path.suffix == ".pt2" or any("/models/" in n and n.endswith(".json") for n in names):
        try:
            program = torch.export.load(str(path))
        except Exception as err:
            raise DeadReluError(f"{path} could not be loaded as a torch.export program: {err}") from err
        return program.module()
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as err:
        raise DeadReluError(f"{path} is not a model file torch can load ({type(err).__name__}: {err})") from err
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DeadReluError(
            f"{path} holds a state_dict, not a model: pass the architecture as package.module:factory "
            f"and this file with --weights {path}"
        )
    raise DeadReluError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")


def _load_weights(model: nn.Module, weights: str) -> None:
    path = Path(weights)
    if not path.exists():
        raise DeadReluError(f"weights file not found: {weights}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise DeadReluError(f"{weights} is not a state_dict file ({type(err).__name__}: {err})") from err
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise DeadReluError(f"{weights} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise DeadReluError(f"weights {weights} do not fit the model: {' '.join(first[:3])}") from err


def _as_input_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.is_floating_point():
        return t.float()
    if t.dtype == torch.bool:
        return t.float()
    return t.long()


def _pick(mapping: Mapping[str, Any], what: str) -> Any:
    for key in _INPUT_KEYS:
        if key in mapping:
            return mapping[key]
    if len(mapping) == 1:
        return next(iter(mapping.values()))
    raise DataError(f"{what} holds {sorted(mapping)}; name the inputs one of {', '.join(_INPUT_KEYS)}")


def load_data(source: str, *, flatten: bool = False) -> Any:
    """Load scan data: a tensor of inputs, or an iterable of batches from a ``module:function``.

    Args:
        source: file, directory or ``package.module:function``.
        flatten: flatten each sample to one dimension (e.g. MNIST images for an MLP).

    Raises:
        DataError: missing files, unknown formats, empty data.
    """
    if _is_spec(source):
        fn = import_object(source)
        try:
            data = fn() if callable(fn) else fn
        except Exception as err:
            raise DataError(f"calling {source}() raised {type(err).__name__}: {err}") from err
        if isinstance(data, torch.Tensor):
            return _finish(data, source, flatten)
        return data
    path = Path(source)
    if not path.exists():
        raise DataError(f"data not found: {source}")
    if path.is_dir():
        return _finish(_load_idx_dir(path), source, flatten)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        tensor = _load_pt(path)
    elif suffix in (".npy", ".npz"):
        tensor = _load_numpy(path)
    elif suffix == ".csv":
        tensor = _load_csv(path)
    elif path.name.endswith(("-idx3-ubyte", "-idx3-ubyte.gz")):
        tensor = read_idx(path)
    else:
        raise DataError(f"unknown data format {path.suffix or path.name!r}: use .pt, .npy, .npz, .csv or an IDX directory")
    return _finish(tensor, source, flatten)


def _finish(t: torch.Tensor, source: str, flatten: bool) -> torch.Tensor:
    if t.ndim == 0 or t.shape[0] == 0:
        raise DataError(f"{source} holds no samples (shape {tuple(t.shape)})")
    t = _as_input_tensor(t)
    return t.reshape(t.shape[0], -1) if flatten else t


def _load_pt(path: Path) -> torch.Tensor:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"{path} is not a tensor file torch can load ({type(err).__name__}: {err})") from err
    if isinstance(obj, (tuple, list)) and obj:
        obj = obj[0]
    elif isinstance(obj, Mapping):
        obj = _pick(obj, str(path))
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a tensor of inputs")
    return obj


def _load_numpy(path: Path) -> torch.Tensor:
    from .._imports import require

    np = require("numpy", "cli")
    try:
        loaded = np.load(str(path), allow_pickle=False)
    except Exception as err:
        raise DataError(f"{path} is not a NumPy file ({type(err).__name__}: {err})") from err
    if path.suffix.lower() == ".npz":
        with loaded:
            keys = list(loaded.files)
            if not keys:
                raise DataError(f"{path} holds no arrays")
            key = next((k for k in _INPUT_KEYS if k in keys), keys[0])
            arr = loaded[key]
    else:
        arr = loaded
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path} holds {arr.dtype} data; expected numbers")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _load_csv(path: Path) -> torch.Tensor:
    rows: list[list[float]] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                rows.append([float(c) for c in row])
            except ValueError:
                if i == 0 and not rows:  # a header row
                    continue
                raise DataError(f"{path}: line {i + 1} has a non-numeric value") from None
    if not rows:
        raise DataError(f"{path} holds no numeric rows")
    width = len(rows[0])
    bad = next((i for i, r in enumerate(rows) if len(r) != width), None)
    if bad is not None:
        raise DataError(f"{path}: row {bad + 1} has {len(rows[bad])} columns, the first has {width}")
    return torch.tensor(rows, dtype=torch.float32)


def _load_idx_dir(path: Path) -> torch.Tensor:
    candidates = sorted(path.glob("*-images-idx3-ubyte")) + sorted(path.glob("*-images-idx3-ubyte.gz"))
    candidates += sorted(path.glob("*-images.idx3-ubyte"))
    if not candidates:
        raise DataError(
            f"no MNIST image file in {path}: expected e.g. train-images-idx3-ubyte or t10k-images-idx3-ubyte(.gz)"
        )
    # Prefer the test split: scanning is evaluation, and it is the smaller file.
    chosen = next((c for c in candidates if c.name.startswith("t10k")), candidates[0])
    images = read_idx(chosen)
    if images.ndim == 3:
        images = images.unsqueeze(1)  # (N, 1, H, W): channels-first, as conv models expect
    return images
