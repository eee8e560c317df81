"""The per-site options ``unit_dim`` and ``threshold``: checked once, when given
(:func:`checked_unit_dim`, :func:`checked_threshold`), then resolved for each new site from its
:class:`~deadrelu.core.sites.SiteInfo`: a number for every site, a mapping by site name, module
path or function, or a callable (whose failure is reported as its own, naming the site).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable, Iterable, Mapping, Union

import torch

from ..errors import DeadReluError
from .sites import SiteInfo, describe_site
from .unit_axis import rank_rule_dim

__all__ = [
    "ThresholdSpec", "UnitDimSpec", "checked_threshold", "checked_unit_dim", "choose_unit_dim", "resolve_threshold",
    "resolve_unit_dim", "unmatched_keys",
]


UnitDimSpec = Union[None, int, Mapping[str, int], Callable[[SiteInfo], Union[int, None]]]
ThresholdSpec = Union[float, Mapping[str, float], Callable[[SiteInfo], Union[float, None]]]


def _keys(info: SiteInfo) -> tuple[str, ...]:
    # Most specific key first: a display name with its ".k" (k-th such function in the module
    # call) and "#k" (k-th call of the module) — whichever of them the name carries — then
    # "path:fn", the module path, the function name; the root module is "<root>", as in site names.
    where = info.module or "<root>"
    fn, call, k = f"{where}:{info.function}", f"#{info.call + 1}", f".{info.ordinal}"
    return (f"{fn}{k}{call}", f"{fn}{call}", f"{where}{call}", f"{fn}{k}", fn, f"{info.module}:{info.function}", where, info.module, info.function)  # fmt: skip


def _lookup(spec: Mapping[str, Any], info: SiteInfo) -> Any:
    for key in _keys(info):
        if key in spec:
            return spec[key]
    return None


def unmatched_keys(spec: Any, infos: Iterable[SiteInfo]) -> list[str]:
    """The keys of a ``unit_dim``/``threshold`` mapping that name none of these sites (a typo, a
    path of another model): they were never used, which a caller should hear of."""
    if not isinstance(spec, Mapping):
        return []
    known: set[str] = set()
    for info in infos:
        known.update(_keys(info))
    return [key for key in spec if key not in known]


def _option_value(option: str, spec: Any, info: SiteInfo) -> Any:
    """What a ``unit_dim``/``threshold`` option gives for one site: a mapping's entry, or a
    callable's answer — whose failure is reported as the callable's, naming the site, and never
    as the model's (it runs inside the model's forward)."""
    if isinstance(spec, Mapping):
        return _lookup(spec, info)
    try:
        return spec(info)
    except DeadReluError:
        raise
    except Exception as err:
        name = getattr(spec, "__qualname__", type(spec).__name__)
        raise DeadReluError(
            f"the {option} callable {name} raised {type(err).__name__} for activation site {describe_site(info)} "
            f"with shape {info.shape}: {err}"
        ) from err


def _as_index(value: Any) -> int | None:
    """``value`` as an int (Python or NumPy integers, not bools), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def resolve_unit_dim(spec: UnitDimSpec | None, info: SiteInfo, ndim: int, default: int) -> int:
    """The unit dimension a ``unit_dim`` option gives for one site (``default`` where it gives none).

    Raises:
        DeadReluError: when the dimension does not exist in the site's output, or a callable
            raises or returns something other than an int or None.
    """
    given = spec if spec is None or isinstance(spec, int) else _option_value("unit_dim", spec, info)
    if given is None:
        return default
    dim = _as_index(given)
    if dim is None:
        raise DeadReluError(
            f"unit_dim gave {given!r} for activation site {describe_site(info)}: it must be an int dimension or None"
        )
    if ndim == 0 or not -ndim <= dim < ndim:
        raise DeadReluError(
            f"unit_dim {dim} is out of range for activation site {describe_site(info)} with shape {info.shape}"
        )
    return dim % ndim


def choose_unit_dim(spec: UnitDimSpec | None, info: SiteInfo, ndim: int, entry: tuple[Any, int, str] | None) -> int:
    """A new site's unit dimension: the ``unit_dim`` option's, else the producer's (``entry``, from
    :class:`~deadrelu.core.unit_axis.AxisTable`), else the rank rule; records the rule in ``info``."""
    if entry is not None:
        default_dim, info.unit_axis_source = entry[1], entry[2]
    else:
        default_dim, info.unit_axis_source = rank_rule_dim(ndim), "rank rule"
    unit_dim = resolve_unit_dim(spec, info, ndim, -1)
    if unit_dim == -1:
        return default_dim
    info.unit_axis_source = "unit_dim override"
    return unit_dim


#: How a site's units were found where its activation is a layer's single output, squeezed.
SQUEEZED_SOURCE = "producer: its single output, squeezed"


def squeezed_unit_axis(spec: UnitDimSpec | None, info: SiteInfo, ndim: int) -> tuple[None, int, str] | None:
    """For a new site whose activation is a layer's single output with its size-1 axis squeezed
    away (``(B, 1)`` to ``(B,)``: :meth:`~deadrelu.core.unit_axis.AxisTable.is_squeezed`), the axis
    entry that counts it as the ``(..., 1)`` it was — its one unit one past its ``ndim`` dims, the
    axis given back to ``info.shape`` — or None where the ``unit_dim`` option names a dim for it."""
    if resolve_unit_dim(spec, info, ndim, -1) != -1:
        return None
    info.shape = (*info.shape, 1)
    return (None, ndim, SQUEEZED_SOURCE)


def resolve_threshold(spec: ThresholdSpec, info: SiteInfo) -> float:
    """The firing threshold a ``threshold`` option gives for one site (0.0 where it gives none).

    Raises:
        DeadReluError: for a NaN threshold (no value is ``> nan``: every unit would look dead),
            or a callable that raises or returns something other than a number (one a float can
            hold) or None.
    """
    thr = spec if isinstance(spec, (int, float)) else _option_value("threshold", spec, info)
    try:
        value = 0.0 if thr is None else float(thr)
    except OverflowError:  # an int too large for a float (its repr may be too long to print)
        raise DeadReluError(
            f"threshold gave an int too large for a float for activation site {describe_site(info)}: "
            "it must be a number a float can hold, or None"
        ) from None
    except (TypeError, ValueError):
        raise DeadReluError(
            f"threshold gave {thr!r} for activation site {describe_site(info)}: it must be a number or None"
        ) from None
    if math.isnan(value):
        raise DeadReluError(f"the firing threshold for activation site {describe_site(info)} is NaN: no output is > NaN")
    return value


_UNIT_DIM_FORMS = "an int (every site), a mapping {module path or site name: int}, or a callable SiteInfo -> int | None"


def checked_unit_dim(spec: Any) -> Any:
    """The ``unit_dim`` option, checked before any forward pass: None, an int, a mapping of
    text to ints (or None) or a callable. Only whether a dimension exists is left to each site
    (it depends on the site's rank).

    Returns:
        The option with NumPy integers made ints.

    Raises:
        DeadReluError: for text, a float, a bool, or a mapping with other keys or values.

    Example:
        >>> checked_unit_dim(-1), checked_unit_dim({"block.act": 2})
        (-1, {'block.act': 2})
        >>> checked_unit_dim("x")
        Traceback (most recent call last):
        ...
        deadrelu.errors.DeadReluError: unit_dim must be an int (every site), ...; got str 'x'
    """
    if spec is None:
        return None
    dim = _as_index(spec)
    if dim is not None:
        return dim
    if isinstance(spec, Mapping):
        out: dict[str, int | None] = {}
        for key, value in spec.items():
            if not isinstance(key, str):
                raise DeadReluError(f"unit_dim mapping keys must be module paths or site names (text), got {key!r}")
            dim = _as_index(value)
            if dim is None and value is not None:
                raise DeadReluError(f"unit_dim[{key!r}] must be an int dimension (or None), got {value!r}")
            out[key] = dim
        return out
    if callable(spec):
        return spec
    raise DeadReluError(f"unit_dim must be {_UNIT_DIM_FORMS}; got {type(spec).__name__} {spec!r:.80}")


def checked_threshold(spec: Any) -> ThresholdSpec:
    """The ``threshold`` option with a NumPy or 0-d tensor number made a float; a NaN, +inf, bool,
    int too large for a float or non-number (a float, or a mapping's value) refused before anything runs.

    Returns:
        The option, scalars as floats (a mapping's values and a callable as given).

    Raises:
        DeadReluError: naming the key whose threshold is NaN, +inf, too large for a float or not a number.

    Example:
        >>> import numpy as np
        >>> checked_threshold(np.float32(0.5)), checked_threshold({"relu": 0.1})
        (0.5, {'relu': 0.1})
    """
    if isinstance(spec, torch.Tensor) and spec.ndim == 0:
        spec = spec.item()
    if isinstance(spec, Mapping):
        values = [(f"threshold[{key!r}]", value) for key, value in spec.items()]
    elif callable(spec):
        return spec
    else:
        values = [("threshold", spec)]
    for name, value in values:
        if isinstance(value, torch.Tensor) and value.ndim == 0:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise DeadReluError(
                f"{name} must be a number (or the option a mapping or a callable), got {value!r:.80}"
            )
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float, as nudge_bias(value=) refuses it
            raise DeadReluError(f"{name} must be a number a float can hold, got an int too large for a float") from None
        if math.isnan(number) or number == math.inf:
            raise DeadReluError(f"{name} is {number}: no output is > {number}, so every unit would look dead")
    if isinstance(spec, Mapping):
        return {key: float(v.item() if isinstance(v, torch.Tensor) else v) for key, v in spec.items()}
    return float(spec)
