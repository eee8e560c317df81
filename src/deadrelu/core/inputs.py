"""How data reaches a model: batches, call arguments, devices, and the mode a pass runs in.

Shared by scan, Probe, rescue and prune so every pass over data splits batches, moves them and
restores the model's flags the same way.

How a batch becomes model input (unless you pass ``input_fn``):

* a tensor is the input: ``model(batch)``;
* a tuple or list is ``(inputs, targets, ...)``: ``model(batch[0])``;
* a mapping is keyword arguments minus label keys (``labels``, ``label``, ``target``,
  ``targets``, ``y``): ``model(**inputs)`` — Hugging Face style batches work as is.

``input_fn(batch)`` may return a tensor (one positional argument), a tuple (positional
arguments) or a dict (keyword arguments).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch.nn.utils.rnn import PackedSequence
from torch import nn

from ..errors import DataError, DeadReluError

__all__ = [
    "is_count",
    "whole_batch_size",
    "whole_number",
    "decoder_mask_of_call",
    "in_decoder",
    "unusual_layout",
    "is_encoder_decoder",
    "checked_mask_option",
    "refuse_meta_weights",
    "LABEL_KEYS",
    "model_device",
    "to_device",
    "map_tensors",
    "iter_tensors",
    "call_arguments",
    "call_samples",
    "first_tensor",
    "iter_batches",
    "describe_shapes",
    "error_summary",
    "preserved_mode",
    "kept_training_flags",
    "ProgressBar",
    "MASK_KEYS",
    "as_mask",
    "resolve_mask",
    "mask_from_call",
    "mask_position",
    "apply_mask",
    "aligned_mask",
    "mask_layout",
]

#: Keys of a dict batch (or keyword arguments of a call) used as the observation mask by default.
MASK_KEYS = ("attention_mask",)

LABEL_KEYS = frozenset({"labels", "label", "target", "targets", "y"})


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor in a (nested) tuple/list/dict, keeping the structure.

    >>> map_tensors({"x": torch.ones(2), "n": 3}, lambda t: t * 2)
    {'x': tensor([2., 2.]), 'n': 3}
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple (PackedSequence) keeps its type
        return type(obj)(*(map_tensors(o, fn) for o in obj))
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) tuple/list/dict, depth first, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from iter_tensors(o)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            yield from iter_tensors(o)


def to_device(obj: Any, device: torch.device | None) -> Any:
    """Move every tensor in a (nested) tuple/list/dict batch to ``device``; None leaves it."""
    if device is None:
        return obj
    return map_tensors(obj, lambda t: t.to(device, non_blocking=True))


def call_arguments(batch: Any, input_fn: Callable[[Any], Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split a batch into ``(args, kwargs)`` for ``model(*args, **kwargs)``."""
    if input_fn is not None:
        batch = input_fn(batch)
        if isinstance(batch, tuple):
            return batch, {}
        if isinstance(batch, Mapping):
            return (), dict(batch)
        return (batch,), {}
    if isinstance(batch, (torch.Tensor, PackedSequence)):  # a packed batch is one input, not (inputs, targets)
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError("a batch is an empty tuple/list: nothing to feed the model")
        if not isinstance(batch[0], torch.Tensor):
            raise DataError(
                f"the first element of a tuple batch is a {type(batch[0]).__name__}, not a tensor; "
                "pass input_fn=lambda batch: ... to say what the model takes"
            )
        return (batch[0],), {}
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        if not kwargs:
            raise DataError(f"a dict batch holds only label keys {sorted(batch)}; nothing to feed the model")
        return (), kwargs
    raise DataError(
        f"cannot take model input from a batch of type {type(batch).__name__}; expected a tensor, a tuple "
        "(inputs, targets), or a dict — or pass input_fn=lambda batch: ..."
    )


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a (nested) batch, depth first; None when there is none."""
    return next(iter_tensors(obj), None)


def call_samples(args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> int:
    """The samples of one model call, as ``scan`` and ``Probe`` count them: the sequences of a
    ``PackedSequence`` first argument (its data holds every step of every one), else the leading
    dim of the first tensor, depth first (1 for a 0-D tensor, 0 with none).

    >>> call_samples((torch.zeros(4, 2),)), call_samples((), {"x": [torch.zeros(())]}), call_samples(("text",))
    (4, 1, 0)
    """
    lead = args[0] if args else None
    if isinstance(lead, PackedSequence):
        return int(lead.batch_sizes[0]) if lead.batch_sizes.numel() else 0
    first = first_tensor((args, kwargs or {}))
    if first is None:
        return 0
    if first.is_nested:  # its components are the samples; it has no sizes beyond the first
        return int(first.size(0))
    return int(first.shape[0]) if first.ndim else 1


def is_count(value: Any) -> bool:
    """A whole number of at least 1 (an int or NumPy integer; never a bool, a float or text)."""
    return not isinstance(value, bool) and hasattr(value, "__index__") and value >= 1


def whole_batch_size(batch_size: Any, what: str = "") -> int:
    """``batch_size`` as an int, or one DataError (a bool, a float, text or a number below 1).

    >>> whole_batch_size(64)
    64
    """
    if not is_count(batch_size):
        prefix = f"{what}: " if what else ""
        raise DataError(f"{prefix}batch_size must be a whole number of at least 1, got {batch_size!r}")
    return int(batch_size)


def whole_number(value: Any, name: str) -> int:
    """An option that counts something (``max_batches``), as an int of at least 1, or one DeadReluError.

    >>> whole_number(3, "max_batches")
    3
    """
    if not is_count(value):
        raise DeadReluError(f"{name} must be a whole number of at least 1 (or None), got {value!r:.80}")
    return int(value)


def checked_mask_option(spec: Any) -> Any:
    """A ``mask=`` option of a form :func:`resolve_mask` takes (None, False, a tensor, a key or a
    callable), or one DeadReluError before anything runs.

    >>> checked_mask_option("attention_mask")
    'attention_mask'
    """
    if spec is None or spec is False or isinstance(spec, (torch.Tensor, str)) or (callable(spec) and not isinstance(spec, bool)):
        return spec
    raise DeadReluError(
        f"mask must be a bool tensor, a key of a dict batch, a callable batch -> mask, False or None, "
        f"not {type(spec).__name__} {spec!r:.60}"
    )


def refuse_meta_weights(model: nn.Module, what: str | None = None) -> None:
    """A model whose weights are on the meta device has no values to run: say so in one line,
    naming the first such tensor. ``what`` names a rewrite that refuses (and so changed nothing)."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.device.type == "meta":
            head = "" if what is None else f"{what}: "
            use = "no values to run" if what is None else "no values to read or write"
            tail = "" if what is None else "; nothing was changed"
            raise DeadReluError(
                f"{head}{type(model).__name__} has its weights on the meta device ('{name}'; {use}): "
                f"materialise it first, e.g. model.to_empty(device='cpu') and load_state_dict(...){tail}"
            )


def unusual_layout(t: torch.Tensor) -> str | None:
    """What makes ``t`` a tensor deadrelu cannot split or feed as data (sparse, quantized, nested), or None."""
    if t.is_nested:
        return "a nested tensor (pad it: torch.nested.to_padded_tensor, and pass mask=)"
    if t.layout != torch.strided:
        return f"a {str(t.layout).replace('torch.', '')} tensor (give it dense: .to_dense())"
    if t.is_quantized:
        return "a quantized tensor (give it dense: .dequantize())"
    return None


def iter_batches(data: Any, batch_size: int) -> Iterable[Any]:
    """A tensor split into ``batch_size`` rows, or the iterable of batches as given."""
    if isinstance(data, torch.Tensor):
        unusual = unusual_layout(data)
        if unusual is not None:
            raise DataError(f"the data is {unusual}; deadrelu scans dense inputs")
        if data.ndim == 0 or data.shape[0] == 0:
            raise DataError(f"the data tensor has shape {tuple(data.shape)}: no samples to scan")
        if data.ndim == 1:  # rows would be scalars: the model would get one unbatched sample per batch
            n = data.shape[0]
            raise DataError(
                f"the data tensor has shape ({n},): deadrelu expects a batch dimension first, (samples, ...); "
                f"give data.unsqueeze(0) for one sample of {n} values, or data.unsqueeze(1) for {n} one-value samples"
            )
        return data.split(min(batch_size, data.shape[0]))  # (a batch_size past int64 is one batch, as any larger than the data)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise DataError(
            f"data must be a tensor, a DataLoader or an iterable of batches, not {type(data).__name__}"
        )
    return data


def error_summary(err: BaseException, op_error: BaseException | None = None) -> str:
    """An error's message in one line, for wrapping it: its first line — and, for TorchScript's
    interpreter errors, whose first line only says that an operation failed (with a traceback
    below), the cause: its last line, or the op's own error where the interpreter dropped its
    message (``op_error``, seen by the capture).

    >>> error_summary(ValueError("bad width\\n  more detail"))
    'bad width'
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if len(lines) > 1 and "TorchScript interpreter" in lines[0]:
        cause = lines[-1]
        if op_error is not None and str(op_error).strip() and cause.rstrip(":").count(":") == 0:
            cause = f"{type(op_error).__name__}: {str(op_error).strip().splitlines()[0]}"
        return f"{lines[0]} … {cause}"
    return lines[0]


def _shape_text(a: Any) -> str:
    if not isinstance(a, torch.Tensor):
        return type(a).__name__
    if a.is_nested:  # a nested tensor has no single shape
        return f"nested tensor of {a.size(0)}"
    return str(tuple(a.shape))


def describe_shapes(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """Shapes of call arguments for error messages: ``(8, 4), mask=(8,)``."""
    parts = [_shape_text(a) for a in args]
    parts += [f"{k}={_shape_text(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


@contextlib.contextmanager
def kept_training_flags(*models: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag on exit, whatever the body switched.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2)).train()
    >>> with kept_training_flags(net):
    ...     _ = net.eval()
    >>> net.training
    True
    """
    flags = {m: m.training for model in models for m in model.modules()}
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def preserved_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Set eval/train mode and no_grad; restore every module's flag, the RNG and (train mode)
    buffers afterwards; warn when the model's own forward wrote a tensor that is not restored."""
    # Train mode updates BatchNorm running statistics and draws dropout masks; a scan must
    # leave the model bit-identical and the RNG where it was. In eval mode a forward writes
    # nothing in any common model, so buffers are not copied (a KV cache may be large): version
    # counters say whether it did, at no cost.
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()] if train else []
    watched = [*model.named_parameters(), *([] if train else model.named_buffers())]
    before = [_version(t) for _, t in watched]
    rng = contextlib.nullcontext() if not train else torch.random.fork_rng(devices=[])
    try:
        with kept_training_flags(model), rng, torch.no_grad():
            try:
                model.train(train)
            except NotImplementedError as err:  # torch.export programs have a fixed mode
                if train:
                    raise DeadReluError(f"{type(model).__name__} cannot switch to train mode: {err}") from err
            yield
    finally:
        with torch.no_grad():
            for b, saved in saved_buffers:
                b.copy_(saved)
        written = [name for (name, t), v in zip(watched, before) if v is not None and _version(t) != v]
        if written:
            kinds = "tensors" if train else "parameters or buffers"
            warnings.warn(
                f"deadrelu: the model's forward wrote its own {kinds} during the scan "
                f"({', '.join(written[:5])}{', ...' if len(written) > 5 else ''}); deadrelu does not undo "
                "a model's own writes" + ("" if train else " in eval mode (train=True restores buffers)"),
                stacklevel=4,
            )


def _version(t: torch.Tensor) -> int | None:
    """A tensor's in-place write counter (None for inference-mode tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


class ProgressBar:
    """A progress bar on stderr: tqdm when installed, a simple counter otherwise, nothing when off.

    >>> bar = ProgressBar(False, 3, "epochs", unit="epoch")
    >>> bar.update(2, loss="0.1"); bar.close(); bar.count
    2
    """

    def __init__(self, enabled: bool, total: int | None, desc: str, *, unit: str = "batch") -> None:
        self.bar = None
        self.count = 0
        self.total = total
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None,
                                dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n``; keyword arguments are shown after the bar (tqdm's postfix)."""
        self.count += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.enabled and sys.stderr.isatty():
            of = f"/{self.total}" if self.total else ""
            print(f"\r{self.desc}: {self.count}{of} {self.unit}s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Remove the bar (or end the counter's line)."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and sys.stderr.isatty():
            print(file=sys.stderr)


def as_mask(value: Any, where: str) -> torch.Tensor:
    """A validated observation mask: a bool tensor with at least one dimension, True = observe.

    Integer and 0/1 float masks (Hugging Face ``attention_mask``) are accepted.

    Raises:
        DataError: for anything else (an additive ``-inf`` mask, a scalar, a non-tensor).
    """
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        raise DataError(f"the observation mask from {where} must be a tensor of shape (batch, tokens), got {_kind(value)}")
    if value.dtype == torch.bool:
        return value
    if value.is_floating_point() and not bool(((value == 0) | (value == 1)).all()):
        raise DataError(
            f"the observation mask from {where} holds values other than 0 and 1 (an additive mask?); "
            "pass a bool mask with True at the positions to count"
        )
    if value.is_complex():
        raise DataError(f"the observation mask from {where} is complex; pass a bool mask")
    return value != 0


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "a 0-d tensor" if value.ndim == 0 else f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def resolve_mask(spec: Any, batch: Any) -> torch.Tensor | None:
    """The observation mask of one batch under a ``mask=`` option.

    ``None``: the batch's ``attention_mask`` when it is a dict holding one, else no mask;
    ``False``: no mask; a tensor: that mask; a string: that key of a dict batch; a callable:
    ``spec(batch)``.

    Raises:
        DataError: a key the batch does not hold, or a mask that is not a bool-like tensor.

    >>> resolve_mask(None, {"input_ids": torch.zeros(2, 3), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])})
    tensor([[ True,  True, False],
            [ True, False, False]])
    """
    if spec is None:
        if isinstance(batch, Mapping):
            for key in MASK_KEYS:
                if isinstance(batch.get(key), torch.Tensor):
                    return as_mask(batch[key], f"the batch's {key!r}")
        return None
    if spec is False:
        return None
    if isinstance(spec, torch.Tensor):
        return as_mask(spec, "mask=")
    if isinstance(spec, str):
        if not isinstance(batch, Mapping) or spec not in batch:
            have = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise DataError(f"mask={spec!r} names a key the batch does not hold (it has {have})")
        return as_mask(batch[spec], f"the batch's {spec!r}")
    if callable(spec):
        return as_mask(spec(batch), "the mask function")
    raise DataError(f"mask must be a tensor, a key of a dict batch, a callable or False, not {type(spec).__name__}")


def mask_position(forward: Callable[..., Any]) -> int | None:
    """The position of a ``forward``'s ``attention_mask`` parameter among its positional
    parameters (``self`` excluded), or None: so ``model(input_ids, mask)`` is masked as
    ``model(input_ids=..., attention_mask=mask)`` is.

    >>> mask_position(lambda input_ids, attention_mask=None: None)
    1
    """
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for key in MASK_KEYS:
        if key in positional:
            return positional.index(key)
    return None


def mask_from_call(
    spec: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], position: int | None = None
) -> torch.Tensor | None:
    """The observation mask of one model call (Probe, Monitor): the call's keyword arguments
    are the batch when it has no positional ones, else its single positional argument; by
    default, also a mask passed positionally as the forward's ``attention_mask`` parameter
    (``position``, see :func:`mask_position`)."""
    if spec is None and position is not None and len(args) > position and isinstance(args[position], torch.Tensor):
        try:
            return as_mask(args[position], f"the call's {MASK_KEYS[0]!r} argument")
        except DataError:
            return None  # inferred from the parameter's name only: an additive mask there is not ours to refuse
    batch = _call_batch(args, kwargs)
    if spec is None and not kwargs:
        if not isinstance(batch, Mapping):
            return None  # a default mask comes from keywords or a single dict argument (sentence-transformers)
        try:
            return resolve_mask(spec, batch)
        except DataError:
            return None  # a features dict whose attention_mask is additive: not ours to refuse
    return resolve_mask(spec, batch)


def _call_batch(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """A model call as a batch: its keywords when it has no positional arguments, else its single
    positional argument, else a dict of both (positionals under ``"args"``)."""
    if kwargs and not args:
        return kwargs
    if len(args) == 1 and not kwargs:
        return args[0]
    return {**kwargs, "args": args}


_DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds", "decoder_attention_mask")


def decoder_mask_of_call(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[bool, torch.Tensor | None]:
    """``(split, decoder mask)`` of an encoder-decoder call (Hugging Face style: a config with
    ``is_encoder_decoder``, or ``decoder_*`` inputs): its ``attention_mask`` covers the encoder's
    tokens only; the decoder's padding is its ``decoder_attention_mask`` (None: count every
    decoder position). ``split`` is False for every other model.

    >>> decoder_mask_of_call(torch.nn.Linear(2, 2), (), {"attention_mask": torch.ones(1, 2)})
    (False, None)
    """
    batch = _call_batch(args, kwargs)
    given = isinstance(batch, Mapping) and any(batch.get(key) is not None for key in _DECODER_INPUTS)
    if not (given or is_encoder_decoder(model)):
        return False, None
    mask = batch.get("decoder_attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor):
        return True, None
    try:
        return True, as_mask(mask, "the call's 'decoder_attention_mask'")
    except DataError:
        return True, None  # not a 0/1 mask: count every decoder position


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` says it is an encoder-decoder (a Hugging Face config's ``is_encoder_decoder``)."""
    return getattr(getattr(model, "config", None), "is_encoder_decoder", False) is True


def in_decoder(path: str) -> bool:
    """Whether a module path lies inside a decoder module: one named ``decoder`` or ``*_decoder``
    (``decoder.block.0``, ``model.decoder``, SeamlessM4T's and BLIP's ``text_decoder``).

    >>> in_decoder("model.decoder.layers.0.fc1"), in_decoder("text_decoder.layers.0"), in_decoder("encoder.block.0")
    (True, True, False)
    """
    return any(part == "decoder" or part.endswith("_decoder") for part in path.split("."))


def mask_layout(
    shape: Sequence[Any], unit_dim: int, mask_shape: Sequence[Any], same: Callable[[tuple, tuple], bool] | None = None
) -> str | None:
    """How a ``(B, T)`` observation mask lies over an activation of ``shape`` with units on
    ``unit_dim``: ``"leading"`` (its leading dimensions are ``(B, T)``), ``"transposed"`` (they
    are ``(T, B)``, B != T) or None (the mask does not apply: the activation is counted whole).
    ``same`` compares two size tuples (symbolic sizes need more than ``==``).

    >>> mask_layout((3, 2, 4), 2, (2, 3)), mask_layout((2, 3, 4), 2, (2, 3)), mask_layout((2, 4), 1, (2, 3))
    ('transposed', 'leading', None)
    """
    same = same or (lambda a, b: a == b)
    k = len(mask_shape)
    if len(shape) <= k or unit_dim < k:
        return None
    lead, mask_shape = tuple(shape[:k]), tuple(mask_shape)
    if same(lead, mask_shape):
        return "leading"
    if k == 2 and same(lead, mask_shape[::-1]) and not same(mask_shape[:1], mask_shape[1:]):
        return "transposed"
    return None


def aligned_mask(
    x: torch.Tensor, unit_dim: int, mask: torch.Tensor | None, square: str = "leading"
) -> torch.Tensor | None:
    """The ``(B, T)`` mask laid over the activation's leading dimensions (transposed for a
    ``(T, B)`` activation), or None when it does not apply (see :func:`mask_layout`). A square
    mask (B = T) fits both ways: ``square`` says which (``"leading"`` or ``"transposed"``).

    Accumulators take it as ``mask=`` and skip masked values in place: no copy of the
    activation, and no host sync on accelerators.

    >>> m = torch.tensor([[True, False, False], [True, True, False]])
    >>> aligned_mask(torch.zeros(3, 2, 4), 2, m).shape
    torch.Size([3, 2])
    """
    if mask is None:
        return None
    layout = _square(mask_layout(x.shape, unit_dim, mask.shape), mask, square)
    if layout == "leading":
        return mask
    if layout == "transposed":
        return mask.t().contiguous()
    return None


def _square(layout: str | None, mask: torch.Tensor, square: str) -> str | None:
    """``layout``, or ``square`` where the mask is square and fits the activation as it is."""
    if layout == "leading" and mask.ndim == 2 and mask.shape[0] == mask.shape[1]:
        return square
    return layout


def apply_mask(
    x: torch.Tensor, unit_dim: int, mask: torch.Tensor | None, square: str = "leading"
) -> tuple[torch.Tensor, int]:
    """The activation values at unmasked positions, with their unit dimension.

    A ``(B, T)`` mask selects along the activation's leading ``(B, T)`` (or ``(T, B)``, for B != T)
    dimensions when the unit axis lies after them (:func:`mask_layout`); any other activation is
    returned whole.

    >>> h = torch.arange(12.0).reshape(2, 3, 2)
    >>> apply_mask(h, 2, torch.tensor([[True, True, False], [True, False, False]]))[0].shape
    torch.Size([3, 2])
    """
    if mask is None:
        return x, unit_dim
    layout = _square(mask_layout(x.shape, unit_dim, mask.shape), mask, square)
    if layout == "leading":
        return x.detach()[mask], unit_dim - mask.ndim + 1
    if layout == "transposed":
        return x.detach()[mask.t()], unit_dim - 1
    return x, unit_dim
