"""The metric interface: stream batches in, get named numbers out.

Each metric is one module in this package with one registered class. The evaluator feeds every
evaluation batch (and the method's outputs for it) to ``update``, then calls ``compute`` once.
Metrics whose features come from a network follow the pipeline images -> features (cached where
they describe real data) -> statistics -> number, and record the provenance of the network.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, List, Optional

import torch

from datasets.base import DataInfo
from datasets.registry import Registry
from methods.base import BackboneSettings, MethodOutput

METRICS: Registry = Registry("metric")


class EvalMemo:
    """What the metrics of one evaluation share, so a network runs once for all of them.

    One instance per evaluation, in ``MetricContext.memo`` (``dataclasses.replace`` of a context
    keeps the same instance, so every metric built from it shares it):

    * ``resource(key, build)``: an object built once per evaluation (e.g. one backbone's feature
      extractor with the layers its metrics registered);
    * ``per_batch(batch, key, tensor, compute)``: a value derived from ``tensor`` (e.g. its VGG
      features), computed once per evaluation batch. The evaluator calls ``end_batch()`` after
      feeding every metric a batch, which drops these values; a different ``batch`` dict also
      drops them first, so at most one batch's values are held even without ``end_batch``.
      The memo holds ``tensor`` (its id cannot be reused meanwhile); an in-place change of it
      (a new ``_version``) is a miss.
    """

    def __init__(self):
        self._resources: Dict[Hashable, Any] = {}
        self._batch: Optional[dict] = None
        self._values: Dict[Hashable, tuple] = {}

    def resource(self, key: Hashable, build: Callable[[], Any]) -> Any:
        if key not in self._resources:
            self._resources[key] = build()
        return self._resources[key]

    def per_batch(self, batch: dict, key: Hashable, tensor: torch.Tensor, compute: Callable[[], Any]) -> Any:
        if batch is not self._batch:
            self.end_batch()
            self._batch = batch
        k = (key, id(tensor), tensor._version)
        if k not in self._values:
            self._values[k] = (tensor, compute())
        return self._values[k][1]

    def end_batch(self) -> None:
        self._batch = None
        self._values.clear()


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
    memo: EvalMemo = field(default_factory=EvalMemo)  # shared by the metrics of one evaluation


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
    x = x.detach().float().clamp(-1, 1).add_(1).mul_(127.5).add_(0.5).clamp_(0, 255)  # one copy, then in place
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
