"""Parity with the official code: golden-vector fixtures (``fixtures``) and, per method, the runner
that feeds a fixture's inputs to our networks built from its official options and its converted
official weights (``bench/parity/<method>.py``, each with ``run(fixture) -> {output name: tensor}``).

``python -m bench.parity [DIR]`` checks every fixture and prints fixture -> max |diff| -> tolerance;
``tests/test_parity.py`` does the same under pytest.
"""
from __future__ import annotations

import importlib
from typing import Dict

import torch

from bench.parity.fixtures import Fixture, FixtureResult, compare, discover, parity_dir

RUNNERS = {"spade": "bench.parity.spade", "cocosnet": "bench.parity.cocosnet",
           "cocosnet_v2": "bench.parity.cocosnet_v2", "midms": "bench.parity.midms"}


def run_fixture(fx: Fixture) -> Dict[str, torch.Tensor]:
    """Our outputs for ``fx``, by official output name (full tensors)."""
    if fx.method not in RUNNERS:
        raise KeyError(f"{fx.path}: no parity runner for method {fx.method!r} (known: {sorted(RUNNERS)})")
    module = importlib.import_module(RUNNERS[fx.method])
    return module.run(fx)


def check_fixture(fx: Fixture) -> FixtureResult:
    return compare(fx, run_fixture(fx))


__all__ = ["Fixture", "FixtureResult", "RUNNERS", "check_fixture", "compare", "discover", "parity_dir", "run_fixture"]
