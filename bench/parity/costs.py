"""What each parity fixture costs to check, measured, so the test suite can keep to its time budget.

The fixtures run full-width official networks in float64 on the CPU: the CoCosNet v2 ones at 512²
take minutes each on a 2-core machine, more than CI can spend on them. ``costs.json`` holds the
seconds ``python -m bench.parity --record-costs`` measured per fixture (and the machine);
``tests/test_parity.py`` runs every fixture whose recorded cost is within ``BENCH_PARITY_BUDGET_S``
(default ``DEFAULT_BUDGET_S``) and says, for the others, that ``make parity`` runs them. A fixture
without a recorded cost (a new fixture set) always runs.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Dict, Mapping, Optional

COSTS_FILE = Path(__file__).with_name("costs.json")
DEFAULT_BUDGET_S = 30.0


def load_costs(path: Path = COSTS_FILE) -> Dict[str, float]:
    if not path.is_file():
        return {}
    return {k: float(v) for k, v in json.loads(path.read_text())["seconds"].items()}


def record_costs(seconds: Mapping[str, float], path: Path = COSTS_FILE) -> Path:
    """Merge measured seconds into ``path`` (atomic write)."""
    data = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}", "seconds": {}}
    if path.is_file():
        data["seconds"] = json.loads(path.read_text()).get("seconds", {})
    data["seconds"].update({k: round(float(v), 1) for k, v in seconds.items()})
    data["seconds"] = dict(sorted(data["seconds"].items()))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def budget_s() -> float:
    """``BENCH_PARITY_BUDGET_S`` (``inf`` runs everything), else ``DEFAULT_BUDGET_S``."""
    raw = os.environ.get("BENCH_PARITY_BUDGET_S", "").strip()
    if not raw:
        return DEFAULT_BUDGET_S
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"BENCH_PARITY_BUDGET_S must be a number of seconds or 'inf', got {raw!r}") from None


def over_budget(name: str, costs: Mapping[str, float], budget: float) -> Optional[str]:
    """Why fixture ``name`` is left to ``make parity``, or None when it runs here."""
    cost = costs.get(name)
    if cost is None or cost <= budget:
        return None
    return (f"{name}: measured {cost:.0f} s (float64 on a 2-core CPU), above the test suite's parity budget of "
            f"{budget:g} s; `make parity` (or BENCH_PARITY_BUDGET_S=inf) runs it")
