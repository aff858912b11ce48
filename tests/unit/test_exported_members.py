"""Each package's ``__all__`` names only what it really exports, once."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "core",
    "backbone",
    "streams",
    "projections",
    "connectors",
    "processors",
    "configuration",
    "inference",
    "schemas",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_exact(name: str) -> None:
    """Every name in __all__ resolves, and none is listed twice."""
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported))
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == []
