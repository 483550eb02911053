"""Hierarchical GRU-assisted PatchMatch (CoCosNet v2, Sec. 3.2, Eq. 3-8), as the official
``NoVGGHPMCorrespondence.multi_scale_patch_match`` + ``PatchMatchGRU`` compute it.

Representation. At a level of size H x W the nearest-neighbour field is an *offset* field
``off`` of shape ``(B, 2, K, H, W)``: ``off[:, 0]`` = row offsets (official ``offset_x``),
``off[:, 1]`` = column offsets (``offset_y``), for K = 16 candidates per pixel. Offsets are not
clamped: a position is clamped only where it is read (official ``offset_to_inds``). Flattened,
``off.flatten(1, 2)`` is the official flow layout [K rows, K columns] the ConvGRU sees.

Per level (official):

* coarsest level: dense matching ``softmax(theta^T phi / T)`` over all exemplar positions (the
  official level 0; appendix B: "all the pair-wise similarities on this scale");
* finer levels: K = window^2 candidates ``2 o + d`` (d in {-2, 0, 2, 4} per axis: window 4,
  dilation 2, centering 1), nearest-upsampled from the coarser level's *first* candidate (its
  argmax at the dense level), no clamping, no gradient; then ``iterations`` x [propagation and
  evaluation in both directions, in an order drawn with p = 0.5 (python ``random.random()``) ->
  ConvGRU refinement of the offsets]; then the soft warp of Eq. 8 over the K candidates.
* evaluation (official ``Evaluate``): the 3K propagated candidates are scored ``f^x . f^y / T``,
  softmax over the 3K, the top K kept (best first); the kept softmax values are the scores S_t
  the ConvGRU sees. The candidates are read at ``long(clamp(row) * W + clamp(col))``: after the
  GRU's fractional update a fractional row leaks into the column (kept: it is what the released
  weights were trained with).

Refinement variants (Table 5): ``propagation`` (no learned refinement), ``gru`` (ConvGRU, no
propagation: the K candidates are only re-scored and sorted), ``propagation+conv`` (memory-less
convolutions in place of the GRU), ``propagation+gru`` (the paper's and official model).

Gradients (``refine_grad``): ``official_nograd`` (default, the official code): candidates become
integer indices under ``no_grad``, so the warp's gradient reaches the features only through the
final matching scores and the GRU gets none. ``differentiable`` (the paper: "fully
differentiable"): positions stay continuous (clamped, never truncated), features and the exemplar
are read bilinearly, and the warp's gradient flows through the positions into every GRU update.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from methods.common.correspondence import centre_normalize

REFINEMENTS = ("propagation", "gru", "propagation+conv", "propagation+gru")
REFINE_GRADS = ("official_nograd", "differentiable")
# Scores S_t fed to the refinement: the official softmax over the 3K candidates (kept top K), or
# the paper's cosine (Eq. 7).
GRU_SCORES = ("softmax", "cosine")
# Initial GRU state: "features" (official: h_0 = initial_layer(f^x, f^y)) or "zero" (the paper:
# h_0 = 0, and f^x, f^y enter x_t at every step instead).
HIDDEN_INITS = ("features", "zero")
# Official ``match_kernel_and_pono_c`` / ``util.feature_normalize`` epsilon of CoCosNet v2.
MATCH_EPS = 1e-10
# Upper bound on elements of one gathered block (pixels x candidates x channels): the scoring is
# done in pixel chunks so its memory stays O(H W K) instead of O(H W K C).
_BLOCK_ELEMS = 1 << 21


def normalize_pono_c(x: torch.Tensor) -> torch.Tensor:
    """Official ``match_kernel_and_pono_c`` with match_kernel 1 and --PONO_C: centre each pixel's
    vector over channels, then L2-normalise it (+1e-10)."""
    return centre_normalize(x.flatten(2), "channel", eps=MATCH_EPS).view_as(x)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
def pixel_grid(h: int, w: int, device, dtype) -> torch.Tensor:
    """(1, 2, 1, H, W): each pixel's own (row, col) (official ``batch_meshgrid``, square maps)."""
    rows = torch.arange(h, device=device, dtype=dtype).view(h, 1).expand(h, w)
    cols = torch.arange(w, device=device, dtype=dtype).view(1, w).expand(h, w)
    return torch.stack([rows, cols]).view(1, 2, 1, h, w)


def clamped_positions(off: torch.Tensor) -> torch.Tensor:
    """Where ``off`` (B, 2, K, H, W) points, clamped into the map, per axis (differentiable)."""
    h, w = off.shape[-2:]
    pos = pixel_grid(h, w, off.device, off.dtype) + off
    return torch.stack([pos[:, 0].clamp(0, h - 1), pos[:, 1].clamp(0, w - 1)], dim=1)


def official_indices(off: torch.Tensor) -> torch.Tensor:
    """Official ``offset_to_inds`` + ``.long()``: ``long(clamp(row) * W + clamp(col))`` ->
    (B, K, H, W) flat indices. Truncation: a fractional row leaks into the column."""
    pos = clamped_positions(off)
    return (pos[:, 0] * off.shape[-1] + pos[:, 1]).long()


def index_offsets(idx: torch.Tensor, dtype) -> torch.Tensor:
    """Official ``inds_to_offset``: flat indices (B, K, H, W) -> integer offsets (B, 2, K, H, W)."""
    h, w = idx.shape[-2:]
    pos = torch.stack([torch.div(idx, w, rounding_mode="floor"), idx % w], dim=1).to(dtype)
    return pos - pixel_grid(h, w, idx.device, dtype)


def initial_offsets(seed: torch.Tensor, window: int, dilation: int, centering: int, dtype) -> torch.Tensor:
    """The finer level's candidates from the coarser level's chosen match (official, no_grad).

    ``seed`` (B, h, w) flat indices at the coarse level -> (B, 2, window^2, 2h, 2w) offsets
    ``2 o + (dr, dc)``, d in ``(arange(window) - centering) * dilation`` ({-2, 0, 2, 4}: the
    official asymmetric window; rows vary slowest), nearest-upsampled x2, not clamped.
    """
    d = (torch.arange(window, device=seed.device) - centering) * dilation
    delta = torch.stack([d.repeat_interleave(window), d.repeat(window)]).to(dtype)
    off = 2 * index_offsets(seed.unsqueeze(1), dtype) + delta.view(1, 2, window * window, 1, 1)
    return off.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)


def propagate(off: torch.Tensor, direction: str) -> torch.Tensor:
    """Eq. 5's propagation (official ``PropagationFaster``): each pixel also tries the offsets of
    its two neighbours along ``direction``; beyond the border the neighbour's offset is 0.
    (B, 2, K, H, W) -> (B, 2, 3K, H, W), candidates ordered (previous, own, next neighbour)."""
    if direction == "horizontal":
        zero = off.new_zeros(off.shape[:-1] + (1,))
        before, after = torch.cat([zero, off[..., :-1]], dim=-1), torch.cat([off[..., 1:], zero], dim=-1)
    elif direction == "vertical":
        zero = off.new_zeros(off.shape[:-2] + (1, off.shape[-1]))
        before, after = torch.cat([zero, off[..., :-1, :]], dim=-2), torch.cat([off[..., 1:, :], zero], dim=-2)
    else:
        raise ValueError(f"direction must be 'horizontal' or 'vertical', got {direction!r}")
    return torch.cat([before, off, after], dim=2)


# ---------------------------------------------------------------------------------------------
# Reading features and the exemplar at candidates
# ---------------------------------------------------------------------------------------------
class IndexedReader:
    """Official reading at integer indices: rows of channels-last maps, gathered in pixel chunks.

    Values equal the official ``right_features_view[:, idx]`` products; only the gather layout
    differs (a C-vector per index instead of one channel plane per candidate), which is ~10x
    faster on CPU. Differentiable in the features and the image.
    """

    def __init__(self, fx: torch.Tensor, fy: torch.Tensor, temperature: float):
        b, c, h, w = fx.shape
        self.shape, self.temperature = (b, c, h, w), temperature
        self.fx_rows = fx.flatten(2).transpose(1, 2).contiguous()  # (B, HW, C)
        self.fy_rows = fy.flatten(2).transpose(1, 2).reshape(b * h * w, c)  # (B HW, C)
        self.base = (torch.arange(b, device=fx.device) * (h * w)).view(b, 1, 1)

    def flat(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) indices -> (B, HW, K), the official ``matching_inds`` layout."""
        return idx.flatten(2).transpose(1, 2)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """``f^x(p) . f^y(idx) / T`` for idx (B, HW, K) -> (B, HW, K)."""
        b, c, h, w = self.shape
        k = idx.shape[-1]
        step = max(1, _BLOCK_ELEMS // (k * c))
        out = []
        for s in range(0, h * w, step):
            sel = F.embedding(idx[:, s:s + step] + self.base, self.fy_rows)  # (B, n, K, C)
            out.append(torch.einsum("bnkc,bnc->bnk", sel, self.fx_rows[:, s:s + step]))
        return torch.cat(out, dim=1) / self.temperature

    def warp(self, image: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Eq. 8 at indices: ``sum_k weights_k * image(idx_k)`` (official ``PatchMatchGRU``)."""
        b, ci, h, w = image.shape
        rows = image.flatten(2).transpose(1, 2).reshape(b * h * w, ci)
        sel = F.embedding(idx + self.base, rows)  # (B, HW, K, Ci)
        out = (sel * weights.unsqueeze(-1)).sum(dim=2)
        return out.transpose(1, 2).reshape(b, ci, h, w)


def sample_at(src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Read ``src`` (B, C, H, W) bilinearly at positions ``pos`` (B, 2, K, H', W') ->
    (B, C, K, H', W'); exact at integer positions, differentiable in ``src`` and ``pos``."""
    b, c, hs, ws = src.shape
    k, h, w = pos.shape[2:]
    gy = pos[:, 0] * (2.0 / max(hs - 1, 1)) - 1.0
    gx = pos[:, 1] * (2.0 / max(ws - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1).reshape(b, k * h, w, 2)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(b, c, k, h, w)


class BilinearReader:
    """The differentiable variant: continuous clamped positions, bilinear reads, cosine scores
    (a bilinearly interpolated f^y is renormalised so the score stays a cosine)."""

    def __init__(self, fx: torch.Tensor, fy: torch.Tensor, temperature: float):
        self.fx, self.fy, self.temperature = fx, fy, temperature

    def flat(self, pos: torch.Tensor) -> torch.Tensor:
        return pos

    def logits(self, pos: torch.Tensor) -> torch.Tensor:
        """Cosine / T of every candidate at positions (B, 2, K, H, W) -> (B, HW, K)."""
        c, hw = self.fx.shape[1], self.fx.shape[2] * self.fx.shape[3]
        k = pos.shape[2]
        step = max(1, min(k, _BLOCK_ELEMS // max(1, c * hw)))
        out = []
        for k0 in range(0, k, step):
            s = sample_at(self.fy, pos[:, :, k0:k0 + step])
            dot = (s * self.fx.unsqueeze(2)).sum(dim=1)
            out.append(dot / s.pow(2).sum(dim=1).clamp_min(1e-12).sqrt())
        return torch.cat(out, dim=1).flatten(2).transpose(1, 2) / self.temperature

    def warp(self, image: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        b, _, h, w = self.fx.shape
        wts = weights.transpose(1, 2).reshape(b, 1, -1, h, w)
        return (sample_at(image, pos) * wts).sum(dim=2)


# ---------------------------------------------------------------------------------------------
# Learned refinement (official ``convgru.py``: BasicMotionEncoder, SepConvGRU, FlowHead)
# ---------------------------------------------------------------------------------------------
class MotionEncoder(nn.Module):
    """Official ``BasicMotionEncoder``: scores S_t (K ch) and offsets O_t (2K ch) -> motion
    features, concatenated with the offsets (64 ch at the official widths)."""

    def __init__(self, k: int, ch: int, out: int):
        super().__init__()
        self.convc1 = nn.Conv2d(k, ch, 1)
        self.convc2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.convf1 = nn.Conv2d(2 * k, ch, 7, padding=3)
        self.convf2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv = nn.Conv2d(2 * ch, out, 3, padding=1)

    def forward(self, flow: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        cor = F.relu(self.convc2(F.relu(self.convc1(score))))
        flo = F.relu(self.convf2(F.relu(self.convf1(flow))))
        return torch.cat([F.relu(self.conv(torch.cat([cor, flo], dim=1))), flow], dim=1)


class SepConvGRU(nn.Module):
    """Eq. 6 with separable 1x5 then 5x1 convolutions (official/RAFT SepConvGRU)."""

    def __init__(self, hidden: int, inp: int):
        super().__init__()
        c = hidden + inp
        self.convz1 = nn.Conv2d(c, hidden, (1, 5), padding=(0, 2))
        self.convr1 = nn.Conv2d(c, hidden, (1, 5), padding=(0, 2))
        self.convq1 = nn.Conv2d(c, hidden, (1, 5), padding=(0, 2))
        self.convz2 = nn.Conv2d(c, hidden, (5, 1), padding=(2, 0))
        self.convr2 = nn.Conv2d(c, hidden, (5, 1), padding=(2, 0))
        self.convq2 = nn.Conv2d(c, hidden, (5, 1), padding=(2, 0))

    def forward(self, h: torch.Tensor, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        for cz, cr, cq in ((self.convz1, self.convr1, self.convq1), (self.convz2, self.convr2, self.convq2)):
            hx = torch.cat([h, x], dim=1)
            z = torch.sigmoid(cz(hx))
            r = torch.sigmoid(cr(hx))
            q = torch.tanh(cq(torch.cat([r * h, x], dim=1)))
            h = (1 - z) * h + z * q
        return h


class ConvBlock(nn.Module):
    """Table 5's "propagation + conv": the GRU's separable convolutions without gates and without
    memory: each step sees the level's initial state h_0 and x_t, never the previous step."""

    def __init__(self, hidden: int, inp: int):
        super().__init__()
        self.conv1 = nn.Conv2d(hidden + inp, hidden, (1, 5), padding=(0, 2))
        self.conv2 = nn.Conv2d(hidden, hidden, (5, 1), padding=(2, 0))

    def forward(self, h: torch.Tensor, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv2(torch.tanh(self.conv1(torch.cat([h0, x], dim=1)))))


class FlowHead(nn.Module):
    """Two convolutions from the hidden state to the offset update [K rows, K columns]."""

    def __init__(self, hidden: int, ch: int, k: int):
        super().__init__()
        self.conv1 = nn.Conv2d(hidden, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, 2 * k, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(h)))


class Refiner(nn.Module):
    """One refinement step (Eq. 6-7; official ``PatchMatchGRU.initial_layer`` + ``BasicUpdateBlock``).

    ``initial_layer`` encodes (f^x, f^y) once per level. Official (``hidden_init="features"``):
    that is h_0 and x_t = motion(O_t, S_t) (64 ch; the GRU convs take 32 + 64 = 96). Paper
    (``"zero"``): h_0 = 0 and x_t = [motion(O_t, S_t), initial_layer(f^x, f^y)], so the features
    still reach the GRU ("x_t ... concatenating features extracted from f^x, f^y, O_t, S_t").
    """

    def __init__(self, feat_ch: int, k: int, hidden: int, motion_ch: int, kind: str, hidden_init: str):
        super().__init__()
        if hidden_init not in HIDDEN_INITS:
            raise ValueError(f"gru_hidden_init must be one of {HIDDEN_INITS}, got {hidden_init!r}")
        self.kind, self.hidden_init = kind, hidden_init
        self.initial_layer = nn.Sequential(
            nn.Conv2d(2 * feat_ch, hidden, 3, padding=1), nn.InstanceNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.InstanceNorm2d(hidden), nn.ReLU())
        motion_out = max(motion_ch - 2 * k, 8)  # official: 64 - 2 * 16 = 32
        self.encoder = MotionEncoder(k, motion_ch, motion_out)
        inp = motion_out + 2 * k + (hidden if hidden_init == "zero" else 0)
        self.cell = SepConvGRU(hidden, inp) if kind == "gru" else ConvBlock(hidden, inp)
        self.flow_head = FlowHead(hidden, motion_ch, k)

    def start(self, fx: torch.Tensor, fy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(h_0, the encoded features) of a level."""
        feats = self.initial_layer(torch.cat([fx, fy], dim=1))
        return (feats if self.hidden_init == "features" else torch.zeros_like(feats)), feats

    def forward(self, h, h0, feats, flow, score) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.encoder(flow, score)
        if self.hidden_init == "zero":
            x = torch.cat([x, feats], dim=1)
        h = self.cell(h, x, h0)
        return h, self.flow_head(h)


# ---------------------------------------------------------------------------------------------
# The hierarchy
# ---------------------------------------------------------------------------------------------
@dataclass
class LevelResult:
    size: int
    inds: torch.Tensor  # (B, K, H, W) official flat indices of the candidates, best first (K = 1: dense argmax)
    warp: torch.Tensor  # (B, C, H, W) soft-warped exemplar (Eq. 8)
    offsets: Optional[torch.Tensor] = None  # (B, 2, K, H, W) final offsets (fractional after the GRU)
    cycle: Optional[torch.Tensor] = None  # dense level only: warp warped back (official warp_cycle)


class HierarchicalPatchMatch(nn.Module):
    """Dense matching at the coarsest level, GRU-assisted PatchMatch at every finer level.

    One refinement network is shared by all PatchMatch levels (official: one ``PatchMatchGRU``).
    ``order_source`` draws the propagation order of each iteration (official ``random.random()``;
    a parity run injects recorded draws). ``trace``, when a dict, receives the intermediate
    tensors under the official fixture names (``level1/iter0/pm_offset_x``, ...). ``stats``
    counts what ran, so tests and ablations can check which steps an option switches on.
    """

    def __init__(self, feat_ch: int, *, k_window: int = 4, dilation: int = 2, centering: int = 1,
                 iterations: int = 5, temperature: float = 0.01, refinement: str = "propagation+gru",
                 refine_grad: str = "official_nograd", hidden: int = 32, motion_ch: int = 64,
                 hidden_init: str = "features", gru_score: str = "softmax", grad_checkpoint: bool = False):
        super().__init__()
        if refinement not in REFINEMENTS:
            raise ValueError(f"refinement must be one of {REFINEMENTS}, got {refinement!r}")
        if refine_grad not in REFINE_GRADS:
            raise ValueError(f"refine_grad must be one of {REFINE_GRADS}, got {refine_grad!r}")
        if gru_score not in GRU_SCORES:
            raise ValueError(f"gru_score must be one of {GRU_SCORES}, got {gru_score!r}")
        if iterations < 1 or k_window < 1:
            raise ValueError("iterations and candidate window must be >= 1")
        self.k = k_window * k_window
        self.window, self.dilation, self.centering = k_window, dilation, centering
        self.iterations, self.temperature = iterations, temperature
        self.refinement, self.refine_grad, self.gru_score = refinement, refine_grad, gru_score
        self.differentiable = refine_grad == "differentiable"
        # Recompute each iteration in the backward pass (differentiable mode, training only): the
        # same values and gradients, with the activation memory of one iteration instead of all.
        self.grad_checkpoint = grad_checkpoint
        self.use_propagation = refinement.startswith("propagation")
        kind = {"gru": "gru", "propagation+gru": "gru", "propagation+conv": "conv"}.get(refinement)
        self.refiner = Refiner(feat_ch, self.k, hidden, motion_ch, kind, hidden_init) if kind else None
        self.order_source: Optional[Callable[[], float]] = None  # None: python's random.random()
        self.trace: Optional[Dict[str, torch.Tensor]] = None
        self.stats: Counter = Counter()

    def _record(self, name: str, value: torch.Tensor) -> None:
        if self.trace is not None:
            self.trace[name] = value.detach()

    # -- coarsest level ---------------------------------------------------------------------
    def dense(self, fx: torch.Tensor, fy: torch.Tensor, image: torch.Tensor, cycle: bool) -> LevelResult:
        self.stats["dense"] += 1
        b, c, h, w = fx.shape
        logits = torch.matmul(fx.flatten(2).transpose(1, 2), fy.flatten(2)) / self.temperature  # (B, N, N)
        mat = F.softmax(logits, dim=-1)
        warp = torch.matmul(mat, image.flatten(2).transpose(1, 2))  # (B, N, C)
        cyc = None
        if cycle:  # official warp_cycle: the warp warped back with the transposed matching
            cyc = torch.matmul(F.softmax(logits.transpose(1, 2), dim=-1), warp)
            cyc = cyc.transpose(1, 2).reshape(b, image.shape[1], h, w)
            self._record("level0/warp_cycle", cyc)
        warp = warp.transpose(1, 2).reshape(b, image.shape[1], h, w)
        with torch.no_grad():  # official: topk(mat, 1) seeds the next level
            best = mat.topk(1, dim=-1).indices.transpose(1, 2).reshape(b, 1, h, w)
        self._record("level0/mat", mat)
        self._record("level0/warp", warp)
        return LevelResult(h, best, warp, cycle=cyc)

    # -- one PatchMatch level -----------------------------------------------------------------
    def _read(self, reader, off: torch.Tensor) -> torch.Tensor:
        """What ``reader`` reads at: official indices, or continuous clamped positions."""
        return clamped_positions(off) if self.differentiable else reader.flat(official_indices(off))

    def _evaluate(self, reader, cand: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Official ``Evaluate``: softmax over the candidates of ``cand`` (B, 2, Kc, H, W), keep
        the best K. Returns (kept offsets (B, 2, K, H, W), scores S_t (B, K, H, W))."""
        b, _, kc, h, w = cand.shape
        where = self._read(reader, cand)
        logits = reader.logits(where)  # (B, HW, Kc)
        prob = F.softmax(logits, dim=-1)
        top, which = prob.topk(self.k, dim=-1)
        if self.differentiable:
            idx = which.transpose(1, 2).reshape(b, 1, self.k, h, w).expand(b, 2, self.k, h, w)
            kept = torch.gather(where, 2, idx) - pixel_grid(h, w, cand.device, cand.dtype)
        else:
            kept = index_offsets(torch.gather(where, -1, which).transpose(1, 2).reshape(b, self.k, h, w),
                                 cand.dtype)
        score = top if self.gru_score == "softmax" else torch.gather(logits, -1, which) * self.temperature
        return kept, score.transpose(1, 2).reshape(b, self.k, h, w)

    def _iteration(self, reader, h0, feats, off, hidden, order, name: str):
        """One PatchMatch iteration: propagation + evaluation (Eq. 5) then refinement (Eq. 6-7)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            if self.use_propagation:
                for direction in order:
                    off, score = self._evaluate(reader, propagate(off, direction))
            else:
                off, score = self._evaluate(reader, off)
            self._record(f"{name}/pm_offset_x", off[:, 0])
            self._record(f"{name}/pm_offset_y", off[:, 1])
            self._record(f"{name}/pm_score", score.flatten(2))
            if self.refiner is None:
                return off, hidden
            hidden, delta = self.refiner(hidden, h0, feats, off.flatten(1, 2), score)
            self._record(f"{name}/gru_hidden", hidden)
            self._record(f"{name}/gru_delta_x", delta[:, :self.k])
            self._record(f"{name}/gru_delta_y", delta[:, self.k:])
            return off + delta.view_as(off), hidden

    def patchmatch_level(self, fx: torch.Tensor, fy: torch.Tensor, image: torch.Tensor,
                         init: torch.Tensor, name: str = "level") -> LevelResult:
        """``init`` (B, 2, K, H, W): the initial offsets (``initial_offsets``)."""
        b, _, h, w = fx.shape
        reader = (BilinearReader if self.differentiable else IndexedReader)(fx, fy, self.temperature)
        off, hidden, h0, feats = init, None, None, None
        if self.refiner is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
                hidden, feats = self.refiner.start(fx, fy)
                h0 = hidden
            self._record(f"{name}/initial_hidden", feats)
        recompute = self.grad_checkpoint and torch.is_grad_enabled() and self.differentiable
        for it in range(self.iterations):
            order = ()
            if self.use_propagation:  # official PatchMatchOnce: horizontal first with p = 0.5
                draw = self.order_source() if self.order_source is not None else random.random()
                order = ("horizontal", "vertical") if draw < 0.5 else ("vertical", "horizontal")
                self.stats["propagate"] += len(order)
            self.stats["evaluate"] += max(1, len(order))
            if self.refiner is not None:
                self.stats["refine_" + self.refiner.kind] += 1
            args = (reader, h0, feats, off, hidden, order, f"{name}/iter{it}")
            if recompute:  # keep only each iteration's inputs; recompute its inside in backward
                off, hidden = checkpoint(self._iteration, *args, use_reentrant=False)
            else:
                off, hidden = self._iteration(*args)
        # Eq. 8 over the final K candidates (official: at their truncated indices)
        where = self._read(reader, off)
        weights = F.softmax(reader.logits(where), dim=-1)  # (B, HW, K)
        warp = reader.warp(image, where, weights)
        inds = official_indices(off.detach())
        self._record(f"{name}/matching_inds", inds)
        self._record(f"{name}/warp", warp)
        return LevelResult(h, inds, warp, offsets=off)

    def forward(self, fxs: List[torch.Tensor], fys: List[torch.Tensor], exemplar: torch.Tensor,
                cycle: bool = False) -> List[LevelResult]:
        """``fxs``/``fys``: normalised features per level, coarsest first; ``exemplar`` at full
        resolution, average-pooled to each level (official ``avg_pool2d(ref, scale)``)."""
        results: List[LevelResult] = []
        full = exemplar.shape[-1]
        for i, (fx, fy) in enumerate(zip(fxs, fys)):
            size = fx.shape[-1]
            img = F.avg_pool2d(exemplar, full // size) if size < full else exemplar
            if i == 0:
                results.append(self.dense(fx, fy, img, cycle))
                continue
            prev = results[-1]
            if (size, fx.shape[-2]) != (2 * prev.size, 2 * prev.inds.shape[-2]):
                raise ValueError(f"levels must double in size: {prev.size} -> {size}")
            # official: the coarser level's first candidate (best of its last evaluation + the
            # GRU's last update; at the dense level the argmax)
            init = initial_offsets(prev.inds[:, 0], self.window, self.dilation, self.centering, fx.dtype)
            results.append(self.patchmatch_level(fx, fy, img, init, name=f"level{i}"))
        return results
