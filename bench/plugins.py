"""Out-of-tree registrations: modules named in ``BENCH_PLUGINS`` (comma-separated) are imported
wherever the registries are used -- the driver and every Ray worker -- so a method, dataset or
metric defined outside this repository (or in a test) is found by name like a built-in one."""
from __future__ import annotations

import importlib
import os

ENV = "BENCH_PLUGINS"


def load_plugins() -> list:
    names = [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"{ENV}: cannot import plugin module {name!r}: {exc}") from exc
    return names
