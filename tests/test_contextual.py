"""The contextual loss against a direct transcription of the official formula (methods.md 2.1)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.common.contextual import contextual_loss


def reference_cx(x: np.ndarray, y: np.ndarray, h: float, centre: str, min_affinity=None) -> float:
    losses = []
    for xs, ys in zip(x, y):  # per sample, (C, H, W)
        mu = ys.mean(axis=0, keepdims=True) if centre == "pono" else ys.mean(axis=(1, 2), keepdims=True)
        xs, ys = (xs - mu).reshape(xs.shape[0], -1), (ys - mu).reshape(ys.shape[0], -1)
        xs, ys = xs / np.linalg.norm(xs, axis=0), ys / np.linalg.norm(ys, axis=0)
        rows = []
        for i in range(xs.shape[1]):
            d = 1 - xs[:, i] @ ys
            w = np.exp((1 - d / (d.min() + 1e-3)) / h)
            rows.append((w / w.sum()).max())
        rows = np.array(rows)
        if min_affinity is not None:
            rows = rows[rows >= min_affinity]
            if rows.size == 0:
                continue
        losses.append(-np.log(rows.mean() + 1e-5))
    return float(np.mean(losses)) if losses else 0.0


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
