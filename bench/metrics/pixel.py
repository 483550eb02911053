"""Pixel metrics of the output against the ground truth: L1, PSNR and SSIM (scikit-image).

Images are quantised to uint8 first (as saved PNGs would be); L1 is the mean absolute error in
0-255 units, PSNR and SSIM use ``data_range=255`` with ``channel_axis=-1`` (reference/metrics.md
5.4: ``multichannel=True`` is silently ignored by scikit-image 0.26).
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bench.metrics.base import METRICS, Metric, reference_image, to_uint8_hwc


def pixel_scores(pred: np.ndarray, gt: np.ndarray) -> Dict[str, List[float]]:
    """Per-image L1 / PSNR / SSIM for uint8 (B, H, W, 3) arrays."""
    scores: Dict[str, List[float]] = {"l1": [], "psnr": [], "ssim": []}
    for p, g in zip(pred, gt):
        scores["l1"].append(float(np.abs(p.astype(np.float64) - g.astype(np.float64)).mean()))
        if np.array_equal(p, g):
            scores["psnr"].append(float("inf"))
        else:
            scores["psnr"].append(float(peak_signal_noise_ratio(g, p, data_range=255)))
        win = min(7, min(g.shape[:2]) // 2 * 2 - 1)  # odd, at most the image side
        scores["ssim"].append(float(structural_similarity(g, p, channel_axis=-1, data_range=255, win_size=win)))
    return scores


class _PixelMetric(Metric):
    key = ""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.values: List[float] = []
        self.settings = {"quantisation": "uint8", "data_range": 255}

    def update(self, batch, out):
        scores = pixel_scores(to_uint8_hwc(out.output), to_uint8_hwc(reference_image(batch)))
        self.values.extend(scores[self.key])

    def compute(self):
        return {self.key: float(np.mean(self.values))}


@METRICS.register("l1")
class L1(_PixelMetric):
    """Mean absolute error of output vs ground truth, 0-255 units (lower is better)."""

    key = "l1"


@METRICS.register("psnr")
class PSNR(_PixelMetric):
    """Peak signal-to-noise ratio of output vs ground truth in dB (higher is better)."""

    key = "psnr"


@METRICS.register("ssim")
class SSIM(_PixelMetric):
    """Structural similarity of output vs ground truth (higher is better)."""

    key = "ssim"


@METRICS.register("warp")
class WarpAccuracy(Metric):
    """L1 / PSNR / SSIM of every warped-exemplar level vs the ground truth (CoCosNet v2 Tables 4-5).

    A warp at a lower resolution is compared with the ground truth downsampled to it (area
    interpolation), so each level is judged at its own resolution. Logged as
    ``warp_<l1|psnr|ssim>_l<level>``.
    """

    @classmethod
    def unsupported_reason(cls, data, has_warp):
        return None if has_warp else "the method produces no warped exemplar"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.values: Dict[str, List[float]] = {}
        self.settings = {"quantisation": "uint8", "data_range": 255, "gt_resize": "area"}

    def update(self, batch, out):
        gt = reference_image(batch)
        for level, warp in out.warps.items():
            g = gt if gt.shape[-2:] == warp.shape[-2:] else torch.nn.functional.interpolate(
                gt, size=warp.shape[-2:], mode="area")
            scores = pixel_scores(to_uint8_hwc(warp), to_uint8_hwc(g))
            for k, v in scores.items():
                self.values.setdefault(f"warp_{k}_l{level}", []).extend(v)

    def compute(self):
        return {k: float(np.mean(v)) for k, v in sorted(self.values.items())}
