"""clean-fid's KID (``kernel_distance``) with every subset at once instead of one loop pass each.

clean-fid draws ``num_subsets`` subsets of m = min(n1, n2, max_subset_size) rows of each set and,
per subset, builds three m x m cubic-kernel matrices k(x, y) = (x.y / d + 1)^3 from scratch: 100
passes of 3 m^2 d multiply-adds (8 s for 200 x 2048-d features on this machine, 30 s at m = 1000).
Every subset reads the same kernel values, so here each Gram matrix of the full sets is computed
once, and a subset's sums are quadratic forms with its 0/1 indicator vector w: the sum of K[i, j]
over i, j in the subset is w^T K w, for all subsets at once as one product K W.

Same result: the subsets are clean-fid's -- the same ``np.random.choice`` calls on the global
``np.random`` stream, in its order (x from ``feats2``, then y from ``feats1``) -- and the estimator
is its formula. The products x.y are computed in the features' dtype, as clean-fid's matmuls do;
the kernel values and all sums are float64 (clean-fid sums in the features' dtype, so on float32
features the two differ by its float32 rounding; on float64 features they agree to float64
rounding; tests/test_frechet.py checks both).
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from bench.metrics.blas_threads import statistics_threads

# Kernel values held at once (float64: 128 MB). A set of up to 4096 rows against itself fits in one
# block, which numpy computes as one syrk (x @ x.T: half the multiply-adds of a general product).
BLOCK_ELEMENTS = 1 << 24


def draw_subsets(n1: int, n2: int, m: int, num_subsets: int) -> Tuple[np.ndarray, np.ndarray]:
    """clean-fid's draws from the global ``np.random``: per subset, m rows of set 2, then of set 1."""
    ix: List[np.ndarray] = []
    iy: List[np.ndarray] = []
    for _ in range(num_subsets):
        ix.append(np.random.choice(n2, m, replace=False))
        iy.append(np.random.choice(n1, m, replace=False))
    return np.stack(ix), np.stack(iy)


def indicator(index: np.ndarray, n: int) -> np.ndarray:
    """(n, S) float64: column s is 1 at the rows subset s uses (no repeats: drawn without replacement)."""
    w = np.zeros((n, index.shape[0]))
    w[index, np.arange(index.shape[0])[:, None]] = 1.0
    return w


def kernel_block_sums(p: np.ndarray, q: np.ndarray, wp: np.ndarray, wq: np.ndarray, dim: int):
    """Per subset s: sum over i in subset_p(s), j in subset_q(s) of k(p_i, q_j), and, when p is q,
    the diagonal sum over i in subset(s) of k(p_i, p_i). Returns ((S,), (S,) or None)."""
    total = np.zeros(wp.shape[1])
    diag = np.zeros(wp.shape[1]) if p is q else None
    rows = max(1, BLOCK_ELEMENTS // q.shape[0])
    for lo in range(0, p.shape[0], rows):
        hi = min(lo + rows, p.shape[0])
        k = (p[lo:hi] @ q.T).astype(np.float64)  # products in the features' dtype, as clean-fid
        k /= dim
        k += 1
        k **= 3
        total += np.einsum("is,is->s", wp[lo:hi], k @ wq)
        if diag is not None:
            diag += wp[lo:hi].T @ np.diagonal(k, offset=lo)
    return total, diag


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100,
                    max_subset_size: int = 1000) -> float:
    """Equal to ``cleanfid.fid.kernel_distance(feats1, feats2, num_subsets, max_subset_size)`` after
    the same ``np.random`` state (and leaves the stream where clean-fid would)."""
    with statistics_threads():
        return _kernel_distance(feats1, feats2, num_subsets, max_subset_size)


def _kernel_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int, max_subset_size: int) -> float:
    dim = feats1.shape[1]
    m = min(min(feats1.shape[0], feats2.shape[0]), max_subset_size)
    ix, iy = draw_subsets(feats1.shape[0], feats2.shape[0], m, num_subsets)
    wx, wy = indicator(ix, feats2.shape[0]), indicator(iy, feats1.shape[0])
    xx, xx_diag = kernel_block_sums(feats2, feats2, wx, wx, dim)
    yy, yy_diag = kernel_block_sums(feats1, feats1, wy, wy, dim)
    xy, _ = kernel_block_sums(feats2, feats1, wx, wy, dim)
    t = (xx + yy - xx_diag - yy_diag) / (m - 1) - xy * 2 / m
    return float(np.sum(t) / num_subsets / m)
