"""Environment switches read on the hot path (``DEADRELU_NO_NATIVE``, ``DEADRELU_NO_TRITON``, …).

They are read at every activation call, so a test or an A/B run may flip them between batches;
``os.environ.get`` re-encodes the name and builds the value each time, which costs about as much as
the rest of a prepared kernel call. On POSIX ``os.environ`` keeps its items in a dict of bytes that
every change through ``os.environ`` (and ``monkeypatch.setenv``) updates: :func:`env_is` reads that.
"""

from __future__ import annotations

import os
from functools import lru_cache

__all__ = ["env_is"]

# CPython's os.environ on POSIX: a dict of the encoded items. Elsewhere (Windows keeps upper-cased
# str keys) or where it is missing, os.environ.get is used.
_ITEMS = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ITEMS, dict):
    _ITEMS = None


@lru_cache(maxsize=None)
def _encoded(text: str) -> bytes:
    return os.fsencode(text)


def env_is(name: str, value: str) -> bool:
    """Whether environment variable ``name`` is set to ``value`` (``os.environ.get(name) == value``).

    >>> os.environ["DEADRELU_DOC_FLAG"] = "1"
    >>> env_is("DEADRELU_DOC_FLAG", "1"), env_is("DEADRELU_DOC_FLAG", "0")
    (True, False)
    >>> del os.environ["DEADRELU_DOC_FLAG"]
    """
    if _ITEMS is None:
        return os.environ.get(name) == value
    return _ITEMS.get(_encoded(name)) == _encoded(value)
