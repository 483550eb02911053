"""Evaluation of a trained method: the first ``num_samples`` of the eval split, every selected metric.

Metrics are built before training starts (``build_metrics``), so a missing weights file or an
unsupported metric fails a trial at step 0, not after hours of training.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from bench.metrics import METRICS
from bench.metrics.base import Metric, MetricContext
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
             grid_samples: int = 6, progress=None) -> Tuple[Dict[str, float], Optional[tuple]]:
    """Run every metric over the loader; returns (metric values, (grid batch, grid output))."""
    was_training = method.training
    method.eval()
    k_max = max((m.exemplars_per_input for m in metrics.values()), default=1)
    memos = list({id(m.ctx.memo): m.ctx.memo for m in metrics.values()}.values())
    grid = None
    seen = 0
    for batch in loader:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out: MethodOutput = method.generate(batch)
        outs = [out]
        for k in range(1, k_max):
            outs.append(method.generate(roll_exemplars(batch, k)))
        for m in metrics.values():
            if m.exemplars_per_input > 1:
                m.update_multi(batch, outs[: m.exemplars_per_input])
            else:
                m.update(batch, out)
        for memo in memos:  # features shared by the metrics for this batch (EvalMemo) are dropped
            memo.end_batch()
        if grid is None:
            n = min(grid_samples, batch["cond"].shape[0])
            grid = ({k: v[:n].cpu() for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 4},
                    MethodOutput(out.output[:n].cpu(), {l: w[:n].cpu() for l, w in out.warps.items()}))
        seen += batch["cond"].shape[0]
        if progress:
            progress(seen)
    values: Dict[str, float] = {}
    for m in metrics.values():
        values.update(m.compute())
    method.train(was_training)
    return values, grid
