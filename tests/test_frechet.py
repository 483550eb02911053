"""bench.metrics.frechet against clean-fid's ``frechet_distance`` and against closed forms.

clean-fid's function (scipy ``sqrtm`` of S1 S2) is the reference wherever its cost allows: small
dimensions, and the one 2048-d case that matters most, 200 samples (rank-deficient covariances,
as in our small evaluations; ~12 s of sqrtm). Other 2048-d cases use covariances with a shared
eigenbasis, whose distance is known in closed form: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
No timing here: scripts/bench_metrics.py --frechet measures speed.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from bench.metrics import frechet as FR
from bench.metrics.blas_threads import statistics_threads


def cleanfid_fd(mu1, s1, mu2, s2) -> float:
    from cleanfid.fid import frechet_distance

    # one BLAS thread: the 2048-d sqrtm takes ~100 s with two on a busy 2-core machine, ~15 s with one
    with warnings.catch_warnings(), statistics_threads():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy's sqrtm(disp=...) as clean-fid calls it
        return float(frechet_distance(mu1, s1, mu2, s2))


def real_looking(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Non-negative (post-ReLU, like Inception's pool features), correlated float32 features with
    a power-law covariance spectrum."""
    rs = np.random.RandomState(seed)
    mix = rs.randn(d, d) * (np.arange(1, d + 1) ** -0.7)[:, None]
    return np.maximum(rs.randn(n, d) @ mix + shift, 0).astype(np.float32)


def stats(x):
    return np.mean(x, axis=0), np.cov(x, rowvar=False)


def ours_from_features(a, b) -> float:
    return FR.frechet_distance_stats(FR.GaussianStats.from_features(a), FR.GaussianStats.from_features(b))


@pytest.mark.parametrize("n1,n2,d", [(3000, 3000, 64), (3000, 2500, 64), (700, 600, 256)])
def test_full_rank_equals_cleanfid(n1, n2, d):
    a, b = real_looking(n1, d, 1), real_looking(n2, d, 2, shift=0.3)
    ref = cleanfid_fd(*stats(a), *stats(b))
    assert FR.frechet_distance(*stats(a), *stats(b)) == pytest.approx(ref, rel=1e-6)
    assert ours_from_features(a, b) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("n1,n2,d", [(40, 40, 256), (30, 90, 256), (300, 200, 512)])
def test_rank_deficient_equals_cleanfid_small(n1, n2, d):
    a, b = real_looking(n1, d, 3), real_looking(n2, d, 4, shift=0.2)
    ref = cleanfid_fd(*stats(a), *stats(b))
    assert FR.frechet_distance(*stats(a), *stats(b)) == pytest.approx(ref, rel=1e-6)  # pivoted Cholesky route
    assert ours_from_features(a, b) == pytest.approx(ref, rel=1e-6)  # centred-features route


def test_rank_deficient_2048_equals_cleanfid():
    """200 samples x 2048-d, the small-evaluation case: both routes vs clean-fid's sqrtm."""
    a, b = real_looking(200, 2048, 5), real_looking(200, 2048, 6, shift=0.05)
    (mu1, s1), (mu2, s2) = stats(a), stats(b)
    ref = cleanfid_fd(mu1, s1, mu2, s2)
    assert FR.psd_factor(s1).shape == (2048, 199)  # the rank of 200 centred samples
    assert FR.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    assert ours_from_features(a, b) == pytest.approx(ref, rel=1e-6)


def _shared_basis(d: int, seed: int):
    """A dense orthogonal matrix, cheaply: the product of two Householder reflections I - 2 v v^T."""
    rs = np.random.RandomState(seed)
    q = np.eye(d)
    for _ in range(2):
        v = rs.randn(d)
        v /= np.linalg.norm(v)
        q -= 2 * np.outer(q @ v, v)
    return rs, q


@pytest.mark.parametrize("zeros", [0, 1900])
def test_2048_shared_eigenbasis_closed_form(zeros):
    """Full-rank (zeros=0) and rank-148 (zeros=1900) 2048-d covariances with one eigenbasis Q:
    S1 S2 = Q diag(a b) Q^T, so the distance is |dmu|^2 + sum (sqrt(a) - sqrt(b))^2 exactly."""
    d = 2048
    rs, q = _shared_basis(d, 7)
    ea = rs.uniform(0.01, 5.0, d) * np.arange(1, d + 1) ** -0.5
    eb = ea * rs.uniform(0.5, 1.5, d)
    ea[d - zeros:] = 0.0
    eb[d - zeros:] = 0.0
    s1, s2 = (q * ea) @ q.T, (q * eb) @ q.T
    mu1, mu2 = rs.randn(d) * 0.1, rs.randn(d) * 0.1
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(ea) - np.sqrt(eb)) ** 2)
    assert FR.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-6)


def test_identical_inputs_give_zero():
    for n, d in ((200, 2048), (3000, 64)):
        a = real_looking(n, d, 8)
        mu, s = stats(a)
        scale = np.trace(s)
        assert abs(FR.frechet_distance(mu, s, mu, s)) < 1e-9 * scale
        assert abs(ours_from_features(a, a)) < 1e-9 * scale
    mu, s = stats(real_looking(3000, 64, 9))
    assert abs(cleanfid_fd(mu, s, mu, s)) < 1e-9 * np.trace(s)  # the reference agrees


def test_factor_routes_agree_and_reproduce_the_covariance():
    for n, d in ((50, 128), (400, 128)):  # centred features (N <= d) and pivoted Cholesky (N > d)
        x = real_looking(n, d, 10)
        g = FR.GaussianStats.from_features(x)
        cov = np.cov(x, rowvar=False)
        np.testing.assert_allclose(g.factor @ g.factor.T, cov, rtol=0, atol=1e-10 * np.abs(cov).max())
        assert g.trace == pytest.approx(np.trace(cov), rel=1e-12)
        np.testing.assert_array_equal(g.mu, np.mean(x, axis=0).astype(np.float64))
        c = FR.GaussianStats.from_covariance(np.mean(x, axis=0), cov)
        assert c.factor.shape[1] == min(n - 1, d)


def test_nuclear_norm_gram_route_equals_svd(monkeypatch):
    """The eigenvalue-of-Gram route (used above SVD_MAX, i.e. at 2048) on a matrix small enough to
    compare with the singular values directly, tall and wide."""
    rs = np.random.RandomState(11)
    for shape in ((300, 200), (200, 300)):
        c = rs.randn(*shape) @ np.diag(np.logspace(0, -4, shape[1]))
        expect = np.sum(np.linalg.svd(c, compute_uv=False))
        monkeypatch.setattr(FR, "SVD_MAX", 10)
        assert FR.nuclear_norm(c) == pytest.approx(expect, rel=1e-10)
        monkeypatch.setattr(FR, "SVD_MAX", 1024)
        assert FR.nuclear_norm(c) == pytest.approx(expect, rel=1e-12)


def test_degenerate_and_bad_inputs():
    x = np.ones((5, 8), np.float32)  # constant features: zero covariance, a d x 0 factor
    assert ours_from_features(x, x) == 0.0
    assert FR.frechet_distance(np.zeros(8), np.zeros((8, 8)), np.ones(8), np.zeros((8, 8))) == pytest.approx(8.0)
    bad = real_looking(10, 8, 12)
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        FR.GaussianStats.from_features(bad)
    with pytest.raises(ValueError, match="at least 2"):
        FR.GaussianStats.from_features(bad[:1])
    with pytest.raises(ValueError, match="cannot be compared"):
        FR.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
