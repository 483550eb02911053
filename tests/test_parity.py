"""Parity with the official code: every golden-vector fixture under ``$BENCH_PARITY_DIR`` (default
``../shared/parity``) is rebuilt -- official weights from its manifest and fill seed, converted with
our converter, our network built from its official options -- run on its inputs in its mode and
dtype, and every stored output compared within the fixture's tolerance (``bench/parity``)."""
from __future__ import annotations

import pytest
import torch

from bench.parity import check_fixture
from bench.parity.costs import budget_s, load_costs, over_budget
from bench.malloc import reuse_freed_memory
from bench.parity.fixtures import Fixture, Tolerance, clear_fill_cache, compare_output, discover, parity_dir

ROOT = parity_dir()
FILES = discover(ROOT)
COSTS = load_costs()


@pytest.fixture(scope="module", autouse=True)
def parity_memory():
    """Large float64 temporaries reuse freed memory here; the filled weights memoised across
    fixtures and the kept memory are released when the module is done."""
    with reuse_freed_memory():
        yield
        clear_fill_cache()


def _id(path):
    return f"{path.parent.name}/{path.stem}"


@pytest.mark.skipif(not FILES, reason=f"no parity fixtures under {ROOT} (set BENCH_PARITY_DIR)")
@pytest.mark.parametrize("path", FILES, ids=[_id(p) for p in FILES])
def test_fixture(path):
    fx = Fixture.load(path, ROOT)
    why = over_budget(fx.name, COSTS, budget_s())
    if why:
        pytest.skip(why)
    torch.set_num_threads(2)
    result = check_fixture(fx)
    assert result.ok, result.summary()


def test_costs_decide_what_runs_within_the_budget(tmp_path):
    from bench.parity.costs import record_costs

    path = record_costs({"m/slow": 120.04, "m/fast": 3.0}, tmp_path / "costs.json")
    costs = load_costs(path)
    assert costs == {"m/fast": 3.0, "m/slow": 120.0}
    assert over_budget("m/fast", costs, 30) is None and over_budget("m/new", costs, 30) is None
    assert "make parity" in over_budget("m/slow", costs, 30) and over_budget("m/slow", costs, float("inf")) is None


# ---- the comparison itself (no fixtures needed) -----------------------------------------------------
class _FakeFill:
    @staticmethod
    def stored_view(t, stride):
        return t if stride == 1 else t[:, :, ::stride, ::stride]


def _fake_fixture(full: torch.Tensor, stride: int, tolerance=None):
    stored = full if stride == 1 else full[:, :, ::stride, ::stride]
    meta = {"shape": list(full.shape), "stride": stride, "sum": float(full.sum()), "abs_sum": float(full.abs().sum()),
            "min": float(full.min()), "max": float(full.max())}
    data = {"method": "m", "case": "c", "outputs": {"x": stored.clone()}, "output_meta": {"x": meta},
            "tolerance": tolerance or {"atol": 1e-10, "rtol": 1e-9}}
    return Fixture(path=None, root=None, data=data, fill=_FakeFill())


def test_compare_names_the_first_differing_position():
    full = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    fx = _fake_fixture(full, 1)
    ours = full.clone()
    ours[0, 1, 3, 5] += 1e-6
    check = compare_output(fx, "x", ours)
    assert not check.ok and "(0, 1, 3, 5)" in check.error
    assert compare_output(fx, "x", full.clone()).ok
    assert "not produced" in compare_output(fx, "x", None).error
    assert "shape" in compare_output(fx, "x", full[:, :1]).error


def test_compare_catches_a_difference_outside_the_stored_elements():
    full = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    fx = _fake_fixture(full, 4)
    ours = full.clone()
    ours[0, 0, 1, 1] += 1e-3  # not a stored element (stride 4)
    check = compare_output(fx, "x", ours)
    assert not check.ok and "outside the stored elements" in check.error
    ours = full.clone()
    ours[0, 0, 4, 4] += 1e-3  # a stored one: named by its position in the full tensor
    assert "(0, 0, 4, 4)" in compare_output(fx, "x", ours).error


def test_tolerance_overrides_by_output_name():
    spec = {"atol": 1e-9, "rtol": 1e-8, "matching_inds": "exact", "eps_float32_as_is": {"atol": 1e-4}}
    assert Tolerance.for_output(spec, "pm/level1/matching_inds").exact
    assert Tolerance.for_output(spec, "eps_float32_as_is").atol == 1e-4
    assert Tolerance.for_output(spec, "eps") == Tolerance(1e-9, 1e-8)
