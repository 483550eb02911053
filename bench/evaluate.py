"""Evaluation of a trained method: the first ``num_samples`` of the eval split, every selected metric.

Metrics are built before training starts (``build_metrics``), so a missing weights file or an
unsupported metric fails a trial at step 0, not after hours of training.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from bench.metrics import METRICS
from bench.metrics.base import Metric, MetricContext, to_uint8_hwc
from datasets.base import DataInfo
from methods.base import ExemplarMethod, MethodOutput

EXEMPLAR_KEYS = ("exemplar", "exemplar_cond", "exemplar_label")


def select_metrics(names: List[str], data: DataInfo, has_warp: bool) -> Tuple[List[str], Dict[str, str]]:
    """Resolve ``eval.metrics`` (``all`` = every registered metric) -> (names, skipped name -> reason).

    A metric the trial cannot compute (no label map for semantic consistency, no warp from SPADE) is
    skipped, not an error: a sweep lists its table's metrics once for methods and datasets that
    support different subsets. The preflight says up front which trial skips what (and fails a
    sweep where a listed metric applies to no trial); the run records it (tag bench.metrics_unsupported).
    """
    skipped: Dict[str, str] = {}
    chosen = []
    for name in (METRICS.names() if "all" in names else names):
        reason = METRICS.get(name).unsupported_reason(data, has_warp)
        if reason:
            skipped[name] = reason
        else:
            chosen.append(name)
    return chosen, skipped


def build_metrics(names: List[str], ctx: MetricContext) -> Dict[str, Metric]:
    return {name: METRICS.get(name)(ctx) for name in names}


def roll_exemplars(batch: Dict[str, torch.Tensor], k: int) -> Dict[str, torch.Tensor]:
    """The same inputs with the exemplar of the sample k positions away (a different exemplar)."""
    out = dict(batch)
    for key in EXEMPLAR_KEYS:
        if key in batch:
            out[key] = torch.roll(batch[key], k, dims=0)
    out.pop("target", None)  # the exact target belongs to the original exemplar
    return out


@torch.no_grad()
def evaluate(method: ExemplarMethod, loader, metrics: Dict[str, Metric], device: torch.device,
             grid_samples: int = 6, progress=None, writer=None) -> Tuple[Dict[str, float], Optional[tuple]]:
    """Run every metric over the loader; returns (metric values, (grid batch, grid output)).

    ``writer`` (``bench.outputs.OutputWriter``): saves each batch's images and hands back the output
    the metrics score (the file's, when it reads them back)."""
    was_training = method.training
    method.eval()
    # Metrics that need outputs for other exemplars (LPIPS diversity) get them in a second pass:
    # generating them between a batch's output and the next batch's would move a method's noise
    # stream (SPADE's sampled z, diffusion noise), so every other metric's number would depend on
    # whether a diversity metric was asked for (measured: SPADE-VAE L1 37.22 with, 37.51 without).
    single = {n: m for n, m in metrics.items() if m.exemplars_per_input <= 1}
    multi = {n: m for n, m in metrics.items() if m.exemplars_per_input > 1}
    memos = list({id(m.ctx.memo): m.ctx.memo for m in metrics.values()}.values())
    grid = None
    seen = 0
    exemplar_l1: List[float] = []  # the copy-collapse diagnostic (collapse_warnings)
    for batch in loader:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out: MethodOutput = method.generate(batch)
        if writer is not None:
            out = writer(batch, out)
        for m in single.values():
            m.update(batch, out)
        if "exemplar" in batch and batch["exemplar"].shape == out.output.shape:
            diff = to_uint8_hwc(out.output).astype(np.float32) - to_uint8_hwc(batch["exemplar"]).astype(np.float32)
            exemplar_l1 += np.abs(diff).reshape(diff.shape[0], -1).mean(axis=1).tolist()
        for memo in memos:  # features shared by the metrics for this batch (EvalMemo) are dropped
            memo.end_batch()
        if grid is None:
            n = min(grid_samples, batch["cond"].shape[0])
            grid = ({k: v[:n].cpu() for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 4},
                    MethodOutput(out.output[:n].cpu(), {l: w[:n].cpu() for l, w in out.warps.items()}))
        seen += batch["cond"].shape[0]
        if progress:
            progress(seen)
    if multi:
        method.eval()  # a method that restarts its evaluation noise on eval() does so here too
        k_max = max(m.exemplars_per_input for m in multi.values())
        for batch in loader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            outs = [method.generate(batch)] + [method.generate(roll_exemplars(batch, k)) for k in range(1, k_max)]
            for m in multi.values():
                m.update_multi(batch, outs[: m.exemplars_per_input])
            for memo in memos:
                memo.end_batch()
    values: Dict[str, float] = {}
    for m in metrics.values():
        values.update(m.compute())
    if exemplar_l1:
        values["exemplar_l1"] = float(np.mean(exemplar_l1))
    method.train(was_training)
    return values, grid


# A model can score plausibly and still be degenerate; these catch the two collapses exemplar-based
# translation is known for. Thresholds are far below what any working model shows: L1 in 0-255 units
# per pixel (a copy differs from its exemplar by JPEG-level noise at most), LPIPS diversity ~0 means
# the outputs do not change when the exemplar does.
COPY_L1 = 1.0
MIN_DIVERSITY = 0.005


def collapse_warnings(values: Dict[str, float]) -> List[str]:
    """Reasons a trial's outputs look collapsed (empty: none), from its evaluation values."""
    out = []
    if values.get("exemplar_l1", COPY_L1) < COPY_L1:
        out.append(f"outputs copy the exemplar (mean L1 to it {values['exemplar_l1']:.2f}/255 < {COPY_L1})")
    if values.get("lpips_diversity", MIN_DIVERSITY) < MIN_DIVERSITY:
        out.append(f"outputs do not vary with the exemplar (LPIPS diversity {values['lpips_diversity']:.4f} "
                   f"< {MIN_DIVERSITY})")
    return out
