"""MIDMs' training losses as the official ``utils_training/optimize.py`` computes them.

Official names (its ``train_epoch`` locals, the parity fixture's ``loss/*``) and the paper's terms:

* ``loss_domain`` (L_dom, Eq. 12): L1 between the L2-normalised condition and ground-truth
  features, plus the same with both multiplied by the (detached) normalised exemplar features.
* ``loss_fb`` / ``loss_fb_iterative`` (L_cycle, Eq. 13): latent cycles ``warp_back(warp(z)) ~ z``.
* ``loss_feat`` (L_src, Eq. 14): weighted VGG r12..r52 L1 of the decoded self-warped ground truth.
* ``loss_perc`` (L_perc, Eq. 15): VGG L1 of the decoded translation against the ground truth.
* ``loss_context`` (L_style, Eq. 16): MIDMs' contextual loss (below) at r52/r42/r32/r22.
* ``original_loss``: the warm-up latent self-warp MSE, then the diffusion x0 loss (L_diff).

VGG features come as ``{layer: tensor}`` with the torchvision-style names ``relu1_2`` ... ``relu5_2``
(official ``r12`` ... ``r52``).
"""
from __future__ import annotations

import sys
from typing import Mapping

import torch
import torch.nn.functional as F

from methods.midms.matching import soft_warp, warp_back

VGG_LAYERS = ("relu1_2", "relu2_2", "relu3_2", "relu4_2", "relu5_2")  # official r12 .. r52
FEAT_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)  # official loss_feat weights
# Official loss_context: 8 CX(r52) + 4 CX(r42) + 2 CX(avgpool2 r32) + 1 CX(avgpool4 r22).
CONTEXT_TERMS = (("relu5_2", 8.0, 1), ("relu4_2", 4.0, 1), ("relu3_2", 2.0, 2), ("relu2_2", 1.0, 4))


def feature_normalize(f: torch.Tensor) -> torch.Tensor:
    """``util.feature_normalize``: ``f / (||f||_2 over channels + eps)``. ``util.py`` defines it twice;
    the second definition wins, with eps = ``sys.float_info.epsilon`` (2.2e-16), not the first's 1e-6."""
    return torch.div(f, torch.norm(f, 2, 1, keepdim=True) + sys.float_info.epsilon)


def domain_loss(f_cond: torch.Tensor, f_gt: torch.Tensor, f_exemplar: torch.Tensor) -> torch.Tensor:
    """``loss_domain``: aligns F_X(condition) with F_Y(ground truth), plain and weighted by the
    detached exemplar features."""
    n_ref = feature_normalize(f_exemplar).detach()
    n_cond, n_gt = feature_normalize(f_cond), feature_normalize(f_gt)
    return F.l1_loss(n_cond, n_gt) + F.l1_loss(n_ref * n_cond, n_ref * n_gt)


def cycle_loss(z: torch.Tensor, corr: torch.Tensor, tau: float) -> torch.Tensor:
    """``loss_fb``: L1 of ``z`` warped to the query grid and back with the transposed correlation."""
    hw = tuple(z.shape[2:])
    return F.l1_loss(warp_back(soft_warp(z, corr, tau, hw), corr, tau, hw), z.detach())


def rewarp_cycle_loss(rewarp: torch.Tensor, corr: torch.Tensor, z: torch.Tensor, tau: float) -> torch.Tensor:
    """One ``loss_fb`` increment of a re-matching: the re-warp ``rewarp`` (= ``soft_warp(z, corr)``)
    warped back, against ``z``."""
    return F.l1_loss(warp_back(rewarp, corr, tau, tuple(z.shape[2:])), z.detach())


def feat_loss(f_out: Mapping[str, torch.Tensor], f_gt: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``loss_feat``: sum over r12..r52 of weight x L1 (targets detached)."""
    return sum(w * F.l1_loss(f_out[k], f_gt[k].detach()) for k, w in zip(VGG_LAYERS, FEAT_WEIGHTS))


def perceptual_loss(f_out: Mapping[str, torch.Tensor], f_gt: Mapping[str, torch.Tensor], layer: str) -> torch.Tensor:
    """``loss_perc``: L1 at one VGG layer (official ``which_perceptual`` -2 = r42, LSUN -1 = r52)."""
    return F.l1_loss(f_out[layer], f_gt[layer].detach())


def contextual_loss(x: torch.Tensor, y: torch.Tensor, h: float = 0.1, min_affinity: float = 0.3) -> torch.Tensor:
    """MIDMs' ``ContextualLoss_forward`` between ``x`` (generated) and ``y`` (target), (N, C, H, W).

    As CoCosNet's contextual loss (both centred by the target's per-pixel channel mean, cosine
    distance, d / (min d + 1e-3), exp((1 - d~) / h), row-normalised affinities A), but only rows
    whose best affinity max_j A_ij is >= ``min_affinity`` count, and they are pooled over the whole
    batch: ``-log(mean of the kept maxima)`` (0 when no row qualifies). Not the methods/common
    loss: that one averages per sample and adds 1e-5 inside the log. (The official function also
    computes an ``fbcheck`` it never uses; left out.)"""
    if x.shape != y.shape:
        raise ValueError(f"contextual_loss: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    n, c = x.shape[:2]
    y_mu = y.mean(dim=1, keepdim=True)
    x = feature_normalize(x - y_mu).reshape(n, c, -1)
    y = feature_normalize(y - y_mu).reshape(n, c, -1)
    d = 1 - torch.matmul(x.permute(0, 2, 1), y)
    d_norm = d / (torch.min(d, dim=-1, keepdim=True)[0] + 1e-3)
    w = torch.exp((1 - d_norm) / h)
    a = w / torch.sum(w, dim=-1, keepdim=True)
    best = torch.max(a, dim=-1)[0]
    keep = best.ge(min_affinity)
    if not bool(keep.any()):
        return best.new_zeros(())
    return -torch.log(torch.masked_select(best, keep).mean())


def style_loss(f_out: Mapping[str, torch.Tensor], f_exemplar: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``loss_context``: 8 CX(r52) + 4 CX(r42) + 2 CX(avg-pool 2 of r32) + CX(avg-pool 4 of r22),
    against the detached exemplar features."""
    total = 0
    for layer, weight, pool in CONTEXT_TERMS:
        a, b = f_out[layer], f_exemplar[layer].detach()
        if pool > 1:
            a, b = F.avg_pool2d(a, pool), F.avg_pool2d(b, pool)
        total = total + weight * contextual_loss(a, b)
    return total
