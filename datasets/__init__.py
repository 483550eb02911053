"""Datasets of exemplar-based translation, in a registry (``DATASETS``).

Importing the package imports every dataset module in it, so adding a dataset is one decorated
class in its own module. Command-line modules (``prepare``, ``build_refs``) and helpers whose
name starts with ``_`` are not imported here.
"""
import importlib
import pkgutil

from datasets.registry import DATASETS  # noqa: F401

_NOT_DATASETS = {"registry", "base", "prepare", "build_refs", "__main__"}

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _NOT_DATASETS and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
