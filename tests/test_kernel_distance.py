"""bench.metrics.kernel_distance against clean-fid's ``kernel_distance`` with the same seeded subsets.

The subsets are identical by construction (the same ``np.random.choice`` calls), which the tests
check through the random stream: after either function it is in the same state. On float64
features the values agree to float64 rounding (only the order of the sums differs); on float32
features clean-fid sums in float32, so they differ by its rounding (~1e-7 relative here).
"""
from __future__ import annotations

import numpy as np
import pytest

from bench.metrics import kernel_distance as KD


def features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rs = np.random.RandomState(seed)
    return np.maximum(rs.randn(n, d) + shift, 0)


def both(f1, f2, seed=0, **kw):
    from cleanfid.fid import kernel_distance

    np.random.seed(seed)
    ref = kernel_distance(f1, f2, **kw)
    ref_state = np.random.get_state()
    np.random.seed(seed)
    ours = KD.kernel_distance(f1, f2, **kw)
    ours_state = np.random.get_state()
    assert ref_state[2] == ours_state[2]  # same position in the stream ...
    np.testing.assert_array_equal(ref_state[1], ours_state[1])  # ... and the same key: the same draws
    return ours, ref


@pytest.mark.parametrize("n1,n2,d,kw", [
    (60, 60, 64, {}),  # m = n: every subset a permutation of all rows
    (80, 50, 64, {"num_subsets": 20}),  # sets of different sizes, m = 50
    (300, 250, 128, {"num_subsets": 30, "max_subset_size": 100}),  # m < n
])
def test_equals_cleanfid_on_float64(n1, n2, d, kw):
    f1, f2 = features(n1, d, 1), features(n2, d, 2, shift=0.1)
    ours, ref = both(f1, f2, seed=5, **kw)
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_several_row_blocks(monkeypatch):
    monkeypatch.setattr(KD, "BLOCK_ELEMENTS", 7 * 45)  # 7-row blocks: they do not divide the set sizes
    f1, f2 = features(50, 32, 3), features(45, 32, 4, shift=0.2)
    ours, ref = both(f1, f2, seed=1, num_subsets=10, max_subset_size=30)
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_float32_features_within_cleanfid_rounding():
    f1, f2 = features(200, 256, 5).astype(np.float32), features(200, 256, 6, shift=0.05).astype(np.float32)
    ours, ref = both(f1, f2, seed=2, num_subsets=20)
    exact, _ = both(f1.astype(np.float64), f2.astype(np.float64), seed=2, num_subsets=20)
    assert ours == pytest.approx(exact, rel=1e-6)  # float32 products, float64 sums
    assert ours == pytest.approx(ref, rel=1e-5)  # clean-fid: float32 products and sums


def test_identical_sets_near_zero_and_shift_positive():
    f = features(100, 64, 7)
    same, _ = both(f, f, num_subsets=10)
    shifted, _ = both(f, f + 0.5, num_subsets=10)
    assert shifted > 0 and abs(same) < 0.05 * shifted
