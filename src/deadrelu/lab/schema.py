"""The schema versions of the evidence results the lab writes (``results.json``, ``NAME.json``).

Kept apart from the writers so the report, which reads every result, can check a version
without importing the experiments that write them.
"""

from __future__ import annotations

__all__ = ["DEMO_SCHEMA_VERSION", "EXPERIMENT_SCHEMA_VERSION", "newest_schema"]

#: ``deadrelu demo``'s results.json: 3 = a firing rate is ``null`` for a non-finite unit (NaN/Inf
#: activations: neither dead nor alive); 2 = several seeds (``runs``, per-seed lists); 1 = one seed.
DEMO_SCHEMA_VERSION = 3
#: ``deadrelu experiment NAME``'s NAME.json.
EXPERIMENT_SCHEMA_VERSION = 1


def newest_schema(experiment: object) -> int:
    """The newest schema version this deadrelu writes for a result of ``experiment``.

    ``rescue`` is the demo's comparison (:func:`deadrelu.lab.demo.seeds_story`), so its NAME.json
    has the demo's schema, not the other experiments'.

    >>> newest_schema("rescue") == DEMO_SCHEMA_VERSION
    True
    """
    return DEMO_SCHEMA_VERSION if experiment in ("demo", "rescue") else EXPERIMENT_SCHEMA_VERSION
