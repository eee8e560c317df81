"""Find every activation call in a forward pass and feed its output to per-site accumulators.

How sites are found
-------------------
A ``TorchFunctionMode`` is active only while the model's forward runs. It sees every
torch call made by any module's ``forward`` — ``F.relu``, ``torch.relu``,
``Tensor.relu_``, and also the functional call inside ``nn.ReLU.forward`` or inside
another library's thin wrapper such as a ``GELUActivation`` class — so activation
modules and functional calls are captured by one mechanism and no library has to be
listed. Forward pre/post hooks on every submodule keep a stack of which module is
running, so each call is attributed to the innermost module that made it.

A *site* is one activation call at one position in the forward pass, keyed by
``(module path, occurrence of that module in this forward, slot, function)``. A
module called three times (``self.relu`` in a ResNet bottleneck) therefore gives
three sites, each with its own width. Outputs are read right after the call
returns, so in-place activations are counted on their true output.

TorchScript modules accept no Python hooks; :func:`deadrelu.scan` observes them with
a ``TorchDispatchMode`` instead (sites named by their order in the root forward).

Unit axis rule
--------------
* 0-D, 1-D and 2-D outputs ``(N, C)``: the last dimension.
* 4-D and larger ``(N, C, *spatial)``: dimension 1 (channels), reduced over batch and space.
* 3-D: dimension 1 when the most recent layer operation before the activation was
  channels-first (convolution, batch/instance/group norm, 1-D pooling), so Conv1d
  outputs ``(N, C, L)`` are per channel; otherwise the last dimension, so
  sequence outputs ``(B, T, C)`` are per hidden unit reduced over batch and tokens.
* Override per site with ``unit_dim=`` (an int for all sites, a mapping from module
  path or site name to a dim, or a callable).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import DeadReluError
from .activations import ACTIVATION_FUNCTIONS, ACTIVATION_MODULES, NONNEGATIVE_FUNCTIONS
from .stats import UnitStats, release_scratch

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_MODULES",
    "ActivationCapture",
    "SiteInfo",
    "UnitDimSpec",
    "ThresholdSpec",
    "display_names",
]

# Layer operations whose output is channels-first (N, C, ...) vs features-last (..., C);
# only consulted to pick the unit axis of 3-D activations.
_CHANNELS_FIRST_PREFIXES = (
    "conv", "_conv", "cudnn_conv", "mkldnn_conv", "batch_norm", "native_batch_norm",
    "_native_batch_norm", "cudnn_batch_norm", "instance_norm", "group_norm", "native_group_norm",
    "max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool", "upsample",
)  # fmt: skip
_CHANNELS_LAST_PREFIXES = (
    "linear", "addmm", "matmul", "mm", "bmm", "baddbmm", "einsum", "layer_norm", "native_layer_norm",
    "rms_norm", "embedding", "scaled_dot_product", "bilinear", "_scaled_dot_product",
)  # fmt: skip

_ACT, _CF, _CL = 1, 2, 3  # kinds of interesting torch functions


def _function_kind(func: Any) -> tuple[int, str] | None:
    """Classify a torch callable once: an activation (with its base name), a layer op, or nothing."""
    name = getattr(func, "__name__", None)
    if not isinstance(name, str):
        return None
    name = name.split(".")[0]  # OpOverload names look like "relu_.default"
    base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
    if base in ACTIVATION_FUNCTIONS:
        return (_ACT, base)
    if name.startswith(_CHANNELS_FIRST_PREFIXES):
        return (_CF, name)
    if name.startswith(_CHANNELS_LAST_PREFIXES):
        return (_CL, name)
    return None


_KIND_CACHE: dict[Any, tuple[int, str] | None] = {}


def _kind_of(func: Any) -> tuple[int, str] | None:
    try:
        return _KIND_CACHE[func]
    except KeyError:
        kind = _KIND_CACHE[func] = _function_kind(func)
        return kind
    except TypeError:  # unhashable callable
        return _function_kind(func)


@dataclass
class SiteInfo:
    """What is known about a site when it is first seen; passed to ``unit_dim``/``threshold`` callables."""

    module: str
    module_type: str
    call: int
    slot: int
    function: str
    shape: tuple[int, ...]
    leaf: bool


UnitDimSpec = Union[None, int, Mapping[str, int], Callable[[SiteInfo], Union[int, None]]]
ThresholdSpec = Union[float, Mapping[str, float], Callable[[SiteInfo], Union[float, None]]]


@dataclass
class _Site:
    """Runtime state of one site: its identity, unit axis and accumulator."""

    info: SiteInfo
    unit_dim: int
    stats: Any  # UnitStats or any object with update(tensor, unit_dim, nonnegative)
    order: int  # first-seen position, for forward-execution order
    nonnegative: bool = False  # |h| = h for this activation


@dataclass
class _Frame:
    path: str
    call: int
    slots: int = 0


@dataclass
class _Forward:
    """Per-forward-pass bookkeeping (reset at each root call)."""

    calls: dict[str, int] = field(default_factory=dict)
    stack: list[_Frame] = field(default_factory=list)
    channels_first: bool = False


class _FunctionSpy(TorchFunctionMode):
    """Sees every torch function called while the model's forward runs."""

    def __init__(self, capture: "ActivationCapture") -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        kind = _kind_of(func)
        if kind is not None:
            self.capture._on_call(kind, out)
        return out


class _DispatchSpy(TorchDispatchMode):
    """Sees aten ops; used for TorchScript modules, whose Python-level calls are invisible."""

    def __init__(self, capture: "ActivationCapture") -> None:
        super().__init__()
        self.capture = capture

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        kind = _kind_of(func)
        if kind is not None:
            self.capture._on_call(kind, out)
        return out


def _default_unit_dim(ndim: int, channels_first: bool) -> int:
    if ndim <= 2:
        return max(ndim - 1, 0)
    if ndim >= 4:
        return 1
    return 1 if channels_first else 2


class ActivationCapture:
    """Attach to a model and accumulate per-unit statistics at every activation site.

    This is the engine behind :func:`deadrelu.scan`, :class:`deadrelu.Probe` and the
    monitor. Hooks are registered by :meth:`attach` and always removed by
    :meth:`detach` (safe to call twice); no module's ``forward`` is replaced.

    Args:
        model: the model to observe.
        unit_dim: unit-axis override (see the module docstring).
        threshold: firing threshold; a float, a mapping from function name / module
            path / site name to float, or a callable returning a float (None = 0).
        stats_factory: builds an accumulator for a new site from ``(units, threshold,
            device)``; defaults to :class:`~deadrelu.core.stats.UnitStats`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        unit_dim: UnitDimSpec = None,
        threshold: ThresholdSpec = 0.0,
        stats_factory: Callable[[int, float, torch.device], Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise DeadReluError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.unit_dim_spec = unit_dim
        self.threshold_spec = threshold
        self.stats_factory = stats_factory or (lambda units, thr, device: UnitStats(units, thr, device))
        self.scripted = isinstance(model, torch.jit.ScriptModule)
        self.sites: dict[tuple[str, int, int, str], _Site] = {}
        self.forwards = 0
        self.last_site: str | None = None
        self._paths = {m: p for p, m in model.named_modules()}
        self._leaf = {p: next(iter(m.children()), None) is None for p, m in model.named_modules()}
        self._types = {p: type(m).__name__ for p, m in model.named_modules()}
        self._graph_sites = _exported_activation_modules(model)
        self._handles: list[Any] = []
        self._fwd = _Forward()
        self._depth = 0
        self._mode: TorchFunctionMode | TorchDispatchMode | None = None
        self.enabled = True

    # -- lifecycle ---------------------------------------------------------------------
    def attach(self) -> "ActivationCapture":
        """Register the hooks (no-op when already attached).

        Raises:
            DeadReluError: for TorchScript modules, which accept no hooks (use ``scan``).
        """
        if self._handles:
            return self
        if self.scripted:
            raise DeadReluError(
                "TorchScript modules accept no Python hooks: use deadrelu.scan(model, data), which "
                "observes them through a dispatch mode"
            )
        try:
            for path, module in self.model.named_modules():
                self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(path, module)))
                self._handles.append(
                    module.register_forward_hook(self._make_post_hook(path, module), always_call=True)
                )
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook and leave any active mode; safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._exit_mode()
        self._depth = 0
        release_scratch()

    def __enter__(self) -> "ActivationCapture":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        """True while hooks are registered."""
        return bool(self._handles)

    # -- forward-pass bookkeeping ---------------------------------------------------------
    def _begin_forward(self) -> None:
        self._fwd = _Forward()
        self.forwards += 1
        self.last_site = None

    def _enter_mode(self) -> None:
        mode: TorchFunctionMode | TorchDispatchMode
        mode = _DispatchSpy(self) if self.scripted else _FunctionSpy(self)
        mode.__enter__()
        self._mode = mode

    def _exit_mode(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)

    @contextlib.contextmanager
    def forward_scope(self) -> Iterator[None]:
        """Observe one forward pass run inside this block (used for TorchScript models)."""
        self._begin_forward()
        self._fwd.stack.append(_Frame("", 0))
        self._enter_mode()
        try:
            yield
        finally:
            self._exit_mode()
            self._fwd.stack.clear()

    def _make_pre_hook(self, path: str, module: nn.Module) -> Callable[..., None]:
        is_root = module is self.model

        def pre_hook(mod: nn.Module, args: Any) -> None:
            if is_root:
                self._depth += 1
                if self._depth == 1:
                    if not self.enabled:
                        return
                    self._begin_forward()
                    self._enter_mode()
            if self._mode is None:
                return
            fwd = self._fwd
            call = fwd.calls.get(path, 0)
            fwd.calls[path] = call + 1
            fwd.stack.append(_Frame(path, call))

        return pre_hook

    def _make_post_hook(self, path: str, module: nn.Module) -> Callable[..., None]:
        is_root = module is self.model

        def post_hook(mod: nn.Module, args: Any, output: Any) -> None:
            stack = self._fwd.stack
            if self._mode is not None and stack and stack[-1].path == path:
                stack.pop()
            if is_root:
                self._depth = max(self._depth - 1, 0)
                if self._depth == 0:
                    self._exit_mode()

        return post_hook

    # -- the hot path ------------------------------------------------------------------------
    def _on_call(self, kind: tuple[int, str], out: Any) -> None:
        code, name = kind
        fwd = self._fwd
        if code != _ACT:
            fwd.channels_first = code == _CF
            return
        if not isinstance(out, torch.Tensor) or not fwd.stack or not self.enabled:
            return
        frame = fwd.stack[-1]
        slot = frame.slots
        frame.slots = slot + 1
        key = (frame.path, frame.call, slot, name)
        site = self.sites.get(key)
        if site is None:
            site = self._new_site(key, out)
        self.last_site = frame.path or "<root>"
        try:
            site.stats.update(out, site.unit_dim, site.nonnegative)
        except DeadReluError as err:
            raise DeadReluError(f"activation site {_describe(site.info)}: {err}") from None
        except Exception as err:  # a failure of deadrelu's own statistics, not of the model
            raise DeadReluError(
                f"deadrelu failed to compute statistics at activation site {_describe(site.info)} for an output "
                f"of shape {tuple(out.shape)} and dtype {out.dtype} on {out.device} "
                f"({type(err).__name__}: {err}); please report this"
            ) from err

    def _new_site(self, key: tuple[str, int, int, str], out: torch.Tensor) -> _Site:
        path, call, slot, name = key
        info = SiteInfo(
            module=path,
            module_type=self._types.get(path, type(self.model).__name__),
            call=call,
            slot=slot,
            function=name,
            shape=tuple(out.shape),
            leaf=self._leaf.get(path, False),
        )
        if name == "hardtanh" and info.module_type == "ReLU6":
            info.function = "relu6"  # nn.ReLU6 is implemented as hardtanh(0, 6)
        if not path and slot < len(self._graph_sites) and self._graph_sites[slot] is not None:
            # A flattened graph (torch.export): name the site after the module it came from.
            info.module, info.module_type, info.call = self._graph_sites[slot]  # type: ignore[misc]
            info.slot, info.leaf = 0, info.module_type in _ACTIVATION_CLASS_NAMES
        default_dim = _default_unit_dim(out.ndim, self._fwd.channels_first)
        unit_dim = resolve_unit_dim(self.unit_dim_spec, info, out.ndim, default_dim)
        units = out.shape[unit_dim] if out.ndim else 1
        thr = resolve_threshold(self.threshold_spec, info)
        site = _Site(
            info,
            unit_dim,
            self.stats_factory(units, thr, out.device),
            order=len(self.sites),
            nonnegative=info.function in NONNEGATIVE_FUNCTIONS,
        )
        self.sites[key] = site
        return site

    # -- results ---------------------------------------------------------------------------
    def ordered_sites(self) -> list[tuple[str, _Site]]:
        """Sites in forward-execution order with their unique display names."""
        return list(zip(display_names([s.info for s in self._in_order()]), self._in_order()))

    def _in_order(self) -> list[_Site]:
        return sorted(self.sites.values(), key=lambda s: s.order)

    def reset(self) -> None:
        """Forget all sites and statistics (hooks stay attached)."""
        self.sites.clear()
        self.forwards = 0
        self.last_site = None


_ACTIVATION_CLASS_NAMES = frozenset(m.__name__ for m in ACTIVATION_MODULES)


def _exported_activation_modules(model: nn.Module) -> list[tuple[str, str, int] | None]:
    """For an fx graph that recorded ``nn_module_stack`` (torch.export), the original module
    path and class of each activation call, in graph order; empty for other models."""
    graph = getattr(model, "graph", None)
    if not isinstance(model, torch.fx.GraphModule) or graph is None:
        return []
    out: list[tuple[str, str, int] | None] = []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        kind = _function_kind(node.target)
        if kind is None or kind[0] != _ACT:
            continue
        stack = node.meta.get("nn_module_stack")
        if not stack:
            out.append(None)
            continue
        path, cls = list(stack.values())[-1]
        cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        call = calls.get(str(path), 0)
        calls[str(path)] = call + 1
        out.append((str(path), cls_name, call))
    return out


def _lookup(spec: Mapping[str, Any], info: SiteInfo) -> Any:
    # Most specific key first: "path:fn", then the module path, then the function name.
    for k in (f"{info.module}:{info.function}", info.module, info.function):
        if k in spec:
            return spec[k]
    return None


def resolve_unit_dim(spec: UnitDimSpec | None, info: SiteInfo, ndim: int, default: int) -> int:
    """The unit dimension a ``unit_dim`` option gives for one site (``default`` where it gives none).

    Raises:
        DeadReluError: when the dimension does not exist in the site's output.
    """
    dim: int | None
    if spec is None:
        dim = None
    elif isinstance(spec, int):
        dim = spec
    elif isinstance(spec, Mapping):
        dim = _lookup(spec, info)
    else:
        dim = spec(info)
    if dim is None:
        return default
    if ndim == 0 or not -ndim <= dim < ndim:
        raise DeadReluError(
            f"unit_dim {dim} is out of range for activation site {_describe(info)} with shape {info.shape}"
        )
    return dim % ndim


def resolve_threshold(spec: ThresholdSpec, info: SiteInfo) -> float:
    """The firing threshold a ``threshold`` option gives for one site (0.0 where it gives none)."""
    if isinstance(spec, (int, float)):
        return float(spec)
    thr = _lookup(spec, info) if isinstance(spec, Mapping) else spec(info)
    return 0.0 if thr is None else float(thr)


def _describe(info: SiteInfo) -> str:
    where = info.module or "<root>"
    return f"{where} ({info.function}, call {info.call + 1}, slot {info.slot + 1})"


def display_names(infos: list[SiteInfo]) -> list[str]:
    """Unique, readable names: ``path`` for an activation module, ``path:fn`` for a functional call,
    ``.k`` for the k-th call of the same function in one forward, ``#k`` for the k-th call of a reused module."""
    calls_per_module: dict[str, set[int]] = {}
    fns_per_call: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for i in infos:
        calls_per_module.setdefault(i.module, set()).add(i.call)
        fns_per_call.setdefault((i.module, i.call), []).append((i.slot, i.function))
    # A leaf module whose every call makes exactly one activation call is an activation module.
    single = {
        m: all(len({s for s, _ in fns_per_call[(m, c)]}) == 1 for c in calls)
        for m, calls in calls_per_module.items()
    }
    names = []
    for i in infos:
        base = i.module or "<root>"
        if not (i.leaf and single[i.module] and i.module):
            same_fn = sorted({s for s, f in fns_per_call[(i.module, i.call)] if f == i.function})
            base += f":{i.function}"
            if len(same_fn) > 1:
                base += f".{same_fn.index(i.slot) + 1}"
        if len(calls_per_module[i.module]) > 1:
            base += f"#{i.call + 1}"
        names.append(base)
    # Dynamic control flow could still collide; make names unique without hiding either site.
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        unique.append(n if k == 0 else f"{n}~{k + 1}")
    return unique
