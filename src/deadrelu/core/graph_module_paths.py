"""Module paths recorded in traced graphs, read as the eager model's paths: TorchDynamo's sources
(``L['self'].layers[0]``, ``getattr(L['fn'], '1')``) and torch.export's ``nn_module_stack`` — and,
for an exported (flattened) graph, the module each activation call came from, which the capture
names that call's site after.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn

from .activations import ACTIVATION_MODULES, RELU_SPELLINGS, called_activation
from .unit_axis import ACT, AxisTable, function_kind

__all__ = ["ACTIVATION_CLASS_NAMES", "dynamo_module_path", "exported_activation_modules", "recorded_path"]


_SOURCE_INDEX = re.compile(r"\[(\d+)\]|\._modules\['([^']*)'\]|\['([^']*)'\]")
_SOURCE_GETATTR = re.compile(r"getattr\((.*), '([^']*)'\)")


def dynamo_module_path(text: str) -> str | None:
    """A module path from the source TorchDynamo recorded for it, relative to the traced root, or None.

    Newer torch records plain paths in ``nn_module_stack``; torch 2.2 records sources, with
    ``getattr`` for names that are not identifiers (a Sequential's ``"0"``).

    Example:
        >>> dynamo_module_path("L['self'].layers[0].relu"), dynamo_module_path("getattr(L['fn'].blocks[0], '1')")
        ('layers.0.relu', 'blocks.0.1')
    """
    got = _SOURCE_GETATTR.fullmatch(text)
    if got is not None:
        inner = dynamo_module_path(got.group(1))
        return None if inner is None else ".".join(p for p in (inner, got.group(2)) if p)
    if not text.startswith("L["):
        return None
    rest = text[text.index("]") + 1 :]
    rest = _SOURCE_INDEX.sub(lambda m: "." + next(g for g in m.groups() if g is not None), rest)
    return rest.lstrip(".")


# nn.Threshold too: its threshold(0, 0) call is a site only with those arguments (called_activation)
ACTIVATION_CLASS_NAMES = frozenset(m.__name__ for m in ACTIVATION_MODULES) | {"Threshold"}


def recorded_path(stack: Mapping[str, Any]) -> str:
    """The module path of an ``nn_module_stack``'s innermost entry.

    torch 2.2 records Dynamo sources (parsed by :func:`dynamo_module_path`), later torches plain
    paths. torch 2.6's ``torch.export.save`` mangles a ``getattr(L['fn'], '1')`` source to the bare
    ``'getattr'``; the entry's key (``fn_1``) still spells it, after the key of the innermost
    intact ancestor (``fn``): that remainder, ``_`` read as ``.``, is appended to the ancestor's
    path (exact for indices and names without underscores)."""
    entries = list(stack.items())
    key, (path, _) = entries[-1]
    source = dynamo_module_path(str(path))
    if source is not None or str(path) != "getattr":
        return str(path) if source is None else source
    for parent_key, (parent_path, _) in reversed(entries[:-1]):
        parent = dynamo_module_path(str(parent_path))
        parent = str(parent_path) if parent is None and str(parent_path) != "getattr" else parent
        if parent is not None and str(key).startswith(f"{parent_key}_"):
            rest = str(key)[len(parent_key) + 1 :].replace("_", ".")
            return ".".join(p for p in (parent, rest) if p)
    return str(path)


def exported_activation_modules(model: nn.Module) -> list[tuple[str, str, int] | None]:
    """For an fx graph that recorded ``nn_module_stack`` (torch.export), the original module
    path and class of each activation call, in graph order; empty for other models."""
    graph = getattr(model, "graph", None)
    if not isinstance(model, torch.fx.GraphModule) or graph is None:
        return []
    out: list[tuple[str, str, int] | None] = []
    calls: dict[str, int] = {}
    table = AxisTable()  # the feature axes the capture will see, on the recorded values
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        kind = function_kind(node.target)
        value = node.meta.get("val")
        args = torch.fx.node.map_arg(node.args, lambda n: n.meta.get("val"))
        if kind[0] != ACT:
            table.on_op(kind, args, torch.fx.node.map_arg(node.kwargs, lambda n: n.meta.get("val")), value)
            continue
        inp = args[0] if args else None
        if isinstance(inp, torch.Tensor) and isinstance(value, torch.Tensor) and value.shape == inp.shape:
            table.carry(inp, value)
        if called_activation(kind[1], node.args, dict(node.kwargs)) is None:
            continue
        if kind[1] in RELU_SPELLINGS and isinstance(value, torch.Tensor) and not value.is_floating_point():
            continue  # index.clamp(min=0): no site (see ActivationCapture._site_for)
        if kind[1] in RELU_SPELLINGS and table.is_part(inp):
            continue  # clamp(min=0) of box corners, a slice of features: no site (ActivationCapture._site_for)
        stack = node.meta.get("nn_module_stack")
        if not stack:
            out.append(None)
            continue
        key, (path, cls) = list(stack.items())[-1]
        path = recorded_path(stack)
        cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        _, at, k = str(key).rpartition("@")
        if at and k.isdigit():  # the recorded k-th call of a reused module
            call = int(k)
        elif cls_name in ACTIVATION_CLASS_NAMES:  # an activation module: one activation per call
            call = calls.get(str(path), 0)
        else:  # functional calls made by one call of a module (the root's own forward): call 0
            call = 0
        calls[str(path)] = call + 1
        out.append((str(path), cls_name, call))
    return out
