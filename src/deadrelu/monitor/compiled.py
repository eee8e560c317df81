"""Capture for ``torch.compile``: forward hooks on activation modules whose state lives only in tensors.

The default capture enters a ``TorchFunctionMode`` for each forward pass. TorchDynamo
traces into such a mode and into the Python bookkeeping around it, which breaks the
graph and recompiles every step. This capture instead registers one forward hook per
activation *module* (``nn.ReLU``, ``nn.GELU``, ... — see
:data:`deadrelu.ACTIVATION_MODULES`), and each hook only runs tensor operations on
tensors allocated beforehand: the ring position, the batch counter and the per-slot
observation counts are tensors too, so Dynamo traces the hooks into the compiled graph,
mutations included, and guards only on the on/off switch (two graphs in all).

Limits, by construction: functional activations called inside ``forward``
(``F.relu(x)``) are not seen; a module called several times per forward pass pools its
calls into one site (each call is one window row) — an experts loop's activation module
included, which is said once where its first input names one expert of a stacked weight
(see :func:`~deadrelu.monitor.graph_capture.expert_of_input`); a 3-D activation takes its
units on the last dimension unless ``unit_dim`` says otherwise. A site is created, outside
the graph, the first time its module runs, which costs one extra compilation.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .graph_capture import CompiledModelWarning, expert_of_input
from .window import WindowTotals
from ..core.activations import ACTIVATION_MODULES, MODULE_FUNCTIONS, NONNEGATIVE_FUNCTIONS
from ..core.capture import (
    SiteInfo,
    ThresholdSpec,
    UnitDimSpec,
    checked_threshold,
    checked_unit_dim,
    resolve_threshold,
    resolve_unit_dim,
)
from ..errors import DeadReluError
from ..core.stats import StatTensors, as_unit_batch, traceable_batch_sums

__all__ = ["ModuleCapture", "TensorWindowStats"]


class TensorWindowStats:
    """The rolling-window accumulator of :class:`~deadrelu.monitor.window.WindowStats`, with every
    piece of state a tensor so a compiled graph can update it.

    The ring and the banked rows are :class:`~deadrelu.core.stats.StatTensors` (the same
    declared statistics as the scan); a batch's contribution comes from
    :func:`~deadrelu.core.stats.traceable_batch_sums`, plain torch reductions that Inductor
    fuses into one read of the activation.

    Example:
        >>> w = TensorWindowStats(2, 0.0, "cpu", window=2)
        >>> for v in ([1.0, 0.0], [0.0, 0.0], [0.0, 0.0]):
        ...     w.update(torch.tensor([v]), unit_dim=1)
        >>> w.totals("window").fired.tolist(), w.totals("total").fired.tolist()
        ([0, 0], [1, 0])
    """

    def __init__(self, units: int, threshold: float, device: torch.device | str | None, window: int) -> None:
        self.units = int(units)
        self.threshold = float(threshold)
        self.window = int(window)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.nonnegative = False
        self.ring = StatTensors(self.units, self.device, leading=(self.window,))
        self.banked = StatTensors(self.units, self.device)
        self.first = StatTensors(self.units, self.device)  # the first `window` batches (see WindowStats.first)
        self.pos = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.count = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._full = False  # host-side latch, so `full` syncs only until the first window is complete

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The ring's state tensors by name, shape ``(window, ...)`` (for reduction by key)."""
        return self.ring.state

    @property
    def full(self) -> bool:
        """True once ``window`` batches have been seen (reads the device counter until then)."""
        if not self._full:
            self._full = int(self.count.item()) >= self.window
        return self._full

    @torch.no_grad()
    def update(
        self,
        activation: torch.Tensor,
        unit_dim: int,
        nonnegative: bool | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add one batch (tensor operations only: traceable by TorchDynamo)."""
        x, unit_dim = as_unit_batch(activation, unit_dim, self.units)
        nonneg = self.nonnegative if nonnegative is None else nonnegative
        new = traceable_batch_sums(x, unit_dim, self.threshold, nonneg, mask)
        leaving = self.count >= self.window  # (1,) bool: the slot holds a batch that leaves the window
        for name, ring in self.ring.state.items():
            old = ring.index_select(0, self.pos).squeeze(0)
            self.banked.state[name].add_(torch.where(leaving, old, torch.zeros_like(old)))
            self.first.state[name].add_(torch.where(leaving, torch.zeros_like(new[name]), new[name]))
            ring.index_copy_(0, self.pos, new[name].unsqueeze(0))
        self.pos.copy_(torch.remainder(self.pos + 1, self.window))
        self.count.add_(1)

    @torch.no_grad()
    def totals(self, scope: str) -> WindowTotals:
        """Per-unit sums over ``"window"``, ``"total"`` or ``"first"`` (same meaning as ``WindowStats.totals``)."""
        count = int(self.count.item())
        if scope == "first":
            return WindowTotals({k: t.clone() for k, t in self.first.state.items()}, min(count, self.window))
        summed = self.ring.summed()  # rows not yet written are zero
        if scope == "window":
            return WindowTotals(summed, min(count, self.window))
        return WindowTotals({k: v + self.banked.state[k] for k, v in summed.items()}, count)


@dataclass
class _Site:
    info: SiteInfo
    unit_dim: int
    stats: TensorWindowStats
    order: int


class ModuleCapture:
    """Hooks on activation modules only, with tensor-only state (see the module docstring).

    Presents the part of :class:`deadrelu.ActivationCapture`'s interface the monitor uses.

    Args:
        model: the (uncompiled) model; compile it after :meth:`attach`, or pass the module
            inside ``torch.compile``'s result (``compiled._orig_mod``).
        unit_dim: int, mapping from module path to dim, or callable on :class:`SiteInfo`.
        threshold: float, mapping (function name, module path or ``path:fn``) or callable.
        window: rolling-window length in batches.

    Raises:
        DeadReluError: when the model has no activation module.
    """

    def __init__(self, model: nn.Module, *, unit_dim: UnitDimSpec, threshold: ThresholdSpec, window: int) -> None:
        self.model = model
        self.unit_dim_spec = checked_unit_dim(unit_dim)
        self.threshold_spec = checked_threshold(threshold)
        self.window = window
        self.sites: dict[str, _Site] = {}
        self.enabled = True
        self.forwards = 0
        self._handles: list[Any] = []
        self._modules = [(p, m) for p, m in model.named_modules() if isinstance(m, ACTIVATION_MODULES)]
        if not self._modules:
            raise DeadReluError(
                f"{type(model).__name__} has no activation modules (nn.ReLU, nn.GELU, ...): monitoring a "
                "compiled model sees activation modules only, not functional calls such as F.relu"
            )

    def attach(self) -> "ModuleCapture":
        """Register one forward hook per activation module (no-op when attached)."""
        if not self._handles:
            for path, module in self._modules:
                self._handles.append(module.register_forward_hook(self._make_hook(path, module)))
        return self

    def detach(self) -> None:
        """Remove the hooks; safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        """True while hooks are registered."""
        return bool(self._handles)

    @contextlib.contextmanager
    def forward_scope(self, until: Any = None) -> Iterator[None]:
        """Module hooks need no scope: whatever runs the modules is observed (``until``, which
        bounds eager functional call positions, does not apply)."""
        yield

    def _make_hook(self, path: str, module: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            if not self.enabled or not torch.is_grad_enabled() or not isinstance(out, torch.Tensor):
                return
            site = self.sites.get(path)
            if site is None:
                site = self._new_site(path, module, out, args[0] if args else None)
            site.stats.update(out, site.unit_dim)

        return hook

    @torch.compiler.disable
    def _new_site(self, path: str, module: nn.Module, out: torch.Tensor, inp: Any = None) -> _Site:
        # Runs outside the graph once per site: allocates the state the traced hook then updates.
        if isinstance(inp, torch.Tensor) and expert_of_input(inp) is not None:
            warnings.warn(
                f"deadrelu: activation module {path!r} acts on one expert's rows of a stacked expert weight (an MoE "
                "experts loop); module hooks give it one site, so every expert's rows pool into it (a unit dead in "
                "one expert reads alive if another fires). Use the eager monitor (compiled=False), which keeps one "
                "site per expert",
                CompiledModelWarning,
                stacklevel=3,
            )
        function = MODULE_FUNCTIONS.get(type(module).__name__, type(module).__name__.lower())
        info = SiteInfo(path, type(module).__name__, 0, 0, function, tuple(out.shape), True)
        default_dim = 1 if out.ndim >= 4 else max(out.ndim - 1, 0)  # no layer-op heuristic inside a graph
        unit_dim = resolve_unit_dim(self.unit_dim_spec, info, out.ndim, default_dim)
        units = out.shape[unit_dim] if out.ndim else 1
        stats = TensorWindowStats(units, resolve_threshold(self.threshold_spec, info), out.device, self.window)
        stats.nonnegative = function in NONNEGATIVE_FUNCTIONS
        site = _Site(info, unit_dim, stats, order=len(self.sites))
        self.sites[path] = site
        return site

    def ordered_sites(self) -> list[tuple[str, _Site]]:
        """Sites in first-call order, named by module path."""
        return [(s.info.module or "<root>", s) for s in sorted(self.sites.values(), key=lambda s: s.order)]

    def reset(self) -> None:
        """Forget all sites (hooks stay attached)."""
        self.sites.clear()
