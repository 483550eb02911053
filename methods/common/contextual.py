"""Contextual loss (Mechrez et al. 2018) as the CoCosNet, CoCosNet v2 and MIDMs code computes it.

Official ``ContextualLoss_forward`` (CoCosNet ``models/networks/ContextualLoss.py``, h = 0.1,
reference/methods.md 2.1): centre X and Y by Y's mean (over channels with PONO, otherwise
spatially), L2-normalise each position's feature (``x / (||x|| + eps)``, the official
``feature_normalize``), d = 1 - cos, d~ = d / (min_j d + 1e-3), w = exp((1 - d~) / h),
A = w / sum_j w, CX = mean_i max_j A_ij, loss = -log CX per sample (no epsilon inside the log),
then the batch mean (the callers' ``torch.mean``).

MIDMs' variant (``min_affinity=0.3``, methods.md 2.3) keeps only the entries max_j A_ij >= 0.3,
averages them over the *whole batch* (``torch.masked_select``, not per sample) and returns
-log of that mean, or 0 when nothing qualifies.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

# ``util.feature_normalize``'s epsilon in CoCosNet v1 and MIDMs; CoCosNet v2's is 1e-10.
FEATURE_EPS = sys.float_info.epsilon


def contextual_loss(x: torch.Tensor, y: torch.Tensor, h: float = 0.1, centre: str = "spatial",
                    min_affinity: Optional[float] = None, norm_eps: float = FEATURE_EPS) -> torch.Tensor:
    """CX loss between feature maps ``x`` (generated) and ``y`` (target), both (N, C, H, W)."""
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
    x = x / (torch.norm(x, 2, 1, keepdim=True) + norm_eps)
    y = y / (torch.norm(y, 2, 1, keepdim=True) + norm_eps)
    d = 1 - torch.bmm(x.reshape(n, c, -1).transpose(1, 2), y.reshape(n, c, -1))  # (N, HWx, HWy)
    d_tilde = d / (d.min(dim=2, keepdim=True)[0] + 1e-3)
    w = torch.exp((1 - d_tilde) / h)
    a = w / w.sum(dim=2, keepdim=True)
    best = a.max(dim=2)[0]  # (N, HWx): each generated feature's best match in y
    if min_affinity is None:
        return (-torch.log(best.mean(dim=1))).mean()
    keep = best.ge(min_affinity)
    if not bool(keep.any()):
        return x.new_zeros(())
    return -torch.log(torch.masked_select(best, keep).mean())
