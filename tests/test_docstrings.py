"""The ``Example:`` blocks in docstrings run and print what they say (doctest)."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import deadrelu

# __main__ runs the CLI when imported, so it has no examples to collect.
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(deadrelu.__path__, prefix="deadrelu.") if m.name != "deadrelu.__main__"
)


# The integrations' examples need the library they plug into (an optional extra, in the test extras).
NEEDS = {"deadrelu.integrations.lightning": "pytorch_lightning", "deadrelu.integrations.transformers": "transformers"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"{NEEDS[name]} is not installed")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring example(s) failed in {name}"


def test_public_api_has_examples() -> None:
    # The entry points people start from carry a runnable example.
    finder = doctest.DocTestFinder()
    for obj in (deadrelu.scan, deadrelu.Probe, deadrelu.Monitor, deadrelu.Report):
        examples = sum(len(t.examples) for t in finder.find(obj))
        assert examples > 0, f"{obj.__qualname__} has no docstring example"
