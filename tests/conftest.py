"""Shared fixtures: bundles of the zoo's models, built once per test session."""

from __future__ import annotations

from typing import Callable, Sequence

import pytest

import weightbundle as wb
from weightbundle import zoo


@pytest.fixture(scope="session")
def built() -> Callable[..., bytes]:
    """``built(name="mlp", include_init=True, optimize="extended", weights=None)``: the bundle
    bytes of ``zoo.MODELS[name]``, built on first use and shared by every test after it."""
    cache: dict[tuple, bytes] = {}

    def get(name: str = "mlp", include_init: bool = True, optimize: str | None = "extended", weights: Sequence[str] | None = None) -> bytes:
        key = (name, include_init, optimize, tuple(weights) if weights else None)
        if key not in cache:
            graphs = wb.convert(zoo.MODELS[name](), weights=list(weights) if weights else None)
            cache[key] = wb.build_bundle(graphs, include_init=include_init, optimize=optimize)
        return cache[key]

    return get
