"""Contextual loss (Mechrez et al. 2018) as the CoCosNet and MIDMs code computes it.

CoCosNet (``ContextualLoss.py: ContextualLoss_forward``, h=0.1, reference/methods.md 2.1):
centre X and Y by Y's mean (over channels with PONO, otherwise spatially), L2-normalise,
d = 1 - cos, d~ = d / (min_j d + 1e-3), w = exp((1 - d~) / h), A = w / sum_j w,
CX = mean_i max_j A_ij, loss = -log CX per sample, then the batch mean.
MIDMs' variant (methods.md 2.3) averages only the rows whose max affinity is >= 0.3
(``min_affinity=0.3``), and is 0 when no row qualifies.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def contextual_loss(x: torch.Tensor, y: torch.Tensor, h: float = 0.1, centre: str = "spatial",
                    min_affinity: Optional[float] = None, log_eps: float = 1e-5) -> torch.Tensor:
    """CX loss between feature maps ``x`` (generated) and ``y`` (target), both (N, C, H, W).

    ``log_eps`` is added to CX inside the log; the official code has none (``-torch.log(CX)``):
    CoCosNet v2 passes 0."""
    if x.shape != y.shape:
        raise ValueError(f"contextual_loss: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    n, c = x.shape[:2]
    # Both are centred by the *target's* mean, as the official code does: per pixel over channels
    # (PONO) or per sample over space.
    if centre == "pono":
        y_mu = y.mean(dim=1, keepdim=True)
    elif centre == "spatial":
        y_mu = y.mean(dim=(2, 3), keepdim=True)
    else:
        raise ValueError(f"contextual_loss: centre must be 'spatial' or 'pono', got {centre!r}")
    x, y = x - y_mu, y - y_mu
    x = F.normalize(x.reshape(n, c, -1), dim=1)
    y = F.normalize(y.reshape(n, c, -1), dim=1)
    d = 1 - torch.bmm(x.transpose(1, 2), y)  # (N, HWx, HWy)
    d_tilde = d / (d.min(dim=2, keepdim=True)[0] + 1e-3)
    w = torch.exp((1 - d_tilde) / h)
    a = w / w.sum(dim=2, keepdim=True)
    best = a.max(dim=2)[0]  # (N, HWx): each generated feature's best match in y
    if min_affinity is None:
        cx = best.mean(dim=1)
        return (-torch.log(cx + log_eps)).mean()
    keep = best.ge(min_affinity).float()
    if keep.sum() == 0:
        return x.new_zeros(())
    cx = (best * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
    rows = keep.sum(dim=1) > 0
    return (-torch.log(cx[rows] + log_eps)).mean()
