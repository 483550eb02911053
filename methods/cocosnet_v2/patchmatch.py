"""Hierarchical GRU-assisted PatchMatch (CoCosNet v2, Sec. 3.2, Eq. 3-8).

Representation. At a level of size H x W, a nearest-neighbour field holds K candidate positions
per pixel: ``pos`` of shape ``(B, K, 2, H, W)`` with ``pos[:, k, 0]`` = row and ``pos[:, k, 1]`` =
column in the exemplar's feature map of the same level (pixel units). The offset of Eq. 7 is
``pos - grid``. Positions may be fractional (the GRU predicts continuous updates); features and
images are then read with bilinear interpolation, which for integer positions is an exact gather
(``sample_at``), so one code path serves integer PatchMatch and the differentiable refinement.

Per level (official ``multi_scale_patch_match``, reference/methods.md 1.2):

* coarsest level: dense matching, ``softmax(theta^T phi / T)`` over all exemplar positions
  (appendix B: "we calculate all the pair-wise similarities on this scale");
* finer levels: K = window^2 candidates initialised from the coarser best match
  (``2 * offset + d``, d in {-2, 0, 2, 4}, then nearest-upsampled; no gradient), then
  ``iterations`` x [propagation (Eq. 5) -> refinement (Eq. 6-7)], then the soft warp of Eq. 8
  over the K candidates, weighted by ``softmax(score / T)``.

Refinement variants (Table 5): ``propagation`` (no learned refinement), ``gru`` (ConvGRU, no
propagation), ``propagation+conv`` (a memory-less conv block in place of the GRU),
``propagation+gru`` (the paper's model).

Gradients (``refine_grad``): ``differentiable`` (the paper's claim) keeps the continuous
positions in the graph, so the warp's gradient reaches the positions and through them every
GRU parameter. ``official_nograd`` reproduces the official code: offsets are truncated to
integer indices (``x * W + y`` then ``.long()``, methods.md 7.5) under ``no_grad``, so the GRU
receives no gradient and only the features are trained through the matching scores.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

REFINEMENTS = ("propagation", "gru", "propagation+conv", "propagation+gru")
REFINE_GRADS = ("differentiable", "official_nograd")
# Upper bound on elements of one sampled block (C x k x H x W); bigger blocks are split over the
# candidate axis so memory stays O(H W) instead of O(C K H W) (matters at 256^2 and above).
_BLOCK_ELEMS = 1 << 21


# ---------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------
def pixel_grid(b: int, h: int, w: int, device, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, 2, H, W): each pixel's own (row, col)."""
    rows = torch.arange(h, device=device, dtype=dtype).view(h, 1).expand(h, w)
    cols = torch.arange(w, device=device, dtype=dtype).view(1, w).expand(h, w)
    return torch.stack([rows, cols]).view(1, 1, 2, h, w).expand(b, 1, 2, h, w)


def clamp_pos(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return torch.stack([pos[:, :, 0].clamp(0, h - 1), pos[:, :, 1].clamp(0, w - 1)], dim=2)


def truncate_to_index(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The official offsets-to-indices conversion (``ops.offset_to_inds`` + ``.long()``).

    ``idx = clamp(row) * W + clamp(col)`` in float, truncated; a fractional row therefore leaks
    into the column ("wraps"), as in the official code. Returns integer-valued float positions.
    """
    with torch.no_grad():
        p = clamp_pos(pos, h, w)
        idx = (p[:, :, 0] * w + p[:, :, 1]).long()
        return torch.stack([torch.div(idx, w, rounding_mode="floor"), idx % w], dim=2).to(pos.dtype)


def sample_at(src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Read ``src`` (B, C, Hs, Ws) at positions ``pos`` (B, K, 2, H, W) -> (B, C, K, H, W).

    Bilinear (exact at integer positions), border-clamped, differentiable in ``src`` and ``pos``.
    """
    b, c, hs, ws = src.shape
    k, h, w = pos.shape[1], pos.shape[3], pos.shape[4]
    gy = pos[:, :, 0] * (2.0 / max(hs - 1, 1)) - 1.0
    gx = pos[:, :, 1] * (2.0 / max(ws - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1).reshape(b, k * h, w, 2)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(b, c, k, h, w)


def _chunks(c: int, k: int, hw: int) -> int:
    return max(1, min(k, _BLOCK_ELEMS // max(1, c * hw)))


def candidate_scores(fx: torch.Tensor, fy: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Eq. 7's S: cosine of ``fx(p)`` and ``fy(pos_k(p))`` for every candidate -> (B, K, H, W).

    ``fx``/``fy`` are already unit-norm per pixel; a bilinearly interpolated ``fy`` is renormalised
    so the score stays a cosine. Computed in blocks of candidates (see ``_BLOCK_ELEMS``).
    """
    b, c, h, w = fx.shape
    k = pos.shape[1]
    step = _chunks(c, k, h * w)
    out = []
    for k0 in range(0, k, step):
        s = sample_at(fy, pos[:, k0:k0 + step])
        # Accumulating channel by channel is ~2x faster on CPU than (fx * s).sum(1) (reduction
        # over a non-inner dim) and never materialises the C x k x H x W product.
        dot = torch.zeros_like(s[:, 0])
        sq = torch.zeros_like(s[:, 0])
        for ci in range(c):
            sc = s[:, ci]
            dot = dot.addcmul(sc, fx[:, ci].unsqueeze(1))
            sq = sq.addcmul(sc, sc)
        out.append(dot / sq.clamp_min(1e-12).sqrt())
    return torch.cat(out, dim=1)


def soft_warp(image: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 8: ``sum_k weights_k(p) * image(pos_k(p))`` -> (B, C, H, W).

    ``weights`` (B, K, H, W) are used as given (the caller applies the softmax), so a one-hot
    weight is exactly a hard gather.
    """
    b, c = image.shape[:2]
    k, h, w = pos.shape[1], pos.shape[3], pos.shape[4]
    step = _chunks(c, k, h * w)
    out = None
    for k0 in range(0, k, step):
        s = sample_at(image, pos[:, k0:k0 + step])
        part = (s * weights[:, k0:k0 + step].unsqueeze(1)).sum(dim=2)
        out = part if out is None else out + part
    return out


def normalize_pono_c(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Official ``match_kernel_and_pono_c`` with match_kernel 1: centre each pixel's vector over
    channels, then L2-normalise it (eps 1e-10 as in the official code)."""
    x = x - x.mean(dim=1, keepdim=True)
    return x / (x.norm(dim=1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------------
# PatchMatch steps
# ---------------------------------------------------------------------------------------------
def init_candidates(best: torch.Tensor, fine_hw: Tuple[int, int], window: int, dilation: int,
                    centering: int) -> torch.Tensor:
    """Candidates at the finer level from the coarser best match (official, under no_grad).

    ``best`` (B, 2, h, w) -> (B, window^2, 2, 2h, 2w): coarse offset o = best - grid,
    fine offsets ``2 o + (dr, dc)`` with d in ``(arange(window) - centering) * dilation``
    ({-2, 0, 2, 4} by default, the official asymmetric window), nearest-upsampled x2.
    """
    with torch.no_grad():
        b, _, h, w = best.shape
        fh, fw = fine_hw
        if (fh, fw) != (2 * h, 2 * w):
            raise ValueError(f"levels must double in size: {h}x{w} -> {fh}x{fw}")
        off = best - pixel_grid(b, h, w, best.device, best.dtype)[:, 0]
        d = (torch.arange(window, device=best.device, dtype=best.dtype) - centering) * dilation
        dr = d.view(window, 1).expand(window, window).reshape(-1)
        dc = d.view(1, window).expand(window, window).reshape(-1)
        delta = torch.stack([dr, dc], dim=1).view(1, window * window, 2, 1, 1)
        cand = 2 * off.unsqueeze(1) + delta  # (B, K, 2, h, w) offsets at the fine scale
        kk = cand.shape[1]
        cand = F.interpolate(cand.reshape(b, kk * 2, h, w), scale_factor=2, mode="nearest")
        cand = cand.view(b, kk, 2, fh, fw) + pixel_grid(b, fh, fw, best.device, best.dtype)
        return clamp_pos(cand, fh, fw)


def propagate(pos: torch.Tensor, direction: str) -> torch.Tensor:
    """Eq. 5's propagation step (official ``PropagationFaster``): each pixel also tries the
    offsets of its two neighbours along ``direction``; border neighbours contribute a zero
    offset. (B, K, 2, H, W) -> (B, 3K, 2, H, W) candidate positions (neighbour, self, neighbour).
    """
    b, k, _, h, w = pos.shape
    grid = pixel_grid(b, h, w, pos.device, pos.dtype)
    off = pos - grid
    if direction == "horizontal":
        zero = off.new_zeros(b, k, 2, h, 1)
        before = torch.cat([zero, off[..., :-1]], dim=4)
        after = torch.cat([off[..., 1:], zero], dim=4)
    elif direction == "vertical":
        zero = off.new_zeros(b, k, 2, 1, w)
        before = torch.cat([zero, off[..., :-1, :]], dim=3)
        after = torch.cat([off[..., 1:, :], zero], dim=3)
    else:
        raise ValueError(f"direction must be 'horizontal' or 'vertical', got {direction!r}")
    return clamp_pos(torch.cat([before, off, after], dim=1) + grid, h, w)


def evaluate(fx: torch.Tensor, fy: torch.Tensor, cand: torch.Tensor, keep: int, with_scores: bool = True
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Score every candidate and keep the best ``keep`` (official ``Evaluate``: top 3K // 3).

    Returns (positions (B, keep, 2, H, W), cosine scores (B, keep, H, W) or None), best first.
    The ranking is discrete, so it runs without autograd; the kept positions are gathered from
    ``cand`` (differentiable) and, if asked, their scores are recomputed in the graph. This gives
    the same values and gradients as differentiating through all 3K scores, at 1/3 of the memory.
    """
    with torch.no_grad():
        scores = candidate_scores(fx, fy, cand)
        top, idx = scores.topk(keep, dim=1)
    b, _, h, w = scores.shape
    pos = torch.gather(cand, 1, idx.unsqueeze(2).expand(b, keep, 2, h, w))
    if not with_scores:
        return pos, None
    if torch.is_grad_enabled() and (fx.requires_grad or fy.requires_grad or pos.requires_grad):
        top = candidate_scores(fx, fy, pos)
    return pos, top


# ---------------------------------------------------------------------------------------------
# Learned refinement (official ``convgru.py``: BasicMotionEncoder, SepConvGRU, FlowHead)
# ---------------------------------------------------------------------------------------------
class MotionEncoder(nn.Module):
    """Encodes the current scores S_t (K ch) and offsets O_t (2K ch) (official BasicMotionEncoder,
    64-ch convs; the output is concatenated with the offsets as in the official code)."""

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

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for cz, cr, cq in ((self.convz1, self.convr1, self.convq1), (self.convz2, self.convr2, self.convq2)):
            hx = torch.cat([h, x], dim=1)
            z = torch.sigmoid(cz(hx))
            r = torch.sigmoid(cr(hx))
            q = torch.tanh(cq(torch.cat([r * h, x], dim=1)))
            h = (1 - z) * h + z * q
        return h


class ConvBlock(nn.Module):
    """Table 5's "propagation + conv": the same separable convolutions as the GRU but with no
    gates and no memory of earlier iterations (h_t depends on x_t only)."""

    def __init__(self, hidden: int, inp: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, hidden, (1, 5), padding=(0, 2))
        self.conv2 = nn.Conv2d(hidden, hidden, (5, 1), padding=(2, 0))

    def forward(self, h: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv2(torch.tanh(self.conv1(x))))


class FlowHead(nn.Module):
    """Two convolutions from the hidden state to the offset update Delta H (2K channels)."""

    def __init__(self, hidden: int, ch: int, k: int):
        super().__init__()
        self.conv1 = nn.Conv2d(hidden, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, 2 * k, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(h)))


class Refiner(nn.Module):
    """One refinement step: x_t from (f^x, f^y, O_t, S_t) (Eq. 6-7), recurrent cell, offset head.

    x_t = [motion(O_t, S_t), O_t, ctx], with ctx = conv(f^x, f^y) computed once per level (the
    official ``initial_layer``; the paper lists f^x and f^y among x_t's inputs, so it is fed at
    every step). The initial hidden state is 0 (paper) or ctx (official, ``hidden_init=features``).
    """

    def __init__(self, feat_ch: int, k: int, hidden: int, motion_ch: int, kind: str, hidden_init: str):
        super().__init__()
        if hidden_init not in ("zero", "features"):
            raise ValueError(f"gru_hidden_init must be 'zero' or 'features', got {hidden_init!r}")
        self.kind, self.hidden_init, self.hidden = kind, hidden_init, hidden
        self.context = nn.Sequential(
            nn.Conv2d(2 * feat_ch, hidden, 3, padding=1), nn.InstanceNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.InstanceNorm2d(hidden), nn.ReLU())
        motion_out = max(motion_ch - 2 * k, 8)  # official: 64 - 2*16 = 32
        self.motion = MotionEncoder(k, motion_ch, motion_out)
        inp = motion_out + 2 * k + hidden
        self.cell = SepConvGRU(hidden, inp) if kind == "gru" else ConvBlock(hidden, inp)
        self.head = FlowHead(hidden, motion_ch, k)

    def start(self, fx: torch.Tensor, fy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        ctx = self.context(torch.cat([fx, fy], dim=1))
        h = ctx if self.hidden_init == "features" else torch.zeros_like(ctx)
        return ctx, h

    def forward(self, h, ctx, offsets_norm, scores) -> Tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.motion(offsets_norm, scores), ctx], dim=1)
        h = self.cell(h, x)
        return h, self.head(h)


# ---------------------------------------------------------------------------------------------
# The hierarchy
# ---------------------------------------------------------------------------------------------
@dataclass
class LevelResult:
    size: int
    pos: torch.Tensor  # (B, K, 2, H, W) candidate positions (K = 1 at the dense level: its argmax)
    scores: torch.Tensor  # (B, K, H, W) cosine scores of the candidates
    warp: torch.Tensor  # (B, C, H, W) soft-warped exemplar (Eq. 8)
    cycle: Optional[torch.Tensor] = None  # dense level only: warp warped back (official warp_cycle)


class HierarchicalPatchMatch(nn.Module):
    """Dense matching at the coarsest level, GRU-assisted PatchMatch at every finer level.

    One refinement network is shared by all PatchMatch levels, as in the official code (a
    single ``PatchMatchGRU``); the features of every level have ``feat_ch`` channels.
    ``stats`` counts what ran (dense matches, propagations, evaluations, refinements) so tests
    and ablations can check which steps an option switches on.
    """

    def __init__(self, feat_ch: int, *, k_window: int = 4, dilation: int = 2, centering: int = 1,
                 iterations: int = 5, temperature: float = 0.01, refinement: str = "propagation+gru",
                 refine_grad: str = "differentiable", hidden: int = 32, motion_ch: int = 64,
                 hidden_init: str = "zero", grad_checkpoint: bool = False):
        super().__init__()
        # Recompute each iteration in the backward pass (differentiable mode, training only):
        # the same values and gradients, with activation memory of one iteration instead of all.
        self.grad_checkpoint = grad_checkpoint
        if refinement not in REFINEMENTS:
            raise ValueError(f"refinement must be one of {REFINEMENTS}, got {refinement!r}")
        if refine_grad not in REFINE_GRADS:
            raise ValueError(f"refine_grad must be one of {REFINE_GRADS}, got {refine_grad!r}")
        if iterations < 1 or k_window < 1:
            raise ValueError("iterations and candidate window must be >= 1")
        self.k = k_window * k_window
        self.window, self.dilation, self.centering = k_window, dilation, centering
        self.iterations, self.temperature = iterations, temperature
        self.refinement, self.refine_grad = refinement, refine_grad
        self.use_propagation = refinement.startswith("propagation")
        kind = {"gru": "gru", "propagation+gru": "gru", "propagation+conv": "conv"}.get(refinement)
        self.refiner = Refiner(feat_ch, self.k, hidden, motion_ch, kind, hidden_init) if kind else None
        self.stats: Counter = Counter()

    # -- coarsest level ---------------------------------------------------------------------
    def dense(self, fx: torch.Tensor, fy: torch.Tensor, image: torch.Tensor, cycle: bool) -> LevelResult:
        self.stats["dense"] += 1
        b, c, h, w = fx.shape
        logits = torch.bmm(fx.flatten(2).transpose(1, 2), fy.flatten(2)) / self.temperature  # (B, N, N)
        warp = torch.bmm(F.softmax(logits, dim=-1), image.flatten(2).transpose(1, 2))
        warp = warp.transpose(1, 2).reshape(b, image.shape[1], h, w)
        cyc = None
        if cycle:  # official warp_cycle: the warp warped back with the transposed matching
            cyc = torch.bmm(F.softmax(logits.transpose(1, 2), dim=-1), warp.flatten(2).transpose(1, 2))
            cyc = cyc.transpose(1, 2).reshape(b, image.shape[1], h, w)
        with torch.no_grad():
            best = logits.argmax(dim=-1)
            pos = torch.stack([torch.div(best, w, rounding_mode="floor"), best % w], dim=1).float()
            pos = pos.view(b, 1, 2, h, w)
        score = (logits.max(dim=-1).values * self.temperature).view(b, 1, h, w)
        return LevelResult(h, pos, score, warp, cyc)

    # -- one PatchMatch level -----------------------------------------------------------------
    def _iteration(self, fx, fy, ctx, grid, order, pos, hidden):
        """One PatchMatch iteration: propagation (Eq. 5) then refinement (Eq. 6-7)."""
        b, _, h, w = fx.shape
        nograd = self.refine_grad == "official_nograd"
        if self.use_propagation:
            for j, direction in enumerate(order):
                cand = propagate(pos, direction)
                last = j == len(order) - 1  # only the last evaluation's scores are used (S_t)
                with torch.set_grad_enabled(torch.is_grad_enabled() and not nograd):
                    pos, scores = evaluate(fx, fy, cand, self.k, with_scores=last)
        else:
            scores = candidate_scores(fx, fy, pos)
        if self.refiner is None:
            return pos, hidden
        offsets = (pos - grid) * (2.0 / max(h, w))  # resolution-free input for a shared refiner
        hidden, delta = self.refiner(hidden, ctx, offsets.flatten(1, 2), scores)
        pos = pos + delta.view(b, self.k, 2, h, w)  # pixel units, as the official offsets
        # official: indices by truncation under no_grad -> the refiner gets no gradient
        pos = truncate_to_index(pos, h, w) if nograd else clamp_pos(pos, h, w)
        return pos, hidden

    def patchmatch_level(self, fx: torch.Tensor, fy: torch.Tensor, image: torch.Tensor,
                         init: torch.Tensor) -> LevelResult:
        b, _, h, w = fx.shape
        pos, ctx, hidden = init, None, None
        if self.refiner is not None:
            ctx, hidden = self.refiner.start(fx, fy)
        grid = pixel_grid(b, h, w, fx.device, fx.dtype)
        recompute = self.grad_checkpoint and torch.is_grad_enabled() and self.refine_grad == "differentiable"
        for _ in range(self.iterations):
            # official PatchMatchOnce: horizontal-then-vertical or the reverse, with p = 0.5 each
            order = ("horizontal", "vertical") if torch.rand(()) < 0.5 else ("vertical", "horizontal")
            if self.use_propagation:
                self.stats["propagate"] += len(order)
                self.stats["evaluate"] += len(order)
            else:
                self.stats["evaluate"] += 1
            if self.refiner is not None:
                self.stats["refine_" + self.refiner.kind] += 1
            if recompute:  # keep only each iteration's inputs; recompute its inside in backward
                pos, hidden = checkpoint(self._iteration, fx, fy, ctx, grid, order, pos, hidden,
                                         use_reentrant=False)
            else:
                pos, hidden = self._iteration(fx, fy, ctx, grid, order, pos, hidden)
        final = candidate_scores(fx, fy, pos)
        weights = F.softmax(final / self.temperature, dim=1)
        warp = soft_warp(image, pos, weights)
        return LevelResult(h, pos, final, warp)

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
            with torch.no_grad():
                best_k = prev.scores.argmax(dim=1, keepdim=True)  # (B, 1, h, w)
                pb, _, _, ph, pw = prev.pos.shape
                best = torch.gather(prev.pos, 1, best_k.unsqueeze(2).expand(pb, 1, 2, ph, pw))[:, 0]
                best = best.round()  # the official code passes integer indices between levels
            init = init_candidates(best, (size, size), self.window, self.dilation, self.centering)
            results.append(self.patchmatch_level(fx, fy, img, init))
        return results
