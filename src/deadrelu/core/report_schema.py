"""The schema of a saved :class:`~deadrelu.Report`: validate JSON data field by field.

A report file may come from another version of deadrelu, another tool, a torn write or
an attacker. :func:`parse_report` checks every field against the schema and returns plain
constructor arguments; anything else raises one :class:`~deadrelu.errors.ReportFormatError`
whose message starts with the field's path, e.g.::

    sites[2].fired_counts[5]: expected an integer in [0, 640] (at most the site's observations), got -1

never a raw ``KeyError``/``TypeError``/``ValueError`` and never a report whose counts
contradict each other. Keys the schema does not know are ignored, so a newer writer may
add fields; derived summaries (``totals``, ``summary``) are ignored and recomputed.

Versions read: 1 (asleep/dormant levels under ``"thresholds"``) and 2 (under ``"levels"``).

To add a site field: append a :class:`Field` to :data:`SITE_FIELDS` (with a ``default``
so older files still load) and a matching dataclass field on ``SiteReport``.

Example:
    >>> parse_report({"kind": "deadrelu.Report", "schema_version": 7})
    Traceback (most recent call last):
    ...
    deadrelu.errors.ReportFormatError: schema_version: expected 1 or 2 (this deadrelu reads report versions 1 to 2), got 7
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import ReportFormatError

__all__ = ["INT64_MAX", "READABLE_VERSIONS", "Field", "SITE_FIELDS", "parse_report", "parse_levels", "parse_site"]

#: Schema versions this deadrelu can read.
READABLE_VERSIONS = (1, 2)

#: A check takes (value, path) and returns the cleaned value or raises ReportFormatError.
Check = Callable[[Any, str], Any]

_REQUIRED = object()

#: The largest count a report holds: counts are int64 tensors when measured, and a larger
#: integer is not even a float (``10**400`` would make every rate an OverflowError).
INT64_MAX = 2**63 - 1


def _show(value: Any) -> str:
    """A short JSON-flavoured description of a bad value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fail(path: str, expected: str, value: Any) -> ReportFormatError:
    """The error for ``value`` at ``path`` not being ``expected`` (returned, for ``raise``)."""
    return ReportFormatError(f"{path}: expected {expected}, got {_show(value)}")


def integer(minimum: int = 0, maximum: int | None = None, what: str = "") -> Check:
    """An exact integer (not a float, not a bool) in ``[minimum, maximum]``; never above
    :data:`INT64_MAX`."""

    def check(value: Any, path: str) -> int:
        in_range = type(value) is int and value >= minimum and (maximum is None or value <= maximum)
        if not in_range:
            if maximum is not None:
                raise fail(path, f"an integer in [{minimum}, {maximum}]{what}", value)
            kind = "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"
            raise fail(path, kind + what, value)
        if value > INT64_MAX:
            raise fail(path, f"an integer at most 2**63 - 1 (a count fits int64){what}", value)
        return value

    return check


def any_integer(value: Any, path: str) -> int:
    """Any exact int64 integer (a dimension index may be negative)."""
    if type(value) is not int or not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise fail(path, "an integer that fits int64", value)
    return value


def number(*, nan: bool = False, inf: bool = False, minimum: float | None = None, below: float | None = None) -> Check:
    """A JSON number, or for non-finite values the strings ``"nan"``/``"inf"``/``"-inf"``
    that :meth:`Report.to_json` writes (JSON has no NaN); ``nan``/``inf`` say which are allowed."""

    def check(value: Any, path: str) -> float:
        if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
            out = float(value)
        elif type(value) in (int, float):
            try:
                out = float(value)
            except OverflowError:  # an integer too large for a float
                raise fail(path, "a number", value) from None
        else:
            raise fail(path, "a number", value)
        if math.isnan(out):
            if not nan:
                raise fail(path, "a number, not NaN", value)
            return out
        if math.isinf(out) and not inf:
            raise fail(path, "a finite number", value)
        if minimum is not None and out < minimum:
            raise fail(path, f"a number >= {minimum:g}", value)
        if below is not None and out >= below:
            raise fail(path, f"a number below {below:g}", value)
        return out

    return check


def string(*choices: str) -> Check:
    """A string (one of ``choices`` when given)."""

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise fail(path, "a string", value)
        if choices and value not in choices:
            raise fail(path, " or ".join(repr(c) for c in choices), value)
        return value

    return check


def list_of(item: Check, length: int | None = None, what: str = "") -> Check:
    """A JSON list whose every element passes ``item`` (of ``length`` elements when given)."""

    def check(value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise fail(path, "a list", value)
        if length is not None and len(value) != length:
            raise ReportFormatError(f"{path}: expected {length} values{what}, got {len(value)}")
        return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))

    return check


def _optional_string(value: Any, path: str) -> str:
    """A string, with ``null`` read as ``""`` (unknown)."""
    return "" if value is None else string()(value, path)


def mapping(value: Any, path: str) -> Mapping[str, Any]:
    """A JSON object."""
    if not isinstance(value, Mapping):
        raise fail(path, "an object", value)
    return value


@dataclass(frozen=True)
class Field:
    """One key of a JSON object: its check, and the default when absent (``_REQUIRED`` if none)."""

    key: str
    check: Check
    default: Any = _REQUIRED

    def read(self, data: Mapping[str, Any], path: str) -> Any:
        """The cleaned value of this key of ``data``."""
        where = f"{path}.{self.key}" if path else self.key
        if self.key not in data:
            if self.default is _REQUIRED:
                raise ReportFormatError(f"{where}: missing (a required key)")
            return self.default
        return self.check(data[self.key], where)


#: Per-site keys checked on their own; the per-unit lists are checked against each other in
#: :func:`parse_site` (their lengths and bounds depend on ``fired_counts`` and ``observations``).
SITE_FIELDS: tuple[Field, ...] = (
    Field("name", string()),
    Field("module", string()),
    Field("module_type", string()),
    Field("function", string()),
    Field("call", integer()),
    Field("slot", integer()),
    Field("unit_dim", any_integer),
    Field("shape", list_of(integer())),
    Field("fire_threshold", number(inf=True)),
    Field("observations", integer()),
    # Added with the producer-based unit axis; older files say nothing ("").
    Field("unit_axis_source", string(), ""),
)


def parse_levels(data: Any, path: str) -> dict[str, Any]:
    """Constructor arguments of ``Levels`` from its JSON object at ``path``."""
    levels = mapping(data, path)
    return {
        "asleep_rate": Field("asleep_rate", number(minimum=0.0, below=1.0)).read(levels, path),
        "dormant_tau": Field("dormant_tau", number(minimum=0.0)).read(levels, path),
        # Added after version 2 first shipped; files without it classify as before (1).
        "min_observations": Field("min_observations", integer(minimum=1), 1).read(levels, path),
    }


def parse_site(data: Any, path: str) -> dict[str, Any]:
    """Constructor arguments of ``SiteReport`` (without ``levels``) from the site at ``path``."""
    site = mapping(data, path)
    out = {f.key: f.read(site, path) for f in SITE_FIELDS}
    n = out["observations"]
    count = integer(0, n, " (at most the site's observations)")
    fired = Field("fired_counts", list_of(count)).read(site, path)
    units = len(fired)
    per_unit = " (one per unit, as in fired_counts)"
    nonfinite = Field("nonfinite_counts", list_of(count, units, per_unit)).read(site, path)
    mean_abs = Field("mean_abs", list_of(number(nan=True, inf=True, minimum=0.0), units, per_unit)).read(site, path)
    for i, (m, bad) in enumerate(zip(mean_abs, nonfinite)):
        if not math.isfinite(m) and not bad:
            raise ReportFormatError(
                f"{path}.mean_abs[{i}]: {'NaN' if math.isnan(m) else 'infinity'} is only possible for a unit "
                f"with non-finite outputs, and nonfinite_counts[{i}] is 0"
            )
        if n == 0 and m != 0:
            raise fail(f"{path}.mean_abs[{i}]", "0 (the site has 0 observations)", m)
    out.update(fired_counts=fired, nonfinite_counts=nonfinite, mean_abs=mean_abs, shape=tuple(out["shape"]))
    return out


def parse_report(data: Any) -> dict[str, Any]:
    """Validate saved report data; return ``Report`` constructor arguments.

    ``sites`` comes back as a list of ``SiteReport`` argument dicts and ``levels`` as
    ``Levels`` arguments, so the caller builds the objects (this module imports neither).

    Raises:
        ReportFormatError: naming the first field that breaks the schema.
    """
    top = mapping(data, "report")
    if top.get("kind") != "deadrelu.Report":
        raise ReportFormatError(f"kind: not a deadrelu report (expected 'deadrelu.Report', got {_show(top.get('kind'))})")
    version = top.get("schema_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise fail(
            "schema_version",
            f"{' or '.join(map(str, READABLE_VERSIONS))} (this deadrelu reads report versions "
            f"{READABLE_VERSIONS[0]} to {READABLE_VERSIONS[-1]})",
            version,
        )
    levels_key = "thresholds" if version == 1 else "levels"
    if levels_key not in top:
        raise ReportFormatError(f"{levels_key}: missing (a required key)")
    levels = parse_levels(top[levels_key], levels_key)
    sites = list(Field("sites", list_of(parse_site)).read(top, ""))
    seen: dict[str, int] = {}
    for i, s in enumerate(sites):
        if s["name"] in seen:
            raise ReportFormatError(f"sites[{i}].name: {s['name']!r} is already the name of sites[{seen[s['name']]}]")
        seen[s["name"]] = i
    return {
        "sites": sites,
        "levels": levels,
        "batches": Field("batches", integer()).read(top, ""),
        "samples": Field("samples", integer()).read(top, ""),
        "mode": Field("mode", string("eval", "train")).read(top, ""),
        "model": Field("model", string()).read(top, ""),
        # Model fingerprint (parameter names and shapes) for surgery; absent or null: unknown.
        "fingerprint": Field("fingerprint", _optional_string, "").read(top, ""),
        # Activation-like modules that made no site ("path (Class)"); absent in older files.
        "uncaptured": Field("uncaptured", list_of(string()), ()).read(top, ""),
    }
