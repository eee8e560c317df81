"""Which training forward passes the monitor observes, and how many samples each one carries.

:class:`ForwardGate` is the part of :class:`deadrelu.Monitor` that runs in the forward pass: a
pre-hook on the model turns the capture on for the scheduled steps' forward passes with grad
enabled (an activation checkpoint's recompute is not a second pass; the eager capture stays out of
code ``torch.compile`` traces), counts each observed pass's samples into the rolling window, and
:meth:`ForwardGate.observe` makes a block of submodule calls one pass. The functions that read a
call's batch size (:func:`first_input`, :func:`input_rows`, :func:`batch_rows`) are here too. Its
state lives on the monitor (made by ``_init_samples``), beside the options and capture it reads.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import sys
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from . import graph_capture
from .blocks import BlockCapture
from .graph_capture import CompiledModelWarning
from ..core.capture import ActivationCapture
from ..core.inputs import first_tensor, iter_tensors
from ..errors import DeadReluError

__all__ = ["ForwardGate", "batch_rows", "first_input", "input_rows"]


def _is_compiling() -> bool:
    """Whether TorchDynamo is tracing this call (``torch.compiler.is_compiling`` from torch 2.3 on)."""
    check = getattr(torch.compiler, "is_compiling", None)
    if check is None:
        import torch._dynamo as dynamo

        check = dynamo.is_compiling
    return bool(check())


def _checkpoint_recompute() -> bool:
    """Whether this forward is an activation checkpoint's recompute (``torch.utils.checkpoint``)
    of a pass that was observed when it first ran: a forward that autograd's backward runs.

    The reentrant variant (``use_reentrant=True``) ran the pass under ``no_grad`` first, which
    is not observed, so its recompute is the pass's only observation and is not one of these."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    if task is None or task() < 0:  # not inside a backward: the common case, one C call
        return False
    import torch.utils.checkpoint as checkpoint

    reentrant = getattr(getattr(checkpoint, "CheckpointFunction", None), "backward", None)
    code = getattr(reentrant, "__code__", None)
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return False
        frame = frame.f_back
    return True


def _with_frame() -> Any:
    """The frame that entered the ``observe()`` block being opened: the first caller outside
    contextlib and this file."""
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename in (__file__, contextlib.__file__):
        f = f.f_back
    return f


def _entry_code(entry: Any) -> Any:
    """The code object of ``observe(entry=...)``: a function, a bound method or a decorated one."""
    func = inspect.unwrap(getattr(entry, "__func__", entry))
    code = getattr(func, "__code__", None)
    if code is None:
        raise DeadReluError(
            f"Monitor.observe(entry=...) takes the Python function the block runs (such as "
            f"model.training_step), got {type(entry).__name__}"
        )
    return code


class ForwardGate:
    """The part of :class:`deadrelu.Monitor` in the forward pass: gate hooks, sample counts, ``observe()``."""

    def _init_samples(self, window: int) -> None:
        # the samples of the last `window` forwards: grows with them, never to `window` up front
        self._samples_ring: collections.deque[int] = collections.deque(maxlen=window)
        self._samples_total = 0
        self._pass_rows: int | None = None  # the samples the claimed pass in progress added (None: none)
        # A plain int (0: none) for the traced hook to read: the wrapper itself must not be touched there.
        graph_counts = self._op_asks_schedule and self._wrapper is None
        self._sample_counter = graph_capture.sample_counter(self._count_graph_samples) if graph_counts else 0
        self._forwards = 0
        self._scope_counted: bool | None = None  # None: outside observe(); else whether it counted
        self._scoped = False  # an observe() block has counted a pass
        self._pooled_warned: set[str] = set()

    def _gate(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        if module is not self.model:
            return  # a replica sharing the hook dicts (nn.DataParallel): the capture refuses it
        if self._op_asks_schedule:
            # The graph capture asks the schedule when its op runs: nothing here for Dynamo to
            # guard on. Traced into a whole-model graph (not when the monitor was given the
            # compiled wrapper, whose own hook counts), the hook leaves a samples op in the graph.
            if self._sample_counter and _is_compiling() and torch.is_grad_enabled():
                first = first_input(args, kwargs)
                if first is not None:
                    graph_capture.count_samples(first, self._sample_counter)
            return
        if (not self.compiled or isinstance(self.capture, BlockCapture)) and _is_compiling():
            # The function mode would make Dynamo break the graph and recompile every step: the
            # eager capture stays out of compiled code (the block capture's graph half sees it;
            # without compiled=True it runs unobserved, and the monitor says how to see it).
            if not self.compiled:
                self._compiled_unobserved()
            self.capture.enabled = False
            return
        # A checkpoint's recompute in backward runs the forward again, with grad: counted once.
        on = self._observe and torch.is_grad_enabled() and not _checkpoint_recompute()
        self.capture.enabled = on
        if on and self._eager_root and (not self._rows_from_capture or self._scope_counted is not None):
            self._count_rows(input_rows(args, kwargs))  # inside an observe() block, only the block's first
        elif on and self._wrapper is None and self.compiled and not self._eager_root:
            # An older torch's module hooks leave no samples op in the graph: counted outside it.
            self._count_rows_eagerly(input_rows(args, kwargs))

    @torch.compiler.disable
    def _count_rows_eagerly(self, rows: int) -> None:
        self._count_rows(rows)

    def _count_call_rows(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """A pass the eager capture claimed (outside ``observe()``, whose block counts its own samples)."""
        self._pass_rows = None
        if self._scope_counted is None:
            self._pass_rows = input_rows(args, kwargs)
            self._add_samples(self._pass_rows)

    def _uncount_call_rows(self) -> None:
        """The claimed pass raised part-way and its batches were taken back: so are its samples
        (with a full ring, the window then lacks the oldest batch's, as each site's window does)."""
        rows, self._pass_rows = self._pass_rows, None
        if rows is None:
            return
        self._samples_total -= rows
        self._forwards -= 1
        if self._samples_ring:
            self._samples_ring.pop()

    def _count_graph_samples(self, rows: int) -> None:
        """A compiled forward's batch size, handed in by its ``deadrelu::count_samples`` op."""
        if self._observe:
            self._count_rows(rows)

    def _count_rows(self, rows: int) -> None:
        """One observed forward's samples; inside an ``observe()`` block, only the block's first."""
        if self._scope_counted is None:
            self._add_samples(rows)
        else:
            self._count_in_scope(rows)

    def _add_samples(self, n: int) -> None:
        self._samples_total += n
        self._samples_ring.append(n)
        self._forwards += 1

    def _gate_wrapper(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        """Pre-hook on the ``torch.compile`` wrapper the monitor was given: it runs eagerly, before
        the compiled code, so the samples of observed forwards are counted as in eager mode."""
        if self._observe and torch.is_grad_enabled() and not _is_compiling() and not _checkpoint_recompute():
            self._count_rows(input_rows(args, kwargs))

    @torch.compiler.disable
    def _compiled_unobserved(self) -> None:
        if not self._compile_warned:
            self._compile_warned = True
            warnings.warn(
                "deadrelu: this model is being run by torch.compile, which cannot trace the monitor's "
                "default capture; it runs unobserved. Create the monitor with compiled=True before "
                "compiling, or pass the compiled module: Monitor(torch.compile(model))",
                CompiledModelWarning,
                stacklevel=2,
            )

    @contextlib.contextmanager
    def observe(self, batch: Any = None, *, entry: Callable[..., Any] | None = None) -> Iterator[None]:
        """Treat everything run inside this block as one training forward pass.

        For code that calls submodules directly instead of ``model(...)`` — Lightning's
        ``training_step`` calling ``self.net(x)`` is the usual case. The schedule and the
        grad-mode rule apply as for ordinary forward passes. The pass's samples
        (``Report.samples``) are the leading dim of ``batch``'s first tensor when it is given,
        else of the first input of the first module called inside the block.

        A functional call made in the block outside any module (``F.gelu`` in the step's own
        code) is a site keyed by its source position up to the ``with`` statement's frame, so
        the training loop above that frame does not matter. Where the block is entered
        elsewhere than in a caller of the code it observes (a callback that opens it before the
        framework calls ``training_step``), pass that function as ``entry``: positions then end
        at its frame.

        Example:
            >>> import torch, deadrelu
            >>> outer = torch.nn.Module()
            >>> outer.net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
            >>> with deadrelu.Monitor(outer, window=1) as mon:
            ...     with mon.observe():
            ...         _ = outer.net(torch.randn(4, 2))
            ...     mon.step()
            >>> [s.name for s in mon.report().sites]
            ['net.1']
        """
        if self._scope_counted is not None:  # inside another observe() block: part of that pass
            yield
            return
        active = self.attached and self._observe and torch.is_grad_enabled()
        previous, self.capture.enabled = self.capture.enabled, active
        eager = getattr(self.capture, "eager", self.capture)  # the block capture's eager half
        rows = batch_rows(batch) if batch is not None else 0
        # A batch whose size cannot be read (a dataclass, a graph batch) falls back to the first call's input.
        watches = active and isinstance(eager, ActivationCapture) and rows == 0
        outer = self._scope_counted
        until = _entry_code(entry) if entry is not None else _with_frame()
        try:
            if active:
                self._scoped = True  # several forwards may make one counted pass: see _warn_pooled
                self._scope_counted = False
                if rows:
                    self._count_in_scope(rows)
                elif watches:
                    eager.on_scope_call = lambda call: self._count_in_scope(input_rows(*call))
                with self.capture.forward_scope(until=until):
                    yield
            else:
                yield
        finally:
            del until  # a frame: kept no longer than the block
            self.capture.enabled = previous
            self._scope_counted = outer
            if watches:
                eager.on_scope_call = None

    def _count_in_scope(self, rows: int) -> None:
        """Samples of an ``observe()`` pass: counted once, however many modules it calls."""
        if self._scope_counted is False:
            self._scope_counted = True
            self._add_samples(rows)


def batch_rows(batch: Any) -> int:
    """The leading dim of the first tensor in a batch (nested tuples, lists and mappings), else 0.

    >>> batch_rows({"x": torch.zeros(5, 3), "y": torch.zeros(5)}), batch_rows((torch.zeros(()),)), batch_rows("text")
    (5, 0, 0)
    """
    first = first_tensor(batch)
    return int(first.shape[0]) if first is not None and first.ndim else 0


def first_input(args: Any, kwargs: Any) -> torch.Tensor | None:
    """A model call's first batched tensor: depth first through its positional arguments, then
    its keyword ones (``input_ids=...``, HF style), looking inside tuples, lists and dicts; 0-D
    tensors (a scalar option) are skipped.

    >>> first_input(((torch.zeros(()), [torch.zeros(3, 2)]),), {"y": torch.zeros(5)}).shape
    torch.Size([3, 2])
    """
    # A plain loop, not next(generator, None): TorchDynamo traces this (a monitor's root hook
    # under torch.compile), and torch <= 2.6 cannot trace next() with a default.
    for tensor in iter_tensors((args or (), kwargs or {})):
        if tensor.ndim:
            return tensor
    return None


def input_rows(args: Any, kwargs: Any) -> int:
    """The samples of a model call: the leading dim of :func:`first_input` (0 when there is none)."""
    first = first_input(args, kwargs)
    return int(first.shape[0]) if first is not None else 0
