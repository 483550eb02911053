"""The metric interface: stream batches in, get named numbers out.

Each metric is one module in this package with one registered class. The evaluator feeds every
evaluation batch (and the method's outputs for it) to ``update``, then calls ``compute`` once.
Metrics whose features come from a network follow the pipeline images -> features (cached where
they describe real data) -> statistics -> number, and record the provenance of the network.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from datasets.base import DataInfo
from datasets.registry import Registry
from methods.base import BackboneSettings, MethodOutput

METRICS: Registry = Registry("metric")


@dataclass
class MetricContext:
    data: DataInfo
    device: torch.device
    backbones: BackboneSettings
    cache_dir: Path  # reference statistics and other reusable features live here
    # Identity of the real data the metric compares against (dataset, split, size, resolution,
    # options): a component of every on-disk cache key.
    data_key: str = ""
    seed: int = 0
    options: Dict[str, object] = field(default_factory=dict)  # eval.metric_options[<name>]


class Metric:
    """Subclasses implement ``update`` and ``compute``.

    ``exemplars_per_input`` > 1 asks the evaluator to translate every input under that many
    different exemplars; the outputs arrive in ``update_multi``.
    """

    exemplars_per_input: int = 1

    def __init__(self, ctx: MetricContext):
        self.ctx = ctx
        # name -> "sha256:..." / "untrained(seed=N)" for every network this metric used
        self.provenance: Dict[str, str] = {}
        # settings that change the number (mode, sample counts, K, adapted parameters)
        self.settings: Dict[str, object] = {}

    @classmethod
    def unsupported_reason(cls, data: DataInfo, has_warp: bool) -> Optional[str]:
        """Why this metric cannot run on this data/method, or None when it can."""
        return None

    def update(self, batch: Dict[str, torch.Tensor], out: MethodOutput) -> None:
        raise NotImplementedError

    def update_multi(self, batch: Dict[str, torch.Tensor], outs: List[MethodOutput]) -> None:
        raise NotImplementedError

    def compute(self) -> Dict[str, float]:
        raise NotImplementedError


def reference_image(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The ground truth an output is compared with: the exact target when the dataset knows it,
    otherwise the condition's own photo."""
    return batch["target"] if "target" in batch else batch["image"]


def to_uint8_hwc(x: torch.Tensor) -> "np.ndarray":  # noqa: F821
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounding like torchvision's save_image."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).add_(0.5).clamp_(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
