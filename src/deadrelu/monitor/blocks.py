"""Monitoring a model whose blocks are compiled one by one, with the rest of it eager.

``model.layers[i] = torch.compile(model.layers[i])`` (torchtitan's recipe; a ResNet's stages, a
U-Net's blocks) leaves the model's own forward eager: its stem, head and glue run as plain
Python around the compiled calls. :class:`BlockCapture` observes both halves without giving up
compilation:

* inside the compiled blocks, :class:`~deadrelu.monitor.graph_capture.GraphCapture`: the sums
  are part of the compiled graphs, each block's (and each call's) sums go to its own sites;
* outside them, the eager :class:`~deadrelu.core.capture.ActivationCapture`, with no hooks inside
  the blocks and its function mode suspended while a block runs (the blocks' wrappers call hooks
  eagerly around the compiled code), so Dynamo compiles them as it would without deadrelu. A
  block without parameters (nothing would tell which such block ran a shared graph) is the
  eager half's too: it runs eagerly while observed.

Sites of both halves are merged in first-seen order (one process-wide counter numbers them)
and named together, so names are those of the eager monitor on the uncompiled model.

The model call's ``attention_mask`` reaches the blocks' graphs through the op
``deadrelu::call_mask``, inserted at the start of each block graph: it returns the running call's
mask over the block input's two leading dims (all True when the call has none), so block sites
skip padding as in eager mode.

Limit: a tensor that leaves a block carries no unit axis from its producer inside it, so an
eager activation applied directly to a block's output takes the rank rule (last dim for 2-D and
3-D tensors, channels for 4-D ones) where eager mode would follow the producer.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from torch import nn

from ..core.capture import ActivationCapture, ThresholdSpec, UnitDimSpec, display_names
from .graph_capture import GraphCapture, set_call_mask

__all__ = ["BlockCapture"]


class BlockCapture:
    """The eager capture and the graph capture of one model, presented as one capture.

    Presents the part of :class:`deadrelu.ActivationCapture`'s interface the monitor uses.

    Args:
        model: the model, whose compiled blocks are ``torch.compile`` wrappers inside it.
        eager: builds the eager capture (with window rings) from the model and keyword options.
        unit_dim, threshold, window, observing, mask: as for :class:`GraphCapture`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eager: Callable[..., ActivationCapture],
        unit_dim: UnitDimSpec,
        threshold: ThresholdSpec,
        window: int,
        observing: Callable[[], bool],
        mask: Any = None,
    ) -> None:
        self.model = model
        self.graph = GraphCapture(
            model, unit_dim=unit_dim, threshold=threshold, window=window, observing=observing, mask=mask, eager_beside=True
        )
        self.eager = eager(model, unit_dim=unit_dim, threshold=threshold, mask=mask, beside_compiled_blocks=True)
        self._handles: list[Any] = []

    def _hand_mask_in(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        # after the eager half's own root hook, which took this call's mask
        if self.eager.enabled:
            set_call_mask(self.eager.current_mask, *self.eager.current_decoder_mask)
        else:
            set_call_mask(None)

    def _call_done(self, module: nn.Module, args: Any, output: Any) -> None:
        set_call_mask(None)

    # -- the capture interface ------------------------------------------------------------------
    @property
    def sites(self) -> dict[tuple[Any, ...], Any]:
        """Every site of both halves (keys tagged with the half)."""
        out: dict[tuple[Any, ...], Any] = {("eager", *k): v for k, v in self.eager.sites.items()}
        out.update({("graph", *k): v for k, v in self.graph.sites.items()})
        return out

    @property
    def uncaptured(self) -> dict[str, str]:
        return {**self.eager.uncaptured, **self.graph.uncaptured}

    @property
    def enabled(self) -> bool:
        """Whether the eager half observes this thread's forward passes (the graph half asks the schedule)."""
        return self.eager.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.eager.enabled = value

    def ordered_sites(self) -> list[tuple[str, Any]]:
        """Sites of both halves in first-seen order with display names given over all of them."""
        ordered = sorted(self.sites.values(), key=lambda s: s.order)
        return list(zip(display_names([s.info for s in ordered]), ordered))

    def attach(self) -> "BlockCapture":
        if self.attached:
            return self
        self.graph.attach()
        try:
            self.eager.attach()
            self._handles.append(self.model.register_forward_pre_hook(self._hand_mask_in, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._call_done, always_call=True))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.eager.detach()
        self.graph.detach()

    @property
    def attached(self) -> bool:
        return self.graph.attached and self.eager.attached

    @contextlib.contextmanager
    def forward_scope(self, until: Any = None) -> Iterator[None]:
        with self.graph.forward_scope(), self.eager.forward_scope(until=until):
            yield

    def new_forward(self) -> None:
        self.graph.new_forward()

    def reset(self) -> None:
        self.eager.reset()
        self.graph.reset()
