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
temperature ``tau`` (Eq. 6). Correlations are kept flat, ``(B, N_query, N_source)``; the official
code keeps them ``(B, Hq, Wq, Hs, Ws)``.

The confidence mask is the official one by default: ``get_flow`` (soft-argmax maps) then
``fbcheck``, threshold 0.5 and a 2x2 majority vote; the paper's forward-backward cycle (Eq. 10)
is ``mask_check="cycle"`` (see ``fbcheck`` for how the two differ).
"""
from __future__ import annotations

from dataclasses import dataclass
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

    def trunk(self, feats: torch.Tensor, semantics: torch.Tensor) -> torch.Tensor:
        """The shared ``layer`` on [features, semantics] (official maskmix; features only without)."""
        return self.layer(torch.cat([feats, semantics], dim=1) if self.maskmix else feats)


# ---- correlation and warping (official models/midms.py, models/base/correlation.py, util/util.py) --
def centre_normalise(f: torch.Tensor) -> torch.Tensor:
    """Channel-centred, L2-normalised features: the official lines after theta/phi (and around
    ``iter_enc``), ``f - f.mean(1)`` then ``f / ||f||`` -- no epsilon there."""
    f = f - f.mean(dim=1, keepdim=True)
    return torch.div(f, torch.norm(f, 2, 1, keepdim=True))


def correlation(query: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``Correlation.correlation``: cosine ``(B, Hq*Wq, Hs*Ws)`` with negatives clamped to 0 (Eq. 5).

    It L2-normalises again with ``+ 1e-5`` on the norm; MIDMs feeds it features that are already
    unit-norm, so its correlations are scaled by 1/(1 + 1e-5)^2 -- kept, the warps depend on it."""
    q = query.flatten(2)
    s = source.flatten(2)
    q = q / (q.norm(dim=1, p=2, keepdim=True) + 1e-5)
    s = s / (s.norm(dim=1, p=2, keepdim=True) + 1e-5)
    return torch.bmm(q.transpose(1, 2), s).clamp(min=0)


def soft_warp(values: torch.Tensor, corr: torch.Tensor, tau: float, out_hw: Tuple[int, int]) -> torch.Tensor:
    """Eq. 6: ``out(u) = sum_v softmax_v(corr(u, v) / tau) values(v)``; values live on the source grid."""
    b, c = values.shape[:2]
    attn = F.softmax(corr / tau, dim=-1)  # (B, Nq, Ns)
    out = torch.matmul(attn, values.reshape(b, c, -1).permute(0, 2, 1))  # (B, Nq, C)
    return out.permute(0, 2, 1).reshape(b, c, *out_hw)


def warp_back(values: torch.Tensor, corr: torch.Tensor, tau: float, out_hw: Tuple[int, int]) -> torch.Tensor:
    """The reverse warp with the transposed correlation (query grid -> source grid), for the cycle
    loss: ``out(v) = sum_u softmax_u(corr(u, v) / tau) values(u)`` (official ``corr.permute``)."""
    return soft_warp(values, corr.transpose(1, 2), tau, out_hw)


# ---- confidence mask --------------------------------------------------------------------------------
def coordinate_grid(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(h*w, 2)`` pixel positions as (x, y) in [-1, 1], corners at -1/1 (``align_corners=True``)."""
    ys = torch.linspace(-1, 1, h, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, w, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(-1, 2)


@dataclass
class Flow:
    """``get_flow``: soft-argmax maps and flows, each ``(B, H, W, 2)`` as (x, y) in [-1, 1].
    ``map_fwd`` (official ``map_trg``): for each query pixel its expected source position;
    ``map_bwd`` (``map_src``): for each source pixel its expected query position; the flows are
    the maps minus the pixel's own position."""

    map_fwd: torch.Tensor
    map_bwd: torch.Tensor
    flow_fwd: torch.Tensor
    flow_bwd: torch.Tensor


def soft_argmax_flow(corr: torch.Tensor, q_hw: Tuple[int, int], s_hw: Tuple[int, int], tau: float) -> Flow:
    """The official ``get_flow(corr, temp)``: softmax over the source positions (forward) and over
    the query positions (backward), then the expected grid position."""
    b = corr.shape[0]
    grid_q = coordinate_grid(*q_hw, device=corr.device, dtype=corr.dtype)
    grid_s = coordinate_grid(*s_hw, device=corr.device, dtype=corr.dtype)
    map_fwd = torch.matmul(F.softmax(corr / tau, dim=-1), grid_s).reshape(b, *q_hw, 2)
    map_bwd = torch.matmul(F.softmax(corr / tau, dim=1).transpose(1, 2), grid_q).reshape(b, *s_hw, 2)
    return Flow(map_fwd, map_bwd, map_fwd - grid_q.reshape(*q_hw, 2), map_bwd - grid_s.reshape(*s_hw, 2))


def _sample(field: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """``field`` ``(B, H, W, 2)`` sampled bilinearly at positions ``at`` ``(B, h, w, 2)``."""
    out = F.grid_sample(field.permute(0, 3, 1, 2), grid=at, mode="bilinear", align_corners=True)
    return out.permute(0, 2, 3, 1)


def fbcheck(flow: Flow) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official ``fbcheck``: ``|flow_fwd(map_fwd(u)) + flow_fwd(u)|`` per query pixel (and the
    same for the backward side), ``(B, H, W)`` each.

    It samples the *forward* flow at the forward position, where a forward-backward check samples
    the backward flow (``cycle_error``): a pure translation by d comes out as |2d|, not 0 -- on a
    3-pixel shift of an 8x8 map it keeps 25 % of the pixels. MIDMs' released weights were trained
    (and its numbers measured) with it, so it is the default (``mask_check="fbcheck"``)."""
    ts = _sample(flow.flow_fwd, flow.map_fwd)
    st = _sample(flow.flow_bwd, flow.map_bwd)
    return (ts + flow.flow_fwd).pow(2).sum(-1).pow(0.5), (st + flow.flow_bwd).pow(2).sum(-1).pow(0.5)


def cycle_error(flow: Flow) -> torch.Tensor:
    """The paper's forward-backward cycle (Eq. 10) per query pixel ``(B, H, W)``: the backward
    flow sampled at the forward position plus the forward flow, i.e. ``|psi_bwd(psi_fwd(u)) - u|``
    (``mask_check="cycle"``; the paper writes a squared norm, the threshold is the official one)."""
    return (_sample(flow.flow_bwd, flow.map_fwd) + flow.flow_fwd).pow(2).sum(-1).pow(0.5)


MASK_CHECKS = ("fbcheck", "cycle")


@dataclass
class ConfidenceMask:
    mask: torch.Tensor  # (B, 1, Hq, Wq) in {0, 1}, after the majority vote
    raw: torch.Tensor  # (B, 1, Hq, Wq): error < gamma, before the vote
    error: torch.Tensor  # (B, Hq, Wq): the checked error
    flow: Flow


def confidence_mask(corr: torch.Tensor, q_hw: Tuple[int, int], s_hw: Tuple[int, int], tau: float,
                    gamma: float = 0.5, check: str = "fbcheck", majority_pool: bool = True) -> ConfidenceMask:
    """1 where the forward-backward error is below ``gamma`` (normalised [-1, 1] units; official
    0.5), then the official clean-up (``majority_pool``): 2x2 average, nearest x2 upsampling, > 0.5
    -- a 2x2 cell stays confident when at least 3 of its pixels are. Detached, as official."""
    if check not in MASK_CHECKS:
        raise ValueError(f"midms: mask_check must be one of {MASK_CHECKS}, got {check!r}")
    flow = soft_argmax_flow(corr, q_hw, s_hw, tau)
    error = fbcheck(flow)[0] if check == "fbcheck" else cycle_error(flow)
    raw = (error.unsqueeze(1) < gamma).to(corr.dtype)
    mask = raw
    if majority_pool and min(q_hw) >= 2:
        pooled = F.avg_pool2d(raw, 2, ceil_mode=True)
        mask = (F.interpolate(pooled, size=q_hw, mode="nearest") > 0.5).to(corr.dtype)
    return ConfidenceMask(mask.detach(), raw.detach(), error.detach(), flow)
