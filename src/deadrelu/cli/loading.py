"""Load the models and data the CLI is pointed at, with one clear error for each way it can fail.

Models (``MODEL``):
    * a TorchScript file (``torch.jit.save``),
    * ``package.module:factory`` — a callable returning an ``nn.Module`` — with optional
      ``--weights state_dict.pt``,
    * a pickled ``nn.Module`` (``torch.save(model)``) or a ``torch.export`` program
      (``torch.export.save``, usually ``.pt2``) — **only with** ``trust_pickle=True``
      (``--trust-pickle``): unpickling such a file runs whatever code its author put in it.

Data (``--data``):
    * ``.pt``/``.pth``: a tensor, a tuple/list whose first item is the inputs, or a dict
      with an ``x``/``inputs``/``data``/``images`` entry (read weights-only: tensors and
      containers, never code);
    * ``.npy``, ``.npz`` (same keys as dicts, else the one array that is not a label),
      ``.csv`` (numeric columns, an optional header row);
    * a directory holding MNIST IDX files (``*-images-idx3-ubyte``, optionally ``.gz``);
    * ``package.module:function`` returning a tensor or an iterable of batches.

Floating arrays keep their precision until the model's dtype is known (``inputs_for``); NumPy
arrays of either byte order load, and ``longdouble`` ones become float64; uint8 arrays are images
and become float32 in [0, 1]; other integer arrays stay int64 (token ids for embedding layers),
and a uint64 value past int64's range is refused; complex data is refused.

Every failure is a :class:`~deadrelu.errors.DeadReluError` whose message fits on one line.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import itertools
import logging
import lzma
import os
import re
import sys
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..core.inputs import LABEL_KEYS, unusual_layout
from ..errors import DataError, DeadReluError
from ..lab.idx import read_idx

__all__ = ["inputs_for", "load_model", "load_data", "import_object", "call_user_code", "one_line", "TRUST_FLAG"]

_INPUT_KEYS = ("x", "X", "inputs", "input", "data", "images", "features")

#: The command-line flag that allows loading files which can run code.
TRUST_FLAG = "--trust-pickle"

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def one_line(text: object, limit: int = 400) -> str:
    """``text`` as a single printable line: ANSI escapes dropped, newlines and tabs as spaces.

    >>> one_line("bad\\n\\tthing \\x1b[1mbold\\x1b[0m")
    'bad thing bold'
    """
    s = _CONTROL.sub(" ", _ANSI.sub("", str(text)))
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _describe(err: BaseException) -> str:
    """``TypeName: first part of the message`` for wrapping a foreign exception."""
    if isinstance(err, SystemExit):
        return f"SystemExit({err.code!r})"
    msg = one_line(err, 200)
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def call_user_code(fn: Callable[[], Any], what: str, error: type[DeadReluError] = DeadReluError) -> Any:
    """Run user code (an import, a factory, a data function); any failure becomes one ``error`` line.

    ``SystemExit`` is caught too: a factory that calls ``sys.exit(0)`` must not end the
    command silently with success. ``KeyboardInterrupt`` still interrupts.
    """
    try:
        return fn()
    except DeadReluError:
        raise
    except (Exception, SystemExit) as err:
        raise error(f"{what} raised {_describe(err)}") from err


def import_object(spec: str) -> Any:
    """Import ``package.module:attr`` (the current directory is importable, as with ``python -m``).

    Raises:
        DeadReluError: when the module or attribute does not exist, or importing it fails.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise DeadReluError(f"{spec!r} is not of the form package.module:name")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DeadReluError(f"cannot import {module_name!r} (from {spec!r}): {one_line(err, 200)}") from err
    except (Exception, SystemExit) as err:
        raise DeadReluError(f"importing {module_name!r} (from {spec!r}) raised {_describe(err)}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DeadReluError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _is_spec(text: str) -> bool:
    return ":" in text and not Path(text).exists() and not (len(text) > 1 and text[1] == ":")


def load_model(source: str, weights: str | None = None, *, trust_pickle: bool = False) -> nn.Module:
    """Load a model from a file or a ``package.module:factory`` spec.

    Args:
        source: a TorchScript file, a pickled model or ``.pt2`` program, or ``package.module:factory``.
        weights: a state_dict file to load into the model (read weights-only).
        trust_pickle: allow files that unpickle Python objects (whole pickled models,
            ``torch.export`` programs). Off by default: such a file can run any code.

    Raises:
        DeadReluError: for a missing file, a file that holds no model, a file that needs
            ``trust_pickle``, a factory that fails or returns something else, or weights that do not fit.
    """
    if _is_spec(source):
        factory = import_object(source)
        if not callable(factory):
            raise DeadReluError(f"{source!r} is not callable")
        model = call_user_code(factory, f"calling {source}()")
        if not isinstance(model, nn.Module):
            raise DeadReluError(f"{source}() returned a {type(model).__name__}, not a torch.nn.Module")
    else:
        path = Path(source)
        if not path.exists():
            raise DeadReluError(f"model file not found: {source}")
        if path.is_dir():
            hint = " (a Hugging Face model directory? scan it on text with --text corpus.txt)" if (
                path / "config.json"
            ).is_file() else ""
            raise DeadReluError(f"{source} is a directory, not a model file{hint}")
        model = _load_model_file(path, trust_pickle)
    if weights is not None:
        _load_weights(model, weights, trust_pickle)
    return model


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except Exception:  # not a zip, or a damaged one: the loaders below say which
        return []


def _needs_trust(path: Path, what: str) -> DeadReluError:
    return DeadReluError(
        f"{path} is {what}; loading it runs code stored in the file, so deadrelu refuses by default. "
        f"If you trust its source, add {TRUST_FLAG}; otherwise save model.state_dict() and pass "
        f"package.module:factory with --weights"
    )


def _blocked_global(err: BaseException) -> str | None:
    # torch >= 2.4 says "Unsupported global: GLOBAL numpy...", older torch "Unsupported class numpy..."
    found = re.search(r"Unsupported (?:global: GLOBAL|class) (\S+)", str(err))
    return found.group(1) if found else None


def _torch_load(path: Path, *, weights_only: bool) -> Any:
    # torch warns on stderr about pickle protocols and more; the CLI's promise is one line.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(str(path), map_location="cpu", weights_only=weights_only)


def _is_weights_only_refusal(err: BaseException, path: Path) -> bool:
    """Whether torch's weights-only loader refused a real pickle (not garbage it could not parse)."""
    return "Weights only load failed" in str(err) and _is_torch_format(path)


def _load_failure(err: BaseException) -> str:
    """Why ``torch.load`` failed, in words; the weights-only loader's long refusal of a file
    that is no pickle at all (garbage, another format) says only that."""
    if "Weights only load failed" in str(err):
        return "neither a zip archive nor a pickle as torch.save writes them"
    return _describe(err)


def _is_torch_format(path: Path) -> bool:
    """Whether ``path`` is laid out as ``torch.save`` writes: a zip archive, a pickle (the legacy
    format starts with pickle's PROTO opcode, 0x80) or an old tar archive."""
    try:
        with path.open("rb") as fh:
            if fh.read(1) == b"\x80":
                return True
        return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)
    except (OSError, EOFError, ValueError, tarfile.TarError, zlib.error, lzma.LZMAError):
        # is_tarfile also tries gzip/bz2/xz: a truncated gzip header raises EOFError, a damaged
        # stream zlib/lzma errors. A file this sniffing cannot read is not torch's format.
        return False


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Silence these loggers for a moment: torch >= 2.14's ``torch.export.load`` logs a warning with
    a traceback on stderr for a file it cannot read, then fails; the CLI's error is its one line."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _load_model_file(path: Path, trust_pickle: bool) -> nn.Module:
    names = _zip_names(path)
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            raise DeadReluError(f"{path} looks like TorchScript but could not be loaded: {_describe(err)}") from err
    if path.suffix == ".pt2" or any("/models/" in n and n.endswith(".json") for n in names):
        if not trust_pickle:
            raise _needs_trust(path, "a torch.export program")
        try:
            with warnings.catch_warnings(), _quiet_loggers("torch.export", "torch._export"):
                warnings.simplefilter("ignore")
                program = torch.export.load(str(path))
            return program.module()
        except Exception as err:
            raise DeadReluError(f"{path} could not be loaded as a torch.export program: {_describe(err)}") from err
    try:
        obj = _torch_load(path, weights_only=True)
    except Exception as err:
        if not _is_weights_only_refusal(err, path):
            raise DeadReluError(f"{path} is not a model file torch can load ({_load_failure(err)})") from err
        if not trust_pickle:
            needs = _blocked_global(err)
            raise _needs_trust(path, f"a pickle of Python objects ({needs})" if needs else "a pickle of Python objects")
        obj = _load_trusted(path)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DeadReluError(
            f"{path} holds a state_dict, not a model: pass the architecture as package.module:factory "
            f"and this file with --weights {path}"
        )
    raise DeadReluError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")


def _load_trusted(path: Path) -> Any:
    """Full unpickling, after the user passed ``--trust-pickle``."""
    try:
        return _torch_load(path, weights_only=False)
    except (Exception, SystemExit) as err:
        missing = re.search(r"Can't get attribute '([^']+)' on <module '[^']*__main__'", str(err))
        if missing:
            raise DeadReluError(
                f"{path} was pickled from a class {missing.group(1)!r} defined in the script that saved it "
                f"(__main__), which is not running now: move the class into a module, save "
                f"model.state_dict() to a file and pass module:factory --weights FILE"
            ) from err
        raise DeadReluError(f"{path} could not be unpickled ({_describe(err)})") from err


def _load_weights(model: nn.Module, weights: str, trust_pickle: bool) -> None:
    path = Path(weights)
    if not path.exists():
        raise DeadReluError(f"weights file not found: {weights}")
    if path.is_dir():
        raise DeadReluError(f"--weights {weights} is a directory, not a state_dict file")
    try:
        state = _torch_load(path, weights_only=True)
    except Exception as err:
        if not _is_weights_only_refusal(err, path):
            raise DeadReluError(f"{weights} is not a state_dict file ({_load_failure(err)})") from err
        if not trust_pickle:
            raise DeadReluError(
                f"{weights} is not a state_dict: it holds pickled Python objects (a whole model?), which can "
                f"run code when loaded; save model.state_dict() instead, or add {TRUST_FLAG} if you trust it"
            ) from err
        state = _load_trusted(path)
    if isinstance(state, nn.Module):  # only reachable with --trust-pickle
        state = state.state_dict()
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise DeadReluError(f"{weights} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except Exception as err:
        raise DeadReluError(f"weights {weights} do not fit the model: {one_line(err, 300)}") from err


def _as_input_tensor(t: torch.Tensor, source: str) -> torch.Tensor:
    if t.is_complex():
        raise DataError(f"{source} holds complex numbers ({t.dtype}); deadrelu scans real-valued inputs")
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.is_floating_point():
        return t  # its own precision: cast to the model's dtype once both are loaded (inputs_for)
    if t.dtype == torch.bool:
        return t.float()
    return t.long()


def _pick_key(keys: list[str], what: str) -> str:
    """The inputs' key: a known input name, else the only key that is not a label."""
    for key in _INPUT_KEYS:
        if key in keys:
            return key
    candidates = [k for k in keys if k not in LABEL_KEYS]
    if len(candidates) == 1:
        return candidates[0]
    raise DataError(f"{what} holds {sorted(keys)}; name the inputs one of {', '.join(_INPUT_KEYS)}")


def load_data(source: str, *, flatten: bool = False, trust_pickle: bool = False) -> Any:
    """Load scan data: a tensor of inputs, or an iterable of batches from a ``module:function``.

    Args:
        source: file, directory or ``package.module:function``.
        flatten: flatten each sample to one dimension (e.g. MNIST images for an MLP): the
            samples of a single tensor, or the inputs of each batch a data function gives.
        trust_pickle: also read ``.pt`` files holding pickled Python objects (a NumPy array,
            a ``TensorDataset``); off by default since unpickling can run code.

    Raises:
        DataError: missing files, unknown formats, empty or unreadable data; a data
            function that raises, now or while it is iterated.
    """
    if _is_spec(source):
        fn = import_object(source)
        data = call_user_code(fn, f"calling {source}()", DataError) if callable(fn) else fn
        if isinstance(data, torch.Tensor):
            return _finish(data, source, flatten)
        return GuardedBatches(data, source, flatten=flatten)
    path = Path(source)
    if not path.exists():
        raise DataError(f"data not found: {source}")
    if path.is_dir():
        return _finish(_load_idx_dir(path), source, flatten)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        tensor = _load_pt(path, trust_pickle)
    elif suffix in (".npy", ".npz"):
        tensor = _load_numpy(path)
    elif suffix == ".csv":
        tensor = _load_csv(path)
    elif path.name.endswith(("-idx3-ubyte", "-idx3-ubyte.gz")):
        tensor = read_idx(path)
    else:
        raise DataError(f"unknown data format {path.suffix or path.name!r}: use .pt, .npy, .npz, .csv or an IDX directory")
    return _finish(tensor, source, flatten)


def inputs_for(model: nn.Module, data: Any) -> Any:
    """Floating data in the model's floating dtype (its first floating parameter's, else buffer's;
    float32 for a model with neither): a float64 model scans its float64 file, a float32 model
    NumPy's float64 arrays. Other data (token ids, a data function's batches) is left as it is."""
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        return data
    dtype = torch.float32
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            dtype = t.dtype
            break
    return data.to(dtype)


class GuardedBatches:
    """The batches of a user's data function; an error while iterating becomes one :class:`DataError` line.

    With ``flatten=True`` each batch's inputs are flattened to ``(samples, features)``, as
    :func:`load_data` flattens a single tensor: a tensor batch, the first item of an
    ``(inputs, labels, ...)`` tuple or list, or a dict batch's inputs entry (``x``, ``inputs``, ...,
    else its only non-label key); a batch with nothing to flatten is one :class:`DataError`.

    >>> list(GuardedBatches([1, 2], "mod:fn"))
    [1, 2]
    >>> [b.shape for b in GuardedBatches([torch.ones(3, 2, 4)], "mod:fn", flatten=True)]
    [torch.Size([3, 8])]
    """

    def __init__(self, data: Any, source: str, *, flatten: bool = False) -> None:
        self.data = data
        self.source = source
        self.flatten = flatten

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[Any]:
        try:
            it = iter(self.data)
        except TypeError:
            raise DataError(
                f"{self.source} gave a {type(self.data).__name__}: expected a tensor or an iterable of batches"
            ) from None
        count = 0
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DeadReluError:
                raise
            except (Exception, SystemExit) as err:
                raise DataError(f"the data from {self.source} raised {_describe(err)} after {count} batches") from err
            count += 1
            yield _flatten_batch(batch, f"batch {count} from {self.source}") if self.flatten else batch


def _flatten_samples(t: Any, what: str) -> torch.Tensor:
    """``t`` as ``(samples, features)``; one DataError when it is not a tensor with a batch dimension."""
    if not isinstance(t, torch.Tensor):
        raise DataError(f"{what} is a {type(t).__name__}, not a tensor: --flatten flattens tensors of inputs")
    unusual = unusual_layout(t)
    if unusual is not None:
        raise DataError(f"{what} holds {unusual}; deadrelu scans dense inputs")
    if t.ndim < 2:
        # as for a single tensor (_finish): without a batch dimension first, flattening would make
        # each value a sample, so a list of single samples would be scanned as one-value inputs
        raise DataError(
            f"{what} has shape {tuple(t.shape)}: --flatten needs a batch dimension first, (samples, ...); "
            f"give one sample as shape (1, {t.numel()}), or {t.numel()} one-value samples as ({t.numel()}, 1)"
        )
    return t.flatten(1)  # not reshape(n, -1): that cannot infer -1 for an empty batch


def _flatten_batch(batch: Any, what: str) -> Any:
    """A batch with its inputs flattened, in the forms scan accepts (see ``core.inputs.call_arguments``)."""
    if isinstance(batch, PackedSequence):  # scan feeds it whole; it has no per-sample layout to flatten
        raise DataError(f"{what} is a PackedSequence: --flatten cannot flatten packed sequences; drop --flatten")
    if isinstance(batch, torch.Tensor):
        return _flatten_samples(batch, what)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError(f"{what} is an empty {type(batch).__name__}: nothing to flatten or feed the model")
        inputs = _flatten_samples(batch[0], f"the inputs (first item) of {what}")
        if hasattr(batch, "_fields"):  # a namedtuple keeps its type and field names
            return batch._replace(**{batch._fields[0]: inputs})
        return (inputs, *batch[1:]) if isinstance(batch, tuple) else [inputs, *batch[1:]]
    if isinstance(batch, Mapping):
        keys = [k for k in batch if isinstance(k, str)]
        if not keys:
            raise DataError(f"{what} is a dict with no named entries: nothing to flatten")
        key = _pick_key(keys, what)
        return {**batch, key: _flatten_samples(batch[key], f"entry {key!r} of {what}")}
    raise DataError(
        f"{what} is a {type(batch).__name__}: --flatten flattens a tensor, an (inputs, labels) tuple "
        "or a dict of tensors"
    )


def _finish(t: torch.Tensor, source: str, flatten: bool) -> torch.Tensor:
    unusual = unusual_layout(t)
    if unusual is not None:
        raise DataError(f"{source} holds {unusual}; deadrelu scans dense inputs")
    if t.ndim == 0 or t.shape[0] == 0:
        raise DataError(f"{source} holds no samples (shape {tuple(t.shape)})")
    if t.ndim == 1:
        # scan splits the first dimension into batches: a 1-D tensor would be fed as slices
        # of one sample (a Linear layer sees one unbatched input per slice), not as samples
        raise DataError(
            f"{source} holds 1-D data of shape {tuple(t.shape)}: deadrelu expects a batch dimension first, "
            f"(samples, ...); save one sample as shape (1, {t.shape[0]}), or {t.shape[0]} one-value samples as "
            f"({t.shape[0]}, 1)"
        )
    t = _as_input_tensor(t, source)
    return t.reshape(t.shape[0], -1) if flatten else t


def _load_pt(path: Path, trust_pickle: bool) -> torch.Tensor:
    try:
        obj = _torch_load(path, weights_only=True)
    except Exception as err:
        if not _is_weights_only_refusal(err, path):
            raise DataError(f"{path} is not a tensor file torch can load ({_load_failure(err)})") from err
        if not trust_pickle:
            needs = _blocked_global(err)
            raise DataError(
                f"{path} holds pickled Python objects{f' ({needs})' if needs else ''}, not plain tensors; "
                f"save a tensor, a tuple or a dict of tensors with torch.save, or add {TRUST_FLAG} if you trust it"
            ) from err
        obj = _load_trusted(path)
    if isinstance(obj, torch.utils.data.TensorDataset) and obj.tensors:
        obj = obj.tensors[0]
    if type(obj).__module__ == "numpy" and hasattr(obj, "dtype"):
        obj = _numpy_to_tensor(obj, str(path))
    if isinstance(obj, (tuple, list)) and obj:
        obj = obj[0]
    elif isinstance(obj, Mapping):
        if not obj:
            raise DataError(f"{path} holds an empty dict")
        keys = list(obj)
        if not all(isinstance(k, str) for k in keys):
            raise DataError(f"{path} holds a dict whose keys are not all names")
        obj = obj[_pick_key(keys, str(path))]
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a tensor of inputs")
    return obj


def _numpy_to_tensor(arr: Any, what: str) -> torch.Tensor:
    """A NumPy array as a tensor in native byte order; one DataError for data torch cannot hold."""
    np = sys.modules["numpy"]
    if arr.dtype.kind == "c":
        raise DataError(f"{what} holds complex numbers ({arr.dtype}); deadrelu scans real-valued inputs")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{what} holds {arr.dtype} data; expected numbers")
    if not arr.dtype.isnative:
        # big-endian files (written on or for such machines): torch reads native byte order only
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "f" and arr.dtype.char not in "efd":
        # longdouble (float96/float128, or NumPy's own 64-bit type where it is no wider) has no torch
        # dtype; float64 is more precision than the model's dtype, which the data is cast to anyway,
        # so only values past float64's range are lost
        with np.errstate(over="ignore"):
            wide = arr.astype(np.float64)
        if np.count_nonzero(np.isfinite(arr)) != np.count_nonzero(np.isfinite(wide)):
            raise DataError(f"{what} holds {arr.dtype} values beyond float64's range (about 1.8e308); "
                            "rescale the data or store it as float64")
        arr = wide
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
        if arr.dtype.itemsize == 8 and arr.size and arr.max() > np.iinfo(np.int64).max:
            # int64 would wrap these to negative numbers, silently
            raise DataError(f"{what} holds uint64 value {int(arr.max())}, past int64's largest (2**63 - 1); "
                            "store the data as int64 or float64")
        arr = arr.astype(np.int64)  # torch has no uint16/32/64 arithmetic on every build
    try:
        return torch.from_numpy(np.ascontiguousarray(arr))
    except (TypeError, ValueError, RuntimeError) as err:  # a dtype torch has no counterpart for
        raise DataError(f"{what} holds {arr.dtype} data torch cannot read ({_describe(err)})") from err


def _load_numpy(path: Path) -> torch.Tensor:
    from .._imports import require

    np = require("numpy", "cli")
    try:
        loaded = np.load(str(path), allow_pickle=False)
        if path.suffix.lower() == ".npz" or isinstance(loaded, np.lib.npyio.NpzFile):
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataError(f"{path} is named .npz but holds a single array; rename it .npy")
            with loaded:
                keys = list(loaded.files)
                if not keys:
                    raise DataError(f"{path} holds no arrays")
                arr = loaded[_pick_key(keys, str(path))]
        else:
            arr = loaded
    except DeadReluError:
        raise
    except Exception as err:
        raise DataError(f"{path} is not a readable NumPy file ({_describe(err)})") from err
    if not hasattr(arr, "dtype"):
        raise DataError(f"{path} holds no array")
    return _numpy_to_tensor(arr, str(path))


def _load_csv(path: Path) -> torch.Tensor:
    rows: list[list[float]] = []
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") would otherwise make the first row
        # non-numeric, and it would be skipped as a header
        with path.open(newline="", encoding="utf-8-sig") as fh:
            for i, row in enumerate(csv.reader(fh)):
                if not row or all(not c.strip() for c in row):
                    continue
                try:
                    rows.append([float(c) for c in row])
                except ValueError:
                    if i == 0 and not rows:  # a header row
                        continue
                    raise DataError(f"{path}: line {i + 1} has a non-numeric value") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save the CSV as UTF-8") from None
    except csv.Error as err:
        raise DataError(f"{path} is not a readable CSV file ({one_line(err, 200)})") from None
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
