"""The contextual loss against a direct transcription of the official formula (methods.md 2.1,
CoCosNet's ContextualLoss_forward; MIDMs' thresholded variant)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.common.contextual import contextual_loss


def reference_cx(x: np.ndarray, y: np.ndarray, h: float, centre: str, min_affinity=None) -> float:
    """The official ContextualLoss_forward by hand: per-sample -log(mean_i max_j A_ij), then the
    batch mean; MIDMs' min_affinity: -log of the mean of the kept entries over the whole batch."""
    best = []
    for xs, ys in zip(x, y):  # per sample, (C, H, W)
        mu = ys.mean(axis=0, keepdims=True) if centre == "pono" else ys.mean(axis=(1, 2), keepdims=True)
        xs, ys = (xs - mu).reshape(xs.shape[0], -1), (ys - mu).reshape(ys.shape[0], -1)
        eps = np.finfo(np.float64).eps  # the official feature_normalize's sys.float_info.epsilon
        xs, ys = xs / (np.linalg.norm(xs, axis=0) + eps), ys / (np.linalg.norm(ys, axis=0) + eps)
        rows = []
        for i in range(xs.shape[1]):
            d = 1 - xs[:, i] @ ys
            w = np.exp((1 - d / (d.min() + 1e-3)) / h)
            rows.append((w / w.sum()).max())
        best.append(np.array(rows))
    if min_affinity is None:
        return float(np.mean([-np.log(b.mean()) for b in best]))
    kept = np.concatenate([b[b >= min_affinity] for b in best])
    return float(-np.log(kept.mean())) if kept.size else 0.0


@pytest.mark.parametrize("centre", ["pono", "spatial"])
@pytest.mark.parametrize("min_affinity", [None, 0.3])
def test_matches_the_reference_formula(centre, min_affinity):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 8, 5, 4, generator=g, dtype=torch.float64), torch.randn(2, 8, 5, 4, generator=g,
                                                                                    dtype=torch.float64)
    y[1] = 0.9 * x[1] + 0.1 * y[1]  # one sample with strong matches, so the 0.3 threshold keeps rows
    got = contextual_loss(x, y, h=0.1, centre=centre, min_affinity=min_affinity)
    assert float(got) == pytest.approx(reference_cx(x.numpy(), y.numpy(), 0.1, centre, min_affinity), rel=1e-9)


def test_identical_features_cost_nothing_and_centring_uses_the_target():
    x = torch.randn(1, 16, 6, 6, dtype=torch.float64)
    assert float(contextual_loss(x, x.clone(), centre="pono")) < 1e-4
    # Centred by y's statistics: shifting x alone (by a per-pixel constant) changes the loss.
    shift = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    assert float(contextual_loss(x + shift, x, centre="pono")) > 1e-3


def test_midms_threshold_averages_over_the_whole_batch_and_is_zero_when_nothing_qualifies():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 4, 4, generator=g, dtype=torch.float64)
    y = x.clone()
    y[1] = torch.randn(8, 4, 4, generator=g, dtype=torch.float64)  # sample 1 keeps few rows, sample 0 all
    got = float(contextual_loss(x, y, centre="pono", min_affinity=0.3))
    assert got == pytest.approx(reference_cx(x.numpy(), y.numpy(), 0.1, "pono", 0.3), rel=1e-9)
    assert float(contextual_loss(x, y, centre="pono", min_affinity=1.1)) == 0.0
