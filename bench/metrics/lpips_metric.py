"""LPIPS (lpips package, AlexNet trunk, v0.1 linear calibration): diversity and vs ground truth.

* ``lpips_diversity``: for every input, the outputs under K different exemplars (the evaluator
  rolls the batch's exemplars by k = 0..K-1); mean LPIPS over all C(K, 2) output pairs, then over
  inputs (MCL-Net's "diversity of different exemplars", BicycleGAN's all-pairs protocol; K and the
  pairing recorded). A pair whose two exemplars are the same image (a batch smaller than K, or a
  repeated exemplar) measures nothing about exemplar diversity and is skipped, and counted.
* ``lpips_gt``: LPIPS of the output vs the ground truth (``reference_image``; lower is better).

Images are quantised to uint8 first and mapped back with ``lpips.im2tensor``'s convention
(x / 127.5 - 1), as the reference scripts read saved PNGs.

Weights: the linear heads ship in the lpips wheel (hashed into the provenance); the ImageNet
AlexNet trunk ``alexnet-owt-7be5be79.pth`` is located with ``find_weights`` and loaded with
``weights_only=True`` into lpips' own trunk (``pnet_rand=True`` only skips lpips' torchvision
download). With ``allow_untrained`` and no file the trunk keeps lpips' seeded random init and is
stamped ``untrained(seed=N)``.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from bench.metrics.base import METRICS, Metric, MetricContext, reference_image, to_uint8_hwc
from methods.base import BackboneSettings
from methods.common.weights import file_sha256, find_weights, private_rng, provenance_of

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
LPIPS_VERSION = "0.1"

_CACHE: Dict[Tuple, Tuple[torch.nn.Module, Dict[str, str]]] = {}


def trunk_state(lp: torch.nn.Module, src: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchvision AlexNet ``features.<i>.*`` -> lpips' ``slice<s>.<i>.*`` (same module indices)."""
    out = {}
    for key in lp.net.state_dict():
        _, idx, param = key.split(".")
        out[key] = src[f"features.{idx}.{param}"]
    return out


def load_lpips(settings: BackboneSettings, device: torch.device) -> Tuple[torch.nn.Module, Dict[str, str]]:
    """lpips.LPIPS(net='alex', version='0.1') with the trunk from ``find_weights`` or seeded random.

    Shared per process; returns the module and its provenance (trunk and linear heads).
    """
    import lpips

    path = find_weights(ALEXNET_FILE, ALEXNET_URL, settings, "LPIPS (AlexNet trunk)")
    key = (str(path), settings.seed, str(device))
    if key not in _CACHE:
        # the random trunk, when no weights: seeded
        with private_rng(settings.seed), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # lpips prints its setup and passes torchvision's deprecated ``pretrained=``
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*")
            lp = lpips.LPIPS(net="alex", version=LPIPS_VERSION, pnet_rand=True, verbose=False)
        if path is not None:
            src = torch.load(path, map_location="cpu", weights_only=True)
            lp.net.load_state_dict(trunk_state(lp, src), strict=True)
        lin_path = Path(lpips.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / "alex.pth"
        prov = {"lpips_alexnet_trunk": provenance_of(path, settings.seed),
                "lpips_lin_v0.1_alex": f"sha256:{file_sha256(lin_path)}"}
        lp = lp.eval().to(device)
        for p in lp.parameters():
            p.requires_grad_(False)
        _CACHE[key] = (lp, prov)
    return _CACHE[key]


def quantised(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 (as saved) -> [-1, 1] the way ``lpips.im2tensor`` reads a PNG."""
    return torch.from_numpy(to_uint8_hwc(x)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(x.device)


class _LPIPSMetric(Metric):
    def __init__(self, ctx: MetricContext):
        super().__init__(ctx)
        self.net, self.provenance = load_lpips(ctx.backbones, ctx.device)
        self.values: List[float] = []

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS of two [-1, 1] batches, (B,)."""
        return self.net(quantised(a), quantised(b)).flatten().cpu()

    def _settings(self) -> Dict[str, object]:
        return {"net": "alex", "version": LPIPS_VERSION, "n_inputs": len(self.values), "quantisation": "uint8"}


@METRICS.register("lpips_gt")
class LPIPSGroundTruth(_LPIPSMetric):
    """LPIPS of output vs ground truth (lower is better)."""

    def __init__(self, ctx: MetricContext):
        super().__init__(ctx)
        self.gt_key: Optional[str] = None

    def update(self, batch, out):
        self.gt_key = "target" if "target" in batch else "image"
        self.values.extend(self.distance(out.output, reference_image(batch)).tolist())

    def compute(self):
        if not self.values:
            raise ValueError("lpips_gt: no images were fed")
        self.settings = {**self._settings(), "reference": self.gt_key}
        return {"lpips_gt": float(np.mean(self.values))}


@METRICS.register("lpips_diversity")
class LPIPSDiversity(_LPIPSMetric):
    """Mean pairwise LPIPS among K outputs of one input under K exemplars (higher = more diverse).

    Option ``k`` (default 5, at least 2): outputs per input. Per input the mean over its usable
    pairs, then the mean over inputs with at least one usable pair.
    """

    exemplars_per_input = 5

    def __init__(self, ctx: MetricContext):
        super().__init__(ctx)
        opts = dict(ctx.options)
        self.exemplars_per_input = int(opts.pop("k", type(self).exemplars_per_input))
        if opts:
            raise ValueError(f"lpips_diversity: unknown options {sorted(opts)}; valid: k")
        if self.exemplars_per_input < 2:
            raise ValueError("lpips_diversity needs k >= 2 outputs per input")
        self.pairs_used = 0
        self.pairs_skipped = 0
        self.inputs_skipped = 0
        self.exemplar_source = ""

    def update(self, batch, out):
        raise RuntimeError("lpips_diversity needs K outputs per input: the evaluator must call update_multi")

    def update_multi(self, batch, outs):
        """The evaluator's K outputs: output k of input i used the exemplar k positions away."""
        exemplars = batch["exemplar"]
        self.update_groups([o.output for o in outs], [torch.roll(exemplars, k, dims=0) for k in range(len(outs))],
                           "exemplars rolled within the batch")

    def update_groups(self, outputs: List[torch.Tensor], exemplars: Optional[List[torch.Tensor]],
                      exemplar_source: str) -> None:
        """K outputs of the same B inputs: ``outputs[k]`` (B, 3, H, W) made with ``exemplars[k]``.

        A pair (k1, k2) of input i is skipped when ``exemplars[k1][i]`` and ``exemplars[k2][i]`` are
        the same image. ``exemplars`` None: the caller has no exemplar images (outputs scored from
        folders without ``--exemplars``) and every pair counts. ``exemplar_source`` says where the
        K exemplars came from (recorded in the settings).
        """
        self.exemplar_source = exemplar_source
        k = len(outputs)
        if k < 2:
            raise ValueError(f"lpips_diversity got {k} output(s) per input; needs >= 2")
        n = outputs[0].shape[0]
        device = outputs[0].device
        total = torch.zeros(n, dtype=torch.float64)
        count = torch.zeros(n, dtype=torch.int64)
        for k1, k2 in itertools.combinations(range(k), 2):
            if exemplars is None:
                usable = torch.ones(n, dtype=torch.bool)
            else:
                usable = ~(exemplars[k1] == exemplars[k2]).flatten(1).all(dim=1).cpu()
            self.pairs_skipped += int((~usable).sum())
            if not usable.any():
                continue
            d = self.distance(outputs[k1][usable.to(device)], outputs[k2][usable.to(device)])
            total[usable] += d.double()
            count[usable] += 1
        self.pairs_used += int(count.sum())
        has = count > 0
        self.inputs_skipped += int((~has).sum())
        self.values.extend((total[has] / count[has]).tolist())

    def compute(self):
        if not self.values:
            raise ValueError("lpips_diversity: no input had two outputs under different exemplars "
                             "(evaluation batches need at least 2 distinct exemplars)")
        self.settings = {**self._settings(), "k": self.exemplars_per_input,
                         "pairing": f"all C(K,2) pairs per input, {self.exemplar_source}",
                         "pairs": self.pairs_used, "pairs_skipped_same_exemplar": self.pairs_skipped,
                         "inputs_skipped": self.inputs_skipped}
        return {"lpips_diversity": float(np.mean(self.values))}
