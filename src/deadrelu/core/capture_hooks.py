"""How an :class:`~deadrelu.core.capture.ActivationCapture` follows a forward pass. Forward pre/post
hooks on every submodule (registered by ``attach``, removed by ``detach``) keep the stack of running
module calls (:class:`Frame`) that each activation call is attributed to; the root module's hooks
start and end an observed pass (:class:`Forward`, its bookkeeping) in the one thread that owns it,
entering the torch mode and leaving it; a compiled block is suspended around, or run eagerly; and
``forward_scope`` observes a pass with no root call.

:class:`CaptureHooks` is a part of ``ActivationCapture`` (one of its bases): its methods read the
state that ``ActivationCapture.__init__`` sets and call the capture's ``_module_call`` (a module
call's number) and ``_on_module_output`` (an activation module's output, counted).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import DeadReluError
from .activations import calls_no_activation
from .call_positions import module_call_entry
from .compiled_blocks import eager_modules, eager_stance, is_compiled_wrapper
from .hooks import copy_safe_hook
from .inputs import call_samples, decoder_mask_of_call, mask_from_call
from .observation_masks import input_sources
from .sites import describe_site
from .spies import DispatchSpy, FunctionSpy
from .stats import release_scratch
from .unit_axis import AxisTable, WeightSlice

if TYPE_CHECKING:
    from .capture import ActivationCapture

__all__ = ["CaptureHooks", "Forward", "Frame"]


def _raised_in(module: nn.Module) -> bool:
    """Whether a forward post-hook runs because ``module``'s call raised (torch runs the
    ``always_call`` hooks from the handler in ``Module._call_impl``), not a call that returned None
    inside a user's own ``except`` block: the exception being handled was caught in that call."""
    tb = sys.exc_info()[2]
    if tb is None:
        return False
    frame = tb.tb_frame
    return frame.f_code is _CALL_IMPL_CODE and frame.f_locals.get("self") is module


_CALL_IMPL_CODE = getattr(nn.Module._call_impl, "__code__", None)


@dataclass
class Frame:
    """One module call on the observed pass's stack: its path, call number and activation calls so far."""

    path: str
    call: int
    slots: int = 0
    counted: bool = False  # its output was counted by a fused kernel already
    entry: Any = None  # the Python frame of its Module._call_impl (where its callees' positions end)
    scope: bool = False  # the root of a forward_scope() block: no module call, just the caller's code
    until: Any = None  # a scope's boundary (a Python frame or code object): its root-level calls' positions end there
    # an activation module of an experts layer: the WeightSlice its input came from (one expert's slice,
    # or every expert's rows of a grouped or batched matmul) and each expert's call number
    experts: tuple[WeightSlice, tuple[int, ...]] | None = None
    muted: bool = False  # a module called from a scope block with gradients off: not observed (see CaptureHooks)


@dataclass
class Forward:
    """Per-forward-pass bookkeeping (reset at each root call)."""

    calls: dict[str, int] = field(default_factory=dict)
    stack: list[Frame] = field(default_factory=list)
    axes: AxisTable = field(default_factory=AxisTable)  # each tensor's feature axis and the rule that chose it
    seen: dict[Any, int] = field(default_factory=dict)  # call position -> times reached in this forward
    module_seen: dict[Any, int] = field(default_factory=dict)  # the same for module calls
    inside_activation: int = 0  # depth of activation modules: their inner calls are not sites
    muted: int = 0  # depth of muted module calls: nothing inside them is a site
    mask: torch.Tensor | None = None
    mask_given: bool = False  # the mask came from a mask= option, not from the call's attention_mask
    masks: dict[tuple[torch.device, bool], torch.Tensor] = field(default_factory=dict)
    decoder_split: bool = False  # an encoder-decoder call: decoder sites take decoder_mask
    decoder_mask: torch.Tensor | None = None
    # In a call with inputs of other shapes than its mask's (B, T) (CLIP's pixel_values beside its
    # input_ids): which tensors come from the token inputs (True) and which from the others only
    # (False), by identity: the mask never lies over the latter, even where the lengths agree.
    sources: dict[int, tuple[Any, bool]] | None = None
    # per mask (the call's, the decoder's): whether it lay over some activation of this pass
    # (absent: no activation counted with it yet), and the shape of one it did not fit, for the
    # message when it fits none — each mask apart, as one that fits hides no other that does not
    mask_fit: dict[bool, bool] = field(default_factory=dict)
    unfit_shape: dict[bool, tuple[int, ...]] = field(default_factory=dict)
    # sites whose activation the mask did not lie over although its rows are not the batch's (flattened
    # (B·T, C) tokens, an expert's routed rows): their padding was counted, where other sites' was not
    unfit_sites: dict[int, tuple[Any, bool, tuple[int, ...]]] = field(default_factory=dict)
    written: list[Any] = field(default_factory=list)  # the accumulators each batch of this pass went into, in order
    samples: int = 0  # the samples this pass added to the capture's count


class CaptureHooks:
    """The hooks and the observed forward pass of :class:`~deadrelu.core.capture.ActivationCapture`."""

    #: Whether a ``forward_scope()`` block observes only what runs in it with gradients on: the
    #: monitor's does (a target network's ``no_grad`` pass inside ``training_step`` is no training
    #: pass), a scan's does not (it runs under ``no_grad`` throughout).
    scope_needs_grad = False

    def _muted_in_scope(self, fwd: "Forward") -> bool:
        """Whether a call made now is left unobserved: inside a muted module call, or made straight
        from a scope block that observes gradient-enabled work only while gradients are off."""
        if fwd.muted:
            return True
        return self.scope_needs_grad and len(fwd.stack) == 1 and fwd.stack[0].scope and not torch.is_grad_enabled()

    @property
    def enabled(self) -> bool:
        """Whether forward passes started by the current thread are observed (default True)."""
        return getattr(self._tls, "enabled", True)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._tls.enabled = bool(value)

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
            for path, module in eager_modules(self.model):
                is_root = module is self.model
                if not is_root and (calls_no_activation(module) or path in self._inside_blocks):
                    continue  # no site can occur inside it (or a graph capture sees them): no hooks
                pre = copy_safe_hook(self._make_pre_hook(path, module))
                self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                post = copy_safe_hook(self._make_post_hook(path, module))
                self._handles.append(module.register_forward_hook(post, always_call=True))
            if self._beside_blocks:
                for module in self.model.modules():
                    if module is not self.model and is_compiled_wrapper(module):
                        self._handles.append(module.register_forward_pre_hook(copy_safe_hook(self._suspend)))
                        self._handles.append(module.register_forward_hook(copy_safe_hook(self._resume), always_call=True))
        except BaseException:
            self.detach()
            raise
        return self

    def _suspend(self, module: nn.Module, args: Any) -> None:
        """A compiled block starts: leave the function mode, so Dynamo runs it as without deadrelu
        — or, for a block this capture observes itself (no parameters), run it eagerly."""
        mode = self._mode if self._owner == threading.get_ident() else None
        if mode is not None and next(module.parameters(), None) is None:
            stance = eager_stance()
            stance.__enter__()
            self._suspended.append(stance)
            return
        self._suspended.append(mode)
        if mode is not None:
            mode.__exit__(None, None, None)

    def _resume(self, module: nn.Module, args: Any, output: Any) -> None:
        held = self._suspended.pop() if self._suspended else None
        if isinstance(held, TorchFunctionMode):
            if held is self._mode:
                held.__enter__()
                self._carry_axis_through(args, output)
        elif held is not None:
            held.__exit__(None, None, None)  # the eager stance of a parameter-free block

    def _carry_axis_through(self, args: Any, output: Any) -> None:
        """The compiled block ran unseen: give its output its input's feature axis when the
        shapes agree (a residual block's hidden states), as the block's own ops would have carried
        it in eager mode; an output of another shape is left to the rank rule."""
        first = args[0] if isinstance(args, tuple) and args else None
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(first, torch.Tensor) and isinstance(out, torch.Tensor) and out.shape == first.shape:
            self._fwd.axes.carry(first, out)

    def detach(self) -> None:
        """Remove every hook and leave any active mode; safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._owner in (None, threading.get_ident()):
            self._exit_mode()  # a mode is thread-local: only its own thread can leave it
        self._mode = None
        self._depth = 0
        self._owner = None
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
    def _begin_forward(self, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None) -> None:
        self._fwd = Forward()
        self.op_error = self.own_error = None
        self.forwards += 1
        self._fwd.samples = call_samples(args, kwargs)
        self.samples += self._fwd.samples
        if self.on_forward is not None:
            self.on_forward(args, kwargs or {})
        self.last_site = None
        mask, given = self.batch_mask, self.batch_mask_given
        if mask is None and self.mask_spec is not False:
            mask = mask_from_call(self.mask_spec, args, kwargs or {}, self._mask_position)
            given = self.mask_spec is not None
        self._fwd.mask = mask
        self._fwd.mask_given = given
        # The call's own attention_mask is the encoder's in a seq2seq model; its decoder sites take the
        # decoder_attention_mask, which a call may pass alone (Whisper, T5 without an encoder mask).
        if not given:
            self._fwd.decoder_split, self._fwd.decoder_mask = decoder_mask_of_call(self.model, args, kwargs or {})
        if mask is not None:
            self._fwd.sources = input_sources(args, kwargs or {}, mask)

    def _end_forward(self) -> None:
        """A mask that lay over no activation of the pass counted every position, padding included:
        an error for a ``mask=`` option (its shape is wrong for this batch), a warning, once, for
        the call's own ``attention_mask`` (the model's activations are not laid out ``(B, T, ...)``)."""
        fwd = self._fwd
        if self.scripted:
            self._note_script_calls()
        for decoder, fits in fwd.mask_fit.items():
            if fits:
                continue
            mask = fwd.decoder_mask if decoder else fwd.mask
            name = "decoder_attention_mask" if decoder else "observation mask"
            what = (
                f"the {name} of shape {tuple(mask.shape)} fits no activation of this forward pass "
                f"(an activation's leading dimensions must be (B, T) or (T, B); e.g. {fwd.unfit_shape[decoder]})"
            )
            if fwd.mask_given:
                raise DeadReluError(f"{what}: give a mask of each batch's (B, T) shape, or mask=False to count every position")
            if decoder not in self._warned_unfit:
                self._warned_unfit.add(decoder)
                warnings.warn(
                    f"deadrelu: {what}, so every position was counted, padding included; pass mask= in the "
                    "activations' layout, or mask=False to silence this",
                    stacklevel=4,
                )
        self._warn_unfit_sites(fwd)

    def _warn_unfit_sites(self, fwd: Forward) -> None:
        """Where the mask lay over some activations of the pass but not over a site whose rows are
        tokens in another layout (a ``(B·T, C)`` shared expert beside ``(B, T, C)`` layers, routed
        experts' rows), that site counted its padding: said in one warning per pass that finds such
        sites, each site named once in the capture's lifetime (an experts layer's sites as one)."""
        for decoder in (False, True):
            new = [
                (key, info, shape) for key, (info, dec, shape) in fwd.unfit_sites.items()
                if dec is decoder and fwd.mask_fit.get(decoder) and key not in self._warned_unfit_sites
            ]  # fmt: skip
            if not new:
                continue  # (a mask that fits nothing is said above, for the whole pass)
            self._warned_unfit_sites.update(key for key, _, _ in new)
            places: dict[str, tuple[int, ...]] = {}
            for _, info, shape in new:
                places.setdefault(describe_site(info), shape)
            listed = "; ".join(f"{where}, of shape {shape}" for where, shape in list(places.items())[:4])
            more = f"; and {len(places) - 4} more" if len(places) > 4 else ""
            mask = fwd.decoder_mask if decoder else fwd.mask
            name = "decoder_attention_mask" if decoder else "observation mask"
            warnings.warn(
                f"deadrelu: the {name} of shape {tuple(mask.shape)} lies over this pass's (B, T) activations but "
                f"not over {len(new)} site(s) whose rows are tokens in another layout (flattened, routed, or heads "
                f"before tokens): "
                f"{listed}{more}. Every position of those was counted, padding included; pass mask=False to "
                "count padding everywhere alike",
                stacklevel=4,
            )

    def _note_script_calls(self) -> None:
        """A TorchScript model's sites are its k-th call of each function in the pass: a pass that
        makes a different number of calls of a function (a scripted branch) may have shifted them
        onto each other's sites — said once, as nothing else can tell."""
        calls = tuple(sorted((where[3], n) for where, n in self._fwd.seen.items()))
        if self._script_calls is None:
            self._script_calls = calls
        elif calls != self._script_calls and not self._warned_script:
            self._warned_script = True
            counts = lambda c: ", ".join(f"{n} {name}" for name, n in c)  # noqa: E731
            warnings.warn(
                f"deadrelu: this TorchScript model made {counts(calls)} call(s) in one pass and {counts(self._script_calls)} "
                "in another: scripted sites are numbered by call order, so a branch that skips a call moves the later "
                "calls of that function onto other sites; scan the eager module for sites keyed by their place in the code",
                stacklevel=4,
            )

    def _enter_mode(self) -> None:
        mode: TorchFunctionMode | TorchDispatchMode
        mode = DispatchSpy(self) if self.scripted else FunctionSpy(self)
        if self._has_compiled_blocks:  # observed passes run compiled blocks eagerly (see eager_stance)
            self._stance = eager_stance()
            self._stance.__enter__()
        mode.__enter__()
        self._mode = mode

    def _exit_mode(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)
        stance, self._stance = self._stance, None
        if stance is not None:
            stance.__exit__(None, None, None)

    @contextlib.contextmanager
    def forward_scope(
        self, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None, until: Any = None
    ) -> Iterator[None]:
        """Observe one forward pass run inside this block (used for TorchScript models, whose
        calls no hook sees: ``args``/``kwargs`` are the call's, for its mask and samples).
        ``until`` (a frame or code object) bounds the positions of the block's own functional
        calls (see ``_frames_up_to`` in :mod:`~deadrelu.core.call_positions`)."""
        me = threading.get_ident()
        with self._lock:
            previous = self._owner
            if previous is not None and previous != me:
                raise DeadReluError("another thread is running a forward pass observed by this capture")
            self._owner = me
        self._begin_forward(args, kwargs)
        self._fwd.stack.append(Frame("", 0, scope=True, until=until))
        self._enter_mode()
        try:
            yield
        finally:
            self._exit_mode()
            self._fwd.stack.clear()
            self._owner = previous
        self._end_forward()  # only after a pass that finished: a failing one raises its own error

    def _foreign_call(self, mod: nn.Module) -> None:
        # The hook fired for another module object than the one it was registered on: a
        # shallow replica (nn.DataParallel) sharing the hook dicts. Copies made with deepcopy or
        # pickle carry inert hooks instead and never get here.
        if getattr(mod, "_is_replica", False):
            raise DeadReluError(
                "deadrelu cannot observe nn.DataParallel replicas (they run in threads on copies of "
                "the model): scan or probe the module itself, or use DistributedDataParallel"
            )

    def _make_pre_hook(self, path: str, module: nn.Module) -> Callable[..., None]:
        is_root = module is self.model
        activation = path in self._act_modules

        def pre_hook(mod: nn.Module, args: Any, kwargs: Any = None) -> None:
            if mod is not module:
                return self._foreign_call(mod)
            if is_root:
                if not self.enabled and not self._depth:
                    return  # an unobserved pass (per thread) never claims the capture
                if torch.jit.is_tracing():
                    return  # torch.jit.trace would record the statistics' ops into the model's graph
                me = threading.get_ident()
                with self._lock:
                    if self._depth and self._owner != me:
                        return  # another thread's forward is being observed: leave this one alone
                    self._owner = me
                    self._depth += 1
                    first = self._depth == 1
                if first:
                    if not self.enabled:
                        return
                    self._begin_forward(args, kwargs)
                    self._enter_mode()
            elif self._owner != threading.get_ident():
                return
            if self._mode is None:
                return
            fwd = self._fwd
            if self._muted_in_scope(fwd):  # kept on the stack, so the post-hook pops what this pushed
                fwd.stack.append(Frame(path, -1, muted=True))
                fwd.muted += 1
                return
            if self.on_scope_call is not None and len(fwd.stack) == 1 and not is_root:
                call, self.on_scope_call = self.on_scope_call, None
                call((args, kwargs))  # the first module called inside a forward_scope() block: its inputs
            entry = module_call_entry()
            origin = fwd.axes.origin(args[0]) if activation and args else None
            call = self._module_call(fwd, path, entry, origin)
            if origin is None:
                frame = Frame(path, call, entry=entry)
            else:  # an experts layer: every expert's call number
                frame = Frame(path, call[0] if origin.grouped else call[origin.index], entry=entry, experts=(origin, call))
            fwd.stack.append(frame)
            if activation:
                fwd.inside_activation += 1

        return pre_hook

    def _make_post_hook(self, path: str, module: nn.Module) -> Callable[..., None]:
        is_root = module is self.model
        activation = self._act_modules.get(path)
        lookalike = path in self._lookalikes

        def post_hook(mod: nn.Module, args: Any, output: Any) -> None:
            if mod is not module or self._owner != threading.get_ident():
                return
            stack = self._fwd.stack
            if self._mode is not None and stack and stack[-1].path == path and stack[-1].muted:
                stack.pop()
                self._fwd.muted -= 1
            elif self._mode is not None and stack and stack[-1].path == path:
                frame = stack.pop()
                if activation is not None:
                    self._fwd.inside_activation -= 1
                    if not self._fwd.inside_activation and not frame.counted:
                        self._on_module_output(activation, frame, output, module)
                elif lookalike and not frame.slots:
                    self._note_lookalike(path, args, output)
            if is_root:
                with self._lock:
                    self._depth = max(self._depth - 1, 0)
                    done = self._depth == 0
                    if done:
                        self._owner = None
                if done:
                    self._exit_mode()
                    if output is None and _raised_in(module):
                        self._discard_forward()
                    else:
                        self._end_forward()

        return post_hook

    def _discard_forward(self) -> None:
        """The root forward raised part-way (a training loop that skips a batch on out-of-memory
        catches it): the sites it reached before the error took its batch, the others did not.
        Where every accumulator it wrote can take a batch back (the monitor's windows), each does
        and the pass's samples are uncounted, so the layers agree on what was seen; otherwise (a
        probe's since-start sums) the counts stay as they are."""
        fwd = self._fwd
        undo = [getattr(stats, "discard_last", None) for stats in fwd.written]
        if not all(undo):
            return
        for discard in reversed(undo):
            discard()
        fwd.written.clear()
        self.forwards -= 1
        self.samples -= fwd.samples
        if self.on_forward_discarded is not None:
            self.on_forward_discarded()

    def _note_lookalike(self, path: str, args: Any, output: Any) -> None:
        first = args[0] if args else None
        if isinstance(output, torch.Tensor) and isinstance(first, torch.Tensor) and output.shape == first.shape:
            self.uncaptured.setdefault(path, self._types.get(path, ""))
