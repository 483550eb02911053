"""Generic dense-correspondence pieces: feature normalisation, cosine score matrices, soft warps.

Shared by the correspondence methods (CoCosNet v1's full matching; v2's coarsest level does the
same). Shapes: features are ``(B, C, N)`` (N = flattened positions) or ``(B, C, H, W)``; a score
or weight matrix is ``(B, N_target, N_source)``: row ``u`` says where target position ``u`` looks
in the source (the exemplar).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# The official CoCosNet code adds ``sys.float_info.epsilon`` to the norm (``util.feature_normalize``).
FEATURE_EPS = sys.float_info.epsilon


def feature_normalize(x: torch.Tensor, dim: int = 1, eps: float = FEATURE_EPS) -> torch.Tensor:
    """``x / (||x||_2 + eps)`` along ``dim`` (the channel axis by default)."""
    return x / (torch.norm(x, 2, dim, keepdim=True) + eps)


def centre_normalize(x: torch.Tensor, centre: str = "channel", eps: float = FEATURE_EPS) -> torch.Tensor:
    """Centre ``(B, C, N)`` features, then L2-normalise each position's C-vector.

    ``centre="channel"`` subtracts each position's mean over channels (the paper's Eq. 3 and the
    official ``--PONO_C``); ``"spatial"`` subtracts each channel's mean over positions (official
    default without ``--PONO_C``); ``"none"`` skips centring.
    """
    if centre == "channel":
        x = x - x.mean(dim=1, keepdim=True)
    elif centre == "spatial":
        x = x - x.mean(dim=2, keepdim=True)
    elif centre != "none":
        raise ValueError(f"centre must be 'channel', 'spatial' or 'none', got {centre!r}")
    return feature_normalize(x, dim=1, eps=eps)


def cosine_scores(target: torch.Tensor, source: torch.Tensor, centre: str = "channel") -> torch.Tensor:
    """Cosine similarity of every target position with every source position: ``(B, N_t, N_s)``."""
    t = centre_normalize(target.flatten(2), centre)
    s = centre_normalize(source.flatten(2), centre)
    return torch.bmm(t.transpose(1, 2), s)


def soft_weights(scores: torch.Tensor, alpha: float, dim: int = -1) -> torch.Tensor:
    """``softmax(alpha * scores)``; ``dim=-1`` normalises over the source (a forward warp)."""
    return F.softmax(scores * alpha, dim=dim)


def soft_warp(weights: torch.Tensor, source: torch.Tensor, size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Warp ``source`` ``(B, C, *spatial)`` with row-stochastic ``weights`` ``(B, N_t, N_s)``.

    Each target position receives the weighted average of the source positions (Eq. 4 of CoCosNet).
    Returns ``(B, C, N_t)``, or ``(B, C, *size)`` when ``size`` is given.
    """
    b, c = source.shape[:2]
    src = source.reshape(b, c, -1)
    if src.shape[2] != weights.shape[2]:
        raise ValueError(f"soft_warp: source has {src.shape[2]} positions, weights expect {weights.shape[2]}")
    out = torch.bmm(src, weights.transpose(1, 2))  # (B, C, N_t)
    return out if size is None else out.reshape(b, c, *size)
