"""The ``deadrelu`` command line: ``main`` runs it; one module per group of verbs."""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
