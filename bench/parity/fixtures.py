"""Golden-vector fixtures made by running the official code (``../shared/parity``): discovery, the
official weights they were made with, and the comparison of our outputs with theirs.

A fixture (schema ``exbench-parity-fixture/1``, see the parity folder's README) stores the inputs,
the official options, a manifest per network (official key -> shape, dtype) plus one fill seed,
and the outputs of the official code -- whole, or every s-th element with statistics of the whole
tensor. The weights are rebuilt with the folder's own ``fill.py`` (never copied here), so a fixture
set made with other fill seeds, resolutions or inputs is checked the same way.

The comparison is strict by construction: every stored output must be produced, have the full
shape the official code gave, agree elementwise on the stored part within the fixture's tolerance
(|ours - official| <= atol + rtol * |official|, or exactly where the fixture says ``exact``), and
agree on the whole-tensor sum, absolute sum, min and max within the bound that elementwise
agreement implies -- so a mismatch in the part that is not stored is caught too.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

FORMAT = "exbench-parity-fixture/1"
REPO = Path(__file__).resolve().parents[2]
ENV_VAR = "BENCH_PARITY_DIR"


def parity_dir() -> Path:
    """``$BENCH_PARITY_DIR``, else ``../shared/parity`` next to the repository."""
    return Path(os.environ.get(ENV_VAR) or (REPO.parent / "shared" / "parity")).expanduser()


def discover(root: Optional[Path] = None) -> List[Path]:
    """Every fixture file under ``root`` (``<method>/<case>.pt``), sorted."""
    root = Path(root) if root is not None else parity_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*.pt") if "manifests" not in p.parts)


_FILL_CACHE: Dict[Path, ModuleType] = {}


def load_fill(root: Path) -> ModuleType:
    """The parity folder's ``fill.py`` (the deterministic weight filler), imported from there."""
    path = (Path(root) / "fill.py").resolve()
    if path not in _FILL_CACHE:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the parity folder has no fill.py (the weight filler the fixtures need)")
        spec = importlib.util.spec_from_file_location(f"_bench_parity_fill_{len(_FILL_CACHE)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _FILL_CACHE[path] = module
    return _FILL_CACHE[path]


def _find_root(path: Path) -> Path:
    """The parity folder of a fixture file: the nearest parent holding ``fill.py``."""
    for parent in Path(path).resolve().parents:
        if (parent / "fill.py").is_file():
            return parent
    raise FileNotFoundError(f"{path}: no fill.py in any parent folder (is this a parity fixture?)")


@dataclass
class Fixture:
    """One fixture file, loaded (``torch.load(weights_only=True)``) with its inputs decoded."""

    path: Path
    root: Path
    data: Dict[str, Any]
    fill: ModuleType

    @classmethod
    def load(cls, path, root: Optional[Path] = None) -> "Fixture":
        path = Path(path)
        root = Path(root) if root is not None else _find_root(path)
        fill = load_fill(root)
        data = fill.load_fixture(str(path))
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        return cls(path=path, root=root, data=data, fill=fill)

    # -- the schema's fields -----------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.method}/{self.case}"

    @property
    def method(self) -> str:
        return self.data["method"]

    @property
    def case(self) -> str:
        return self.data["case"]

    @property
    def mode(self) -> str:
        return self.data.get("mode", "eval")

    @property
    def networks(self) -> List[str]:
        return list(self.data.get("networks") or [])

    @property
    def inputs(self) -> Dict[str, torch.Tensor]:
        return self.data["inputs"]

    @property
    def outputs(self) -> Dict[str, torch.Tensor]:
        return self.data["outputs"]

    @property
    def meta(self) -> Dict[str, Dict[str, Any]]:
        return self.data["output_meta"]

    @property
    def official_options(self) -> Dict[str, Any]:
        return dict(self.data.get("official_options") or {})

    @property
    def run_options(self) -> Dict[str, Any]:
        """The options the official networks were built with (official options + run overrides)."""
        return dict(self.data.get("run_options") or self.data.get("official_options") or {})

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, str(self.data.get("dtype", "float64")))

    def state_dict(self, network: str) -> Dict[str, torch.Tensor]:
        """The exact official-format state dict of ``network`` the outputs were made with (shared,
        read-only: the same manifest and seed in several fixtures is filled once per process)."""
        return filled_state_dict(self.fill, self.data["manifest"][network], self.data["fill_seed"])

    def stored_view(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return self.fill.stored_view(tensor, int(self.meta[name].get("stride", 1)))

    def tolerance(self, name: str) -> "Tolerance":
        return Tolerance.for_output(self.data.get("tolerance") or {}, name)


_FILLED: "OrderedDict[str, Dict[str, torch.Tensor]]" = OrderedDict()
FILL_CACHE_ELEMENTS = 800_000_000  # ~3 GB of float32: the MIDMs UNet (274 M) is filled for three fixtures


def filled_state_dict(fill: ModuleType, manifest: Mapping, seed: int) -> Dict[str, torch.Tensor]:
    """``fill.fill_state_dict(manifest, seed)``, memoised on the manifest's content and the seed
    (filling a 274 M-parameter UNet takes ~30 s). Callers must not modify the tensors in place."""
    key = hashlib.sha256(json.dumps([manifest, int(seed), getattr(fill, "FILL_VERSION", 0)], sort_keys=True,
                                    default=str).encode()).hexdigest()
    if key in _FILLED:
        _FILLED.move_to_end(key)
        return dict(_FILLED[key])
    state = fill.fill_state_dict(manifest, seed)
    _FILLED[key] = state
    while len(_FILLED) > 1 and sum(v.numel() for sd in _FILLED.values() for v in sd.values()) > FILL_CACHE_ELEMENTS:
        _FILLED.popitem(last=False)
    return dict(state)


def clear_fill_cache() -> None:
    _FILLED.clear()


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-10
    rtol: float = 1e-9
    exact: bool = False

    @classmethod
    def for_output(cls, spec: Mapping[str, Any], name: str) -> "Tolerance":
        """The fixture's tolerance for output ``name``: the default ``atol``/``rtol``, overridden by
        an entry named after the output (its full name or its last ``/`` part): ``"exact"`` or a
        dict of atol/rtol."""
        tol = cls(float(spec.get("atol", cls.atol)), float(spec.get("rtol", cls.rtol)))
        leaf = name.rsplit("/", 1)[-1]
        for key, value in spec.items():
            if key in ("atol", "rtol") or key not in (name, leaf):
                continue
            if value == "exact":
                tol = cls(0.0, 0.0, True)
            elif isinstance(value, Mapping):
                tol = cls(float(value.get("atol", tol.atol)), float(value.get("rtol", tol.rtol)))
        return tol

    def __str__(self) -> str:
        return "exact" if self.exact else f"atol {self.atol:g}, rtol {self.rtol:g}"


@dataclass
class OutputCheck:
    """The comparison of one stored output."""

    name: str
    tolerance: Tolerance
    max_abs_diff: float = float("nan")
    max_excess: float = float("nan")  # max over elements of |a - b| - (atol + rtol |b|): <= 0 passes
    error: str = ""  # empty when the output agrees

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class FixtureResult:
    fixture: str
    checks: List[OutputCheck] = field(default_factory=list)
    missing_weights: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def first_failure(self) -> Optional[OutputCheck]:
        return next((c for c in self.checks if not c.ok), None)

    @property
    def max_abs_diff(self) -> float:
        vals = [c.max_abs_diff for c in self.checks if not math.isnan(c.max_abs_diff)]
        return max(vals) if vals else float("nan")

    def summary(self) -> str:
        bad = [c for c in self.checks if not c.ok]
        if not bad:
            return f"{self.fixture}: {len(self.checks)} outputs agree (max |diff| {self.max_abs_diff:.3g})"
        lines = [f"{self.fixture}: {len(bad)} of {len(self.checks)} outputs differ; first: {bad[0].name}: {bad[0].error}"]
        lines += [f"  {c.name}: {c.error}" for c in bad[1:12]]
        if len(bad) > 12:
            lines.append(f"  ... and {len(bad) - 12} more")
        return "\n".join(lines)


def _full_index(flat: int, shape: Tuple[int, ...], stride: int, ndim: int) -> Tuple[int, ...]:
    """The index in the full tensor of element ``flat`` of the stored view (see ``stored_view``)."""
    idx = list(torch.unravel_index(torch.tensor(flat), shape))
    idx = [int(i) for i in idx]
    if stride > 1:
        if ndim == 4:
            dims = (2, 3)
        elif ndim == 2:
            dims = (0, 1)
        elif ndim == 1:
            dims = (0,)
        else:
            dims = tuple(range(1, ndim))
        for d in dims:
            idx[d] *= stride
    return tuple(idx)


def compare_output(fx: Fixture, name: str, ours: Optional[torch.Tensor]) -> OutputCheck:
    tol = fx.tolerance(name)
    check = OutputCheck(name, tol)
    meta = fx.meta[name]
    ref = fx.outputs[name]
    if ours is None:
        check.error = "not produced by our implementation"
        return check
    ours = torch.as_tensor(ours).detach().cpu()
    full_shape = tuple(int(s) for s in meta.get("shape", ref.shape))
    if tuple(ours.shape) != full_shape:
        check.error = f"shape {tuple(ours.shape)}, official {full_shape}"
        return check
    stride = int(meta.get("stride", 1))
    mine = fx.stored_view(ours, name)
    if tuple(mine.shape) != tuple(ref.shape):
        check.error = f"stored view {tuple(mine.shape)} vs stored {tuple(ref.shape)}"
        return check
    a, b = mine.to(torch.float64), ref.to(torch.float64)
    if not torch.isfinite(a).all():
        bad = int((~torch.isfinite(a)).flatten().nonzero()[0])
        check.error = f"non-finite value at {_full_index(bad, tuple(a.shape), stride, ours.ndim)}"
        return check
    diff = (a - b).abs()
    check.max_abs_diff = float(diff.max()) if diff.numel() else 0.0
    bound = tol.atol + tol.rtol * b.abs()
    excess = diff - bound
    check.max_excess = float(excess.max()) if excess.numel() else 0.0
    failing = (diff != 0) if tol.exact else (excess > 0)
    if failing.any():
        flat = int(failing.flatten().nonzero()[0])
        pos = _full_index(flat, tuple(a.shape), stride, ours.ndim)
        check.error = (f"at {pos}: ours {float(a.flatten()[flat]):.12g}, official {float(b.flatten()[flat]):.12g} "
                       f"(|diff| {float(diff.flatten()[flat]):.3g}; {int(failing.sum())} of {failing.numel()} stored "
                       f"elements outside {tol}; max |diff| {check.max_abs_diff:.3g})")
        return check
    if stride > 1:
        check.error = _check_statistics(ours.to(torch.float64), meta, tol)
    return check


def _check_statistics(full: torch.Tensor, meta: Mapping[str, Any], tol: Tolerance) -> str:
    """Whole-tensor statistics within what elementwise agreement implies: |sum a - sum b| <=
    n atol + rtol sum|b|, the same for the absolute sum, and min/max within atol + rtol |.|."""
    n = full.numel()
    slack = 1e-12 * max(1.0, float(meta.get("abs_sum", 0.0)))  # summation-order rounding
    checks = []
    if "sum" in meta:
        checks.append(("sum", float(full.sum()), float(meta["sum"]),
                       n * tol.atol + tol.rtol * float(meta.get("abs_sum", abs(meta["sum"]))) + slack))
    if "abs_sum" in meta:
        checks.append(("abs_sum", float(full.abs().sum()), float(meta["abs_sum"]),
                       n * tol.atol + tol.rtol * float(meta["abs_sum"]) + slack))
    for stat, fn in (("min", torch.min), ("max", torch.max)):
        if stat in meta:
            ref = float(meta[stat])
            checks.append((stat, float(fn(full)), ref, tol.atol + tol.rtol * abs(ref)))
    for stat, mine, ref, bound in checks:
        if abs(mine - ref) > bound:
            return (f"the stored part agrees but the whole tensor's {stat} is {mine:.12g}, official {ref:.12g} "
                    f"(|diff| {abs(mine - ref):.3g} > {bound:.3g}): a mismatch outside the stored elements")
    return ""


def compare(fx: Fixture, ours: Mapping[str, torch.Tensor]) -> FixtureResult:
    """Every stored output of ``fx`` against ``ours`` (full tensors by official output name)."""
    result = FixtureResult(fx.name)
    for name in fx.outputs:
        result.checks.append(compare_output(fx, name, ours.get(name)))
    return result
