"""A monitor's resumable state: what :meth:`Monitor.state_dict` saves and :meth:`Monitor.load_state_dict` reads.

A run resumed from a checkpoint must not report every dead unit as "born dead" again, repeat
the warnings it already gave, or restart its step count at 0. The state therefore holds the
step counters, the history, events and alerts, and each site's lifecycle memory (the units
last known dead or alive, the born-dead ones, the warning levels crossed), keyed by the
site's identity (module, call, call position, function, occurrence) — the same in every
process that runs the same code.

The rolling windows are not saved: they hold up to ``window`` batches of per-unit counts on the
device, and a resumed run refills them from its next batches (as at the start, no lifecycle
event is issued for a site until its window is full again).

Everything is plain Python (dicts, lists, str, int, float, bool, None), so the state survives
``torch.save`` / ``torch.load(weights_only=True)``, strict JSON and Lightning checkpoints: a NaN or
infinite loss is stored as the string ``"nan"``, ``"inf"`` or ``"-inf"``, as the JSONL log writes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..errors import DeadReluError
from .records import Alert, Event, HistoryRow

__all__ = ["FORMAT", "VERSION", "MonitorState", "parse_state"]

FORMAT = "deadrelu.Monitor"
VERSION = 1

Identity = tuple[Any, ...]  # (module, call, position, function, occurrence) as :func:`site_identity` makes it


@dataclass
class MonitorState:
    """A parsed, checked monitor state (see the module docstring)."""

    steps: int
    observed_steps: int
    last_eval_step: int
    first_window_done: bool
    history: list[HistoryRow]
    events: list[Event]
    alerts: list[Alert]
    known_dead: dict[Identity, set[int]]
    known_alive: dict[Identity, set[int]]
    born_dead: dict[Identity, set[int]]
    dead: dict[str, set[int]]  # per site name: dead at the last evaluation
    warned: set[tuple[Identity, float]]
    names: dict[str, Identity]  # every display name a site has had -> its identity
    current_names: dict[str, Identity]  # each site's name at the last evaluation -> its identity
    units: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """The plain-data form (lists for sets and tuples, dicts for records)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "steps": self.steps,
            "observed_steps": self.observed_steps,
            "last_eval_step": self.last_eval_step,
            "first_window_done": self.first_window_done,
            "history": [_record_dict(r) for r in self.history],
            "events": [_record_dict(e) for e in self.events],
            "alerts": [_record_dict(a) for a in self.alerts],
            "known_dead": _unit_sets(self.known_dead),
            "known_alive": _unit_sets(self.known_alive),
            "born_dead": _unit_sets(self.born_dead),
            "dead": {name: sorted(units) for name, units in self.dead.items()},
            "warned": [[list(ident), level] for ident, level in sorted(self.warned, key=repr)],
            "names": {name: list(ident) for name, ident in self.names.items()},
            "current_names": {name: list(ident) for name, ident in self.current_names.items()},
            "units": dict(self.units),
        }


#: How a NaN/Inf float (a diverging run's loss) is stored: JSON has no such numbers, and these are
#: the strings the JSONL log writes and ``float()`` reads back.
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _record_dict(record: Any) -> dict[str, Any]:
    return {f.name: _json_number(getattr(record, f.name)) for f in fields(record)}


def _json_number(value: Any) -> Any:
    """A NaN/Inf float as its string (see ``_NONFINITE``), so the state is strict JSON; the rest as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _unit_sets(table: Mapping[Identity, set[int]]) -> list[list[Any]]:
    return [[list(ident), sorted(units)] for ident, units in table.items()]


def parse_state(state: Any) -> MonitorState:
    """Check a :meth:`Monitor.state_dict` and rebuild its values.

    Raises:
        DeadReluError: naming the first malformed entry, for anything that is not such a state.
    """
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        got = type(state).__name__ if not isinstance(state, Mapping) else f"a mapping with format={state.get('format')!r}"
        raise DeadReluError(f"not a deadrelu Monitor state (from Monitor.state_dict()): got {got}")
    if state.get("version") != VERSION:
        raise DeadReluError(
            f"this Monitor state has version {state.get('version')!r}; this deadrelu reads version {VERSION}"
        )
    try:
        return MonitorState(
            steps=_count(state, "steps"),
            observed_steps=_count(state, "observed_steps"),
            last_eval_step=_integer(state["last_eval_step"], "last_eval_step", minimum=-1),
            first_window_done=_flag(state["first_window_done"], "first_window_done"),
            history=[_record(HistoryRow, r, f"history[{i}]") for i, r in enumerate(_list(state, "history"))],
            events=[_event(r, f"events[{i}]") for i, r in enumerate(_list(state, "events"))],
            alerts=[_record(Alert, r, f"alerts[{i}]") for i, r in enumerate(_list(state, "alerts"))],
            known_dead=_identity_sets(state, "known_dead"),
            known_alive=_identity_sets(state, "known_alive"),
            born_dead=_identity_sets(state, "born_dead"),
            dead={_text(k, "dead"): _units(v, f"dead[{k!r}]") for k, v in _mapping(state, "dead").items()},
            warned={_warning(w, f"warned[{i}]") for i, w in enumerate(_list(state, "warned"))},
            names=_names(state, "names"),
            current_names=_names(state, "current_names"),
            units={_text(k, "units"): _integer(v, f"units[{k!r}]") for k, v in _mapping(state, "units").items()},
        )
    except KeyError as err:
        raise DeadReluError(f"this Monitor state lacks the entry {err.args[0]!r}") from None


def _bad(where: str, what: str, value: Any) -> DeadReluError:
    return DeadReluError(f"this Monitor state is damaged: {where} should be {what}, got {value!r:.80}")


def _integer(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(where, f"an int >= {minimum}", value)
    return value


def _count(state: Mapping[str, Any], key: str) -> int:
    return _integer(state[key], key)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(where, "True or False", value)
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, "a site name (str)", value)
    return value


def _list(state: Mapping[str, Any], key: str) -> list[Any]:
    value = state[key]
    if not isinstance(value, (list, tuple)):
        raise _bad(key, "a list", value)
    return list(value)


def _mapping(state: Mapping[str, Any], key: str) -> Mapping[Any, Any]:
    value = state[key]
    if not isinstance(value, Mapping):
        raise _bad(key, "a mapping", value)
    return value


def _units(value: Any, where: str) -> set[int]:
    if not isinstance(value, (list, tuple)):
        raise _bad(where, "a list of unit indices", value)
    return {_integer(u, where) for u in value}


def _identity(value: Any, where: str) -> Identity:
    # module, call, position, function, occurrence (see monitor.site_identity)
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 5
        or not all(isinstance(value[i], str) for i in (0, 2, 3))
        or any(isinstance(value[i], bool) or not isinstance(value[i], int) for i in (1, 4))
    ):
        raise _bad(where, "a site identity [module, call, position, function, occurrence]", value)
    return tuple(value)


def _names(state: Mapping[str, Any], key: str) -> dict[str, Identity]:
    return {_text(k, key): _identity(v, f"{key}[{k!r}]") for k, v in _mapping(state, key).items()}


def _identity_sets(state: Mapping[str, Any], key: str) -> dict[Identity, set[int]]:
    out = {}
    for i, entry in enumerate(_list(state, key)):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise _bad(f"{key}[{i}]", "[site identity, unit indices]", entry)
        out[_identity(entry[0], f"{key}[{i}]")] = _units(entry[1], f"{key}[{i}]")
    return out


def _warning(value: Any, where: str) -> tuple[Identity, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not _is_fraction(value[1]):
        raise _bad(where, "[site identity, warning level]", value)
    return _identity(value[0], where), float(value[1])


def _event(value: Any, where: str) -> Event:
    event = _record(Event, value, where)
    if event.kind not in ("born_dead", "died", "revived"):
        raise _bad(f"{where}.kind", "'born_dead', 'died' or 'revived'", event.kind)
    return event


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


_FIELD_TYPES = {int: (int,), float: (int, float), str: (str,)}


def _record(cls: type, value: Any, where: str) -> Any:
    """One history row, event or alert from its dict, each field of its declared type."""
    if not isinstance(value, Mapping):
        raise _bad(where, f"a {cls.__name__} mapping", value)
    kwargs = {}
    for f in fields(cls):
        if f.name not in value:
            if f.name in ("loss", "unobserved"):  # optional HistoryRow fields
                continue
            raise _bad(where, f"a {cls.__name__} with {f.name!r}", dict(value))
        item = value[f.name]
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        optional = "None" in kind
        base = {"int": int, "float": float, "str": str}.get(kind.split("|")[0].strip())
        if item is None and optional:
            kwargs[f.name] = None
            continue
        if base is float and isinstance(item, str) and item in _NONFINITE:  # stored as a string: see _json_number
            kwargs[f.name] = _NONFINITE[item]
            continue
        if base is None or isinstance(item, bool) or not isinstance(item, _FIELD_TYPES[base]):
            raise _bad(f"{where}.{f.name}", kind, item)
        kwargs[f.name] = float(item) if base is float else item
    return cls(**kwargs)
