"""Availability flags for optional extras, and one helper to demand an extra.

``import deadrelu`` must need torch only, so every other package is imported
lazily inside the function that uses it, through :func:`require`.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# extra name in pyproject -> the import name we need from it
_EXTRA_OF = {
    "rich": "cli",
    "tqdm": "cli",
    "matplotlib": "plot",
    "numpy": "cli",
    "sklearn": "demo",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "lightning": "lightning",
    "pytorch_lightning": "lightning",
    "transformers": "transformers",
    "mnist1d": "mnist1d",
    "torchvision": "torchvision",
}


def available(module: str) -> bool:
    """Return True when ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise ModuleNotFoundError naming the pip extra to install.

    Args:
        module: the import name, e.g. ``"matplotlib"``.
        extra: the ``deadrelu[extra]`` that provides it; looked up when omitted.

    Raises:
        ModuleNotFoundError: when the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        extra = extra or _EXTRA_OF.get(module.split(".")[0], "all")
        raise ModuleNotFoundError(
            f"{module} is needed for this feature: pip install \"deadrelu[{extra}]\"",
            name=module,
        ) from err
