"""Training-framework integrations, each importing its framework only when used.

* :class:`DeadReluCallback` — a PyTorch Lightning ``Callback`` (``pip install "deadrelu[lightning]"``).
* :class:`DeadReluTrainerCallback` — a Hugging Face ``transformers`` ``TrainerCallback``
  (``pip install "deadrelu[transformers]"``).

Both build a :class:`deadrelu.Monitor` when training starts, step it after every
optimizer step, send its evaluations to the framework's own loggers, and detach when
training ends or fails.

Example:
    >>> from deadrelu.integrations import DeadReluCallback  # doctest: +SKIP
    >>> trainer = lightning.Trainer(callbacks=[DeadReluCallback(window=50)])  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DeadReluCallback", "DeadReluTrainerCallback"]

_LAZY = {"DeadReluCallback": "lightning", "DeadReluTrainerCallback": "transformers"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deadrelu.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
