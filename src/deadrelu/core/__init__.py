"""The engine every other part builds on: which calls are activations, how they are captured,
per-unit statistics, reports, scan and advice. Imports only torch and :mod:`deadrelu.errors`."""
