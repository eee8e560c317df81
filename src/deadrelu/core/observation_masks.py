"""Which positions of an activation an observed forward pass counts: the pass's observation mask
(in an encoder-decoder call, the decoder's for a decoder site) on the activation's device, none for
an activation of the call's other inputs alone (token sources: which tensors come from the
mask-shaped inputs, by identity), a square ``(B, T)`` mask read as the site lay under the last
mask with B != T, and whether each mask fitted some activation of the pass.

:class:`ObservationMasks` is a part of :class:`~deadrelu.core.capture.ActivationCapture` (one of
its bases): its methods read the capture's per-pass state (``_fwd``) and mask options.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Mapping

import torch

from .inputs import in_decoder, iter_tensors, mask_layout
from .sites import Site

__all__ = ["ObservationMasks", "carry_source", "input_sources"]


def input_sources(args: tuple, kwargs: Mapping[str, Any], mask: torch.Tensor) -> dict[int, tuple[Any, bool]] | None:
    """The call's input tensors as sources (see ``Forward.sources``): True for one laid out like
    the mask (``input_ids`` (B, T), ``inputs_embeds`` (B, T, C)), False for a float input of 3 or
    more dims laid out otherwise (``pixel_values``); None, so nothing is tracked, where the call
    lacks either kind."""
    lead = tuple(mask.shape)
    sources: dict[int, tuple[Any, bool]] = {}
    for t in iter_tensors((args, dict(kwargs))):
        if t is mask or t.ndim < len(lead):
            continue
        token = tuple(t.shape[: len(lead)]) == lead
        # another input is a float tensor of 3+ dims (images, audio features); position ids and the
        # like are neither, so a text tower's tensors never become another input's alone
        if token or (t.is_floating_point() and t.ndim >= 3):
            sources[id(t)] = (weakref.ref(t), token)
    kinds = {token for _, token in sources.values()}
    return sources if kinds == {True, False} else None  # a mask-shaped input and another


def carry_source(sources: dict[int, tuple[Any, bool]], args: tuple, kwargs: dict | None, out: Any) -> None:
    """Mark an op's outputs: from the token inputs if any argument is, else from the other inputs if any is."""
    token = other = False
    for group in (args, (kwargs or {}).values()):
        for a in group:
            for t in a if type(a) in (list, tuple) else (a,):
                if not isinstance(t, torch.Tensor):
                    continue
                entry = sources.get(id(t))
                if entry is not None and entry[0]() is t:
                    token, other = token or entry[1], other or not entry[1]
    if not (token or other):
        return
    for o in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(o, torch.Tensor):
            sources[id(o)] = (weakref.ref(o), token)


def _from_other_inputs(sources: dict[int, tuple[Any, bool]], t: torch.Tensor) -> bool:
    """Whether ``t`` was computed from the call's other inputs only (an image tower's activations)."""
    entry = sources.get(id(t))
    return entry is not None and entry[0]() is t and not entry[1]


class ObservationMasks:
    """The observation-mask methods of :class:`~deadrelu.core.capture.ActivationCapture`."""

    @property
    def current_mask(self) -> torch.Tensor | None:
        """The observation mask of the forward pass being observed (None: every position counts)."""
        return self._fwd.mask

    @property
    def current_decoder_mask(self) -> tuple[torch.Tensor | None, bool]:
        """``(decoder mask, split)`` of the forward pass being observed: in an encoder-decoder call
        (``split``) the ``decoder_attention_mask`` that its decoder sites take instead (None: every position)."""
        return self._fwd.decoder_mask, self._fwd.decoder_split

    def _observation_mask(self, out: torch.Tensor, site: Site) -> torch.Tensor | None:
        """The forward's observation mask on ``out``'s device (copied there once per forward). In an
        encoder-decoder call the ``attention_mask`` is the encoder's: a site inside a ``decoder``
        module takes the call's ``decoder_attention_mask`` (none: every decoder position counts),
        even where the two lengths happen to be equal."""
        fwd = self._fwd
        source = fwd.decoder_mask if self._takes_decoder_mask(site) else fwd.mask
        if source is None:
            return None
        if source is fwd.mask and fwd.sources is not None and _from_other_inputs(fwd.sources, out):
            return None  # an image tower's tokens: the call's (text) mask is not theirs
        if fwd.axes.lead_moved(out):
            # Heads before tokens ((B, T, H, d) transposed to (B, H, T, d)): its dims 0 and 1 are not the
            # mask's (B, T), even where H == T. Counted whole, and said, as a layout the mask does not fit.
            self._note_mask_fit(False, out, site)
            fwd.unfit_sites.setdefault(id(site), (site.info, self._takes_decoder_mask(site), tuple(out.shape)))
            return None
        key = (out.device, source is fwd.mask)
        mask = fwd.masks.get(key)
        if mask is None:
            mask = fwd.masks[key] = source.to(out.device)
        return mask

    def _takes_decoder_mask(self, site: Site) -> bool:
        """Whether the site is counted under the call's ``decoder_attention_mask`` (a decoder site of an encoder-decoder call)."""
        return self._fwd.decoder_split and in_decoder(site.info.module)

    def _note_mask_fit(self, fits: bool, out: torch.Tensor, site: Site) -> None:
        fwd, decoder = self._fwd, self._takes_decoder_mask(site)
        if fits:
            fwd.mask_fit[decoder] = True
            return
        if decoder not in fwd.mask_fit:
            fwd.mask_fit[decoder], fwd.unfit_shape[decoder] = False, tuple(out.shape)
        mask = fwd.decoder_mask if decoder else fwd.mask
        if mask is not None and mask.ndim >= 1 and out.ndim >= 2 and out.shape[0] != mask.shape[0] and out.shape[1] != mask.shape[0]:
            # neither (B, ...) nor (T, B, ...): the rows are tokens in another layout, padding among them
            fwd.unfit_sites.setdefault(id(site), (site.info, decoder, tuple(out.shape)))

    def _square_layout(self, site: Site, out: torch.Tensor, dim: int, mask: torch.Tensor) -> str:
        """How to read a square ``(B, T)`` mask (B = T fits a ``(B, T, C)`` and a ``(T, B, C)``
        activation alike) at this site: as the site's activation lay under the last mask with
        B != T. Before any such batch, as given — with a warning, once, where the mask is the
        call's own ``attention_mask`` (``(B, T)`` by convention) and the model has a
        sequence-first module (``batch_first=False``), so that guess may be wrong."""
        if mask.ndim != 2:
            return "leading"
        if mask.shape[0] != mask.shape[1]:
            layout = mask_layout(out.shape, dim, mask.shape)
            if layout is not None:
                site.layout = layout
            return "leading"
        if site.layout is None and self.mask_spec is None and self._sequence_first and not self._warned_square:
            self._warned_square = True
            warnings.warn(
                f"deadrelu: the observation mask is square ({mask.shape[0]} x {mask.shape[1]}) and the model has "
                "sequence-first (batch_first=False) modules: it is laid over an activation's leading dims as "
                "given (mask[i, j] on h[i, j]) until a batch with B != T shows how the activation lies; for "
                "sequence-first activations pass the mask as (T, B) (e.g. mask=lambda b: b['attention_mask'].T)",
                RuntimeWarning,
                stacklevel=2,
            )
        return site.layout or "leading"
