"""Rescue and surgery: swap activations, re-initialise dead units, nudge biases, prune dead units.

Every operation proves its rewrite safe from the traced data flow (:mod:`.dataflow`) or refuses
with a :class:`deadrelu.RefusedError`, leaving model and optimizer exactly as they were.
"""

from .prune import PruneResult, prune_dead
from .reinit import nudge_bias, reinit_dead
from .swap import swap_activations

__all__ = ["swap_activations", "reinit_dead", "nudge_bias", "prune_dead", "PruneResult"]
