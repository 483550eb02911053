"""Evaluation metrics, one module each, in the ``METRICS`` registry.

Importing the package imports every metric module in it (names starting with ``_`` and the
``base`` module excepted), so adding a metric is one decorated class in its own module.
"""
import importlib
import pkgutil

from bench.metrics.base import METRICS  # noqa: F401

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
