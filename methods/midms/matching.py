"""MIDMs' cross-domain matching in latent space, and the soft-warp / confidence helpers it uses.

Networks follow the official ``models/generator.py`` / ``models/midms.py`` (reference/methods.md 1.3):

* ``F_X`` (``seg_enc``): three stride-1 3x3 convs (spectral norm + instance norm, LReLU 0.2) on the
  condition map at latent resolution, then a SPADE residual block conditioned on that map.
* ``F_Y`` (``real_enc``): the same on a latent, SPADE-conditioned on the latent itself.
* ``F_Y^iter`` (``iter_enc``): the same on the current x0 estimate, SPADE-conditioned on the
  condition's features ``F_X(.)`` -- the paper's "refined warp mixed with the condition" (Eq. 8).
* a shared trunk of four residual blocks over [features, semantics] ("maskmix"), then 1x1 ``theta``
  (condition side) / ``phi`` (exemplar and ground-truth side).

Correlation is cosine similarity of channel-centred features with negatives clamped to 0 (the
official ``Correlation.correlation``); warping is a softmax over exemplar positions with
temperature ``tau`` (Eq. 6). Correlations are kept flat, ``(B, N_query, N_source)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from methods.common.spade_blocks import SPADEResBlock


def _sn_in_conv(cin: int, cout: int) -> nn.Sequential:
    """SPADE's ``spectralinstance`` conv: spectral-norm 3x3 conv without bias, then instance norm."""
    return nn.Sequential(spectral_norm(nn.Conv2d(cin, cout, 3, padding=1, bias=False)),
                         nn.InstanceNorm2d(cout, affine=False))


class ShallowEncoder(nn.Module):
    """``ShallowAdaptiveFeatureGenerator``: in -> h -> 4h -> 8h (stride 1), SPADE block 8h -> out.

    ``seg_channels`` is the SPADE conditioning's width; ``forward(x)`` conditions on ``x`` itself.
    The SPADE blocks use positional normalisation (PONO) as the official MIDMs blocks do.
    """

    def __init__(self, in_channels: int, hidden: int, out_channels: int, seg_channels: int, spade_hidden: int):
        super().__init__()
        self.layer1 = _sn_in_conv(in_channels, hidden)
        self.layer2 = _sn_in_conv(hidden, 4 * hidden)
        self.layer3 = _sn_in_conv(4 * hidden, 8 * hidden)
        self.block = SPADEResBlock(8 * hidden, out_channels, seg_channels, hidden=spade_hidden, norm="positional",
                                   padding="reflect")

    def forward(self, x: torch.Tensor, seg: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.layer1(x)
        h = self.layer2(F.leaky_relu(h, 0.2))
        h = self.layer3(F.leaky_relu(h, 0.2))
        return self.block(h, x if seg is None else seg)


class ResidualBlock(nn.Module):
    """The official trunk block: reflect-pad 3x3 conv, IN, PReLU, reflect-pad conv, IN, + x, PReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.norm1 = nn.InstanceNorm2d(channels)
        self.norm2 = nn.InstanceNorm2d(channels)
        self.prelu = nn.PReLU()  # one PReLU used twice, as in the official block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.prelu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.prelu(out + x)


class MatchingNetworks(nn.Module):
    """F_X, F_Y, F_Y^iter and the matching trunk (see the module docstring)."""

    def __init__(self, latent_channels: int, cond_channels: int, channels: int, hidden: int, spade_hidden: int,
                 maskmix: bool, recurrent: bool):
        super().__init__()
        self.maskmix = maskmix
        self.f_x = ShallowEncoder(cond_channels, hidden, channels, cond_channels, spade_hidden)
        self.f_y = ShallowEncoder(latent_channels, hidden, channels, latent_channels, spade_hidden)
        # Only built when recurrent matching runs, so "(-) recurrent matching" has no such network.
        self.f_y_iter = (ShallowEncoder(latent_channels, hidden, channels, channels, spade_hidden)
                         if recurrent else None)
        trunk = channels + (cond_channels if maskmix else 0)
        self.layer = nn.Sequential(*[ResidualBlock(trunk) for _ in range(4)])
        self.theta = nn.Conv2d(trunk, channels, 1)
        self.phi = nn.Conv2d(trunk, channels, 1)

    def _trunk(self, feats: torch.Tensor, semantics: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.cat([feats, semantics], dim=1) if self.maskmix else feats)

    def condition_side(self, feats: torch.Tensor, semantics: torch.Tensor) -> torch.Tensor:
        return self.theta(self._trunk(feats, semantics))

    def image_side(self, feats: torch.Tensor, semantics: torch.Tensor) -> torch.Tensor:
        return self.phi(self._trunk(feats, semantics))


# ---- correlation and warping ---------------------------------------------------------------------
def normalise_features(f: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Channel-centred, L2-normalised features (the official centring before correlation)."""
    f = f - f.mean(dim=1, keepdim=True)
    return f / (f.norm(dim=1, keepdim=True) + eps)


def correlation(query: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Cosine correlation ``(B, Hq*Wq, Hs*Ws)`` of centred features, negatives clamped to 0 (Eq. 5)."""
    q = normalise_features(query).flatten(2)
    s = normalise_features(source).flatten(2)
    return torch.bmm(q.transpose(1, 2), s).clamp(min=0)


def soft_warp(values: torch.Tensor, corr: torch.Tensor, tau: float, out_hw: Tuple[int, int]) -> torch.Tensor:
    """Eq. 6: ``out(u) = sum_v softmax_v(corr(u, v) / tau) values(v)``; values live on the source grid."""
    b, c = values.shape[:2]
    attn = F.softmax(corr / tau, dim=-1)  # (B, Nq, Ns)
    out = torch.bmm(attn, values.flatten(2).transpose(1, 2))  # (B, Nq, C)
    return out.transpose(1, 2).reshape(b, c, *out_hw)


def warp_back(values: torch.Tensor, corr: torch.Tensor, tau: float, out_hw: Tuple[int, int]) -> torch.Tensor:
    """The reverse warp with the transposed correlation (query grid -> source grid), for the cycle
    loss: ``out(v) = sum_u softmax_u(corr(u, v) / tau) values(u)`` (official ``corr.permute``)."""
    return soft_warp(values, corr.transpose(1, 2), tau, out_hw)


def coordinate_grid(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(h*w, 2)`` pixel positions as (x, y) in [-1, 1], corners at -1/1 (``align_corners=True``)."""
    ys = torch.linspace(-1, 1, h, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, w, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(-1, 2)


def soft_argmax_maps(corr: torch.Tensor, q_hw: Tuple[int, int], s_hw: Tuple[int, int], tau: float):
    """Forward map (for each query pixel, its expected source position) ``(B, Nq, 2)`` and backward
    map (for each source pixel, its expected query position) ``(B, Ns, 2)``, the official ``get_flow``."""
    grid_q = coordinate_grid(*q_hw, device=corr.device, dtype=corr.dtype)
    grid_s = coordinate_grid(*s_hw, device=corr.device, dtype=corr.dtype)
    fwd = torch.matmul(F.softmax(corr / tau, dim=-1), grid_s)
    bwd = torch.matmul(F.softmax(corr / tau, dim=1).transpose(1, 2), grid_q)
    return fwd, bwd


def confidence_mask(corr: torch.Tensor, q_hw: Tuple[int, int], s_hw: Tuple[int, int], tau: float,
                    gamma: float, majority_pool: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10: 1 where the forward-backward cycle returns within ``gamma`` of the start, else 0.

    The cycle ``u -> psi_fwd(u) -> psi_bwd(psi_fwd(u))`` samples the backward map bilinearly at the
    forward position; the error is the Euclidean distance in normalised [-1, 1] coordinates (the
    official threshold 0.5 is in these units; the paper writes a squared norm). The official code
    samples the *forward* flow at the forward position instead (``fbcheck``), which flags any pure
    translation as inconsistent; this follows the paper's definition. ``majority_pool`` is the
    official clean-up: 2x2 average, nearest upsampling, > 0.5.

    Returns ``(mask (B, 1, Hq, Wq) float, cycle error (B, 1, Hq, Wq))``.
    """
    b = corr.shape[0]
    fwd, bwd = soft_argmax_maps(corr, q_hw, s_hw, tau)
    bwd_img = bwd.transpose(1, 2).reshape(b, 2, *s_hw)
    back = F.grid_sample(bwd_img, fwd.reshape(b, *q_hw, 2), mode="bilinear", align_corners=True)
    start = coordinate_grid(*q_hw, device=corr.device, dtype=corr.dtype).transpose(0, 1).reshape(1, 2, *q_hw)
    err = (back - start).norm(dim=1, keepdim=True)
    mask = (err < gamma).to(corr.dtype)
    if majority_pool and min(q_hw) >= 2:
        pooled = F.avg_pool2d(mask, 2, ceil_mode=True)
        mask = (F.interpolate(pooled, size=q_hw, mode="nearest") > 0.5).to(corr.dtype)
    return mask.detach(), err.detach()
