"""Exemplar-based translation methods, in a registry (``METHODS``).

One folder per method (``methods/<name>/``); importing this package imports each folder, whose
``__init__`` registers the method class. ``methods/common`` holds building blocks they share.
"""
import importlib
import pkgutil

from methods.registry import METHODS  # noqa: F401

for _mod in pkgutil.iter_modules(__path__):
    if _mod.ispkg and _mod.name != "common" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
