"""deadrelu: find, watch and fix dead neurons in PyTorch models.

>>> import torch, deadrelu
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
>>> report = deadrelu.scan(net, torch.randn(64, 4))
>>> report.sites[0].dead_units  # doctest: +SKIP
(3,)
"""

from __future__ import annotations

import warnings as _warnings

with _warnings.catch_warnings():
    # torch imports fine without numpy but warns "Failed to initialize NumPy" while doing so
    # (torch/_subclasses/functional_tensor.py); numpy is an optional extra here, so a base
    # install must not print that on every command. Once torch is imported the filter is gone.
    _warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch as _torch  # noqa: F401

from .core.activations import register_activation
from .core.capture import ACTIVATION_FUNCTIONS, ACTIVATION_MODULES, ActivationCapture
from .errors import (
    DataError,
    DeadReluError,
    ForwardError,
    NoActivationSitesError,
    RefusedError,
    ReportFormatError,
)
from .core.report import Levels, Report, ReportDiff, SiteDiff, SiteReport, Thresholds
from .core.scan import Probe, scan
from .core.stats import UnitStats

__version__ = "0.1.0"

# Heavier concepts load on first use so `import deadrelu` stays cheap and torch-only.
_LAZY = {
    "Monitor": "monitor.monitor",
    "swap_activations": "surgery.swap",
    "reinit_dead": "surgery.reinit",
    "nudge_bias": "surgery.reinit",
    "prune_dead": "surgery.prune",
    "PruneResult": "surgery.prune",
    "advise": "core.advice",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deadrelu' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "__version__",
    "scan",
    "Probe",
    "Report",
    "SiteReport",
    "ReportDiff",
    "SiteDiff",
    "Levels",
    "Thresholds",
    "UnitStats",
    "ActivationCapture",
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_MODULES",
    "register_activation",
    "DeadReluError",
    "DataError",
    "ForwardError",
    "NoActivationSitesError",
    "RefusedError",
    "ReportFormatError",
    *_LAZY,
]
