"""The Fréchet distance of two Gaussians: clean-fid's formula, its matrix square root replaced.

clean-fid's ``frechet_distance`` returns ``diff.diff + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` and
gets the last term from ``scipy.linalg.sqrtm`` of the non-symmetric 2048x2048 product (a complex
Schur decomposition: 11-13 s on this 2-core machine when idle, 1-3 minutes when busy). Only the *trace*
of the root is needed, and that is a spectral quantity of a symmetric problem:

    with any factors S1 = A A^T and S2 = B B^T, the non-zero eigenvalues of S1 S2 = A (A^T S2)
    are those of A^T S2 A = (B^T A)^T (B^T A), i.e. the squared singular values of B^T A, so
    tr(sqrtm(S1 S2)) = sum of the singular values of B^T A (its nuclear norm).

Factors: from N samples the covariance is Xc^T Xc / (N - 1) (Xc the centred features), so Xc^T /
sqrt(N - 1) is a factor; when N <= d it is also the small one (d x N, rank <= N - 1 < d), and B^T A
is only N2 x N1 -- the "small N x N matrix" route, no d x d decomposition at all. Otherwise (N > d,
or only a covariance is given) the factor is a pivoted Cholesky factor (LAPACK ``dpstrf``), which
is rank-revealing: a singular covariance gets a d x rank factor instead of one padded with the
square roots of rounding noise.

Everything runs in float64, as clean-fid's statistics do. tests/test_frechet.py compares with
clean-fid's function on full-rank and rank-deficient covariances; ``scripts/bench_metrics.py
--frechet`` measures both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.linalg import lapack

from bench.metrics.blas_threads import statistics_threads

# Above this many singular values the nuclear norm comes from the eigenvalues of the smaller Gram
# matrix instead of an SVD: one symmetric tridiagonalisation instead of a bidiagonalisation, ~2.5x
# cheaper at 2000 and about equal at 1000 (measured here). The SVD is kept below it because it
# resolves small singular values to eps * ||C|| where the Gram route gets sqrt(eps) * ||C||.
SVD_MAX = 1024


@dataclass(frozen=True)
class GaussianStats:
    """Mean, covariance trace and a covariance factor (``factor @ factor.T`` = covariance) of a
    feature set: what the Fréchet distance needs, in float64."""

    mu: np.ndarray  # (d,)
    trace: float  # tr(covariance)
    factor: np.ndarray  # (d, r)

    @classmethod
    def from_covariance(cls, mu: np.ndarray, sigma: np.ndarray) -> "GaussianStats":
        sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
        _check_finite("covariance", sigma)
        with statistics_threads():
            factor = psd_factor(sigma)
        return cls(np.atleast_1d(np.asarray(mu, dtype=np.float64)), float(np.trace(sigma)), factor)

    @classmethod
    def from_features(cls, feats: np.ndarray, mu: Optional[np.ndarray] = None) -> "GaussianStats":
        """Statistics of (N, d) features, N >= 2: the mean (``mu`` when the caller already has
        it, e.g. clean-fid's ``np.mean`` of float32 features) and the covariance ``np.cov``."""
        feats = np.asarray(feats)
        n, d = feats.shape
        if n < 2:
            raise ValueError(f"Fréchet distance: a covariance needs at least 2 feature rows, got {n}")
        _check_finite("features", feats)
        mu = np.mean(feats, axis=0) if mu is None else mu
        if n > d:
            with statistics_threads():
                sigma = np.cov(feats, rowvar=False)
            return cls.from_covariance(mu, sigma)
        # N <= d: the centred features are the (smallest) factor; np.cov centres in float64 too
        x = feats.astype(np.float64)
        factor = (x - x.mean(axis=0)).T / np.sqrt(n - 1)
        return cls(np.asarray(mu, dtype=np.float64), float(np.einsum("ij,ij->", factor, factor)), factor)


def _check_finite(what: str, x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        raise ValueError(f"Fréchet distance: the {what} have non-finite entries (NaN/inf); check the features "
                         f"they come from (a diverged model's outputs?)")


def psd_factor(sigma: np.ndarray) -> np.ndarray:
    """A (d, r) float64 factor F of a covariance, F @ F.T = sigma, r its numerical rank.

    LAPACK ``dpstrf`` (Cholesky with complete pivoting) stops when the largest remaining pivot is
    below its default tolerance d * eps * max(diag(sigma)): what is left is the rounding noise of a
    singular covariance, whose square roots would otherwise add a spurious sum(sqrt(noise)) to the
    trace. It reads the lower triangle only (covariances are symmetric) and costs d^2 r.
    """
    d = sigma.shape[0]
    c, piv, rank, info = lapack.dpstrf(sigma, lower=1)
    if info < 0:
        raise ValueError(f"LAPACK dpstrf rejected argument {-info} (covariance of shape {sigma.shape})")
    factor = np.empty((d, rank))
    factor[piv - 1] = np.tril(c[:, :rank])  # rows back in sigma's order: P L L^T P^T = sigma
    return factor


def nuclear_norm(c: np.ndarray) -> float:
    """Sum of the singular values of ``c``."""
    k = min(c.shape)
    if k == 0:  # a zero covariance (constant features) has a d x 0 factor
        return 0.0
    if k <= SVD_MAX:
        return float(np.sum(np.linalg.svd(c, compute_uv=False)))
    gram = c.T @ c if c.shape[1] <= c.shape[0] else c @ c.T  # numpy runs x.T @ x as one syrk
    eig = np.linalg.eigvalsh(gram)
    # The Gram matrix is positive semi-definite, so a negative eigenvalue is rounding: a computed
    # eigenvalue is within ~eps * ||gram|| of a true one, which is >= 0. Clip it to 0 (its square
    # root would be NaN; clean-fid's sqrtm turns the same noise into imaginary parts it drops).
    return float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))


def frechet_distance_stats(a: GaussianStats, b: GaussianStats) -> float:
    """clean-fid's formula, diff.diff + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), from two stats."""
    if a.mu.shape != b.mu.shape or a.factor.shape[0] != a.mu.size or b.factor.shape[0] != b.mu.size:
        raise ValueError(f"Fréchet distance: statistics of {a.mu.size}-d and {b.mu.size}-d features "
                         f"(covariance factors {a.factor.shape}, {b.factor.shape}) cannot be compared")
    diff = a.mu - b.mu
    with statistics_threads():
        tr_covmean = nuclear_norm(b.factor.T @ a.factor)
    return float(diff.dot(diff) + a.trace + b.trace - 2 * tr_covmean)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Drop-in for clean-fid's ``frechet_distance(mu1, sigma1, mu2, sigma2)``."""
    return frechet_distance_stats(GaussianStats.from_covariance(mu1, sigma1),
                                  GaussianStats.from_covariance(mu2, sigma2))
