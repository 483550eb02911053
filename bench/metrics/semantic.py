"""Semantic consistency (output vs ground truth), the CoCosNet authors' ``sc_vgg_metric.py``.

Protocol (reference/metrics.md 5.2): images as saved (uint8), resized to 256x256 (bilinear, as
PIL ``Resize``), the input's label map resized with nearest (PIL NEAREST = torch
'nearest-exact'); VGG19 features at relu3_2 / relu4_2 / relu5_2, each upsampled to 256x256 with
``F.interpolate(mode='nearest')``; for every label k present (0 included) the masked spatial mean
of the output's and of the ground truth's features over region k, their cosine (a zero vector
gives 0, as ``sklearn.preprocessing.normalize`` leaves it zero), weighted by area_k / 256^2 and
summed; averaged over images. Logged per layer (``sem_consistency_relu3_2`` ...) and as the
mean of the three layers (``sem_consistency``; the script prints three numbers and which one the
papers report is not confirmed, so all are logged).

``sem_consistency_global`` is the simpler label-free variant: the cosine of the whole-image mean
features (one region covering the image), same layers.

Backbone: torchvision's ImageNet VGG19 (``methods.common.vgg``); the authors used a Caffe VGG19
(``vgg19_conv.pth``, BGR, mean-only normalisation), so absolute values differ from the papers'
-- recorded in settings. Upsampling a feature map with nearest and averaging over a region equals
a count-weighted average over the low-resolution cells, which is how it is computed here (exact,
and ~(256/h)^2 times cheaper than materialising the upsampled maps; tested against the direct way).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from bench.metrics.base import METRICS, Metric, MetricContext, reference_image, to_uint8_hwc
from methods.common.vgg import VGGFeatures
from methods.common.weights import is_untrained

SEM_LAYERS = ("relu3_2", "relu4_2", "relu5_2")
PROTOCOL_SIZE = 256
BACKBONE_NOTE = ("torchvision VGG19 IMAGENET1K_V1, ImageNet mean/std (authors: Caffe vgg19_conv.pth, "
                 "BGR mean-only; absolute values differ)")
UNTRAINED_NOTE = "torchvision VGG19 architecture, seeded random init (untrained: numbers are not comparable)"


def prepare_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """[-1, 1] -> uint8 as saved -> bilinear resize to ``size`` (antialiased, like PIL), rounded to
    uint8 as PIL returns it -> [-1, 1] (``ToTensor`` + ``Normalize(0.5, 0.5)``)."""
    u8 = torch.from_numpy(to_uint8_hwc(x)).permute(0, 3, 1, 2).float().to(x.device)
    if u8.shape[-2:] != (size, size):
        u8 = F.interpolate(u8, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        u8 = u8.round().clamp(0, 255)
    return u8 / 127.5 - 1.0


def prepare_labels(label: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) int64 -> (B, size, size) with PIL NEAREST semantics ('nearest-exact')."""
    if label.shape[-2:] == (size, size):
        return label
    return F.interpolate(label[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0].long()


def nearest_cells(h: int, w: int, size: int, device: torch.device) -> torch.Tensor:
    """(size*size,) index of the low-res cell each pixel of ``F.interpolate(nearest)`` reads."""
    ids = torch.arange(h * w, dtype=torch.float32, device=device).view(1, 1, h, w)
    return F.interpolate(ids, size=(size, size), mode="nearest").flatten().long()


def region_means(feat: torch.Tensor, label: torch.Tensor, num_regions: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Means of nearest-upsampled ``feat`` (B, C, h, w) over each region of ``label`` (B, S, S).

    ``label`` holds region indices in [0, num_regions). Returns (means (B, K, C) float64, areas
    (B, K) pixel counts at S x S); an empty region's mean is 0.
    """
    b, c, h, w = feat.shape
    size = label.shape[-1]
    cells = nearest_cells(h, w, size, feat.device)  # (S*S,)
    flat = label.reshape(b, -1) * (h * w) + cells[None]  # region-major cell id per pixel
    flat = flat + torch.arange(b, device=feat.device)[:, None] * (num_regions * h * w)
    counts = torch.bincount(flat.flatten(), minlength=b * num_regions * h * w)
    counts = counts.view(b, num_regions, h * w).double()
    sums = counts @ feat.reshape(b, c, h * w).double().transpose(1, 2)  # (B, K, C)
    areas = counts.sum(-1)
    means = sums / areas.clamp(min=1)[..., None]
    return means, areas


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last axis; 0 when either vector is zero (sklearn ``normalize`` semantics)."""
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    dot = (a * b).sum(-1)
    return torch.where((na > 0) & (nb > 0), dot / (na * nb).clamp(min=1e-300), torch.zeros_like(dot))


def relabel(*labels: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Map class ids of several label maps jointly to 0..K-1; returns (maps, the K class ids)."""
    classes, inverse = torch.unique(torch.cat([l.flatten() for l in labels]), return_inverse=True)
    out, start = [], 0
    for l in labels:
        out.append(inverse[start:start + l.numel()].view_as(l))
        start += l.numel()
    return out, classes


def semantic_consistency(feat_out: torch.Tensor, feat_gt: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per-image area-weighted sum over classes of cos(region mean out, region mean gt), (B,)."""
    (lab,), classes = relabel(label)
    m_out, area = region_means(feat_out, lab, len(classes))
    m_gt, _ = region_means(feat_gt, lab, len(classes))
    weights = area / float(label.shape[-1] * label.shape[-2])
    return (cosine(m_out, m_gt) * weights).sum(-1)


class _VGGMetric(Metric):
    """Shared plumbing: VGG19 features of two image sets at the protocol resolution."""

    layers: Sequence[str] = ()
    prefix = ""

    def __init__(self, ctx: MetricContext):
        super().__init__(ctx)
        opts = dict(ctx.options)
        self.size = int(opts.pop("resolution", PROTOCOL_SIZE))
        if opts:
            raise ValueError(f"{self.prefix}: unknown options {sorted(opts)}; valid: resolution")
        self.vgg = VGGFeatures(self.layers, ctx.backbones, purpose=f"{self.prefix} metric (VGG19)").to(ctx.device)
        self.provenance = {"vgg19": self.vgg.provenance}
        self.values: Dict[str, List[float]] = {l: [] for l in self.layers}

    @torch.no_grad()
    def features(self, a: torch.Tensor, b: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """One VGG pass over both sets; layer -> (features of a, features of b)."""
        x = torch.cat([prepare_images(a, self.size), prepare_images(b, self.size)])
        feats = self.vgg(x)
        n = a.shape[0]
        return {l: (f[:n], f[n:]) for l, f in feats.items()}

    def _settings(self) -> Dict[str, object]:
        n = len(next(iter(self.values.values())))
        backbone = UNTRAINED_NOTE if is_untrained(self.vgg.provenance) else BACKBONE_NOTE
        return {"backbone": backbone, "resolution": self.size, "n_images": n,
                "layers": ",".join(self.layers), "quantisation": "uint8"}

    def _result(self, names: Dict[str, str], mean_name: Optional[str]) -> Dict[str, float]:
        if not next(iter(self.values.values())):
            raise ValueError(f"{self.prefix}: no images were fed")
        out = {names[l]: float(np.mean(v)) for l, v in self.values.items()}
        if mean_name:
            out[mean_name] = float(np.mean([out[names[l]] for l in self.layers]))
        return out


def no_label_reason(data) -> Optional[str]:
    return None if data.num_classes is not None else "the dataset has no semantic label map"


@METRICS.register("sem_consistency")
class SemanticConsistency(_VGGMetric):
    """Region-wise (per class) VGG feature cosine of output vs ground truth (higher is better)."""

    layers = SEM_LAYERS
    prefix = "sem_consistency"

    @classmethod
    def unsupported_reason(cls, data, has_warp):
        return no_label_reason(data)

    def update(self, batch, out):
        if "label" not in batch:
            raise ValueError("sem_consistency needs batch['label'] (the input's class map)")
        label = prepare_labels(batch["label"], self.size)
        for layer, (f_out, f_gt) in self.features(out.output, reference_image(batch)).items():
            self.values[layer].extend(semantic_consistency(f_out, f_gt, label).tolist())

    def compute(self):
        self.settings = {**self._settings(), "weights": "area_k / S^2 over all labels incl. 0"}
        return self._result({l: f"sem_consistency_{l}" for l in self.layers}, "sem_consistency")


@METRICS.register("sem_consistency_global")
class SemanticConsistencyGlobal(_VGGMetric):
    """Cosine of whole-image mean VGG features, output vs ground truth (no label map needed)."""

    layers = SEM_LAYERS
    prefix = "sem_consistency_global"

    def update(self, batch, out):
        for layer, (f_out, f_gt) in self.features(out.output, reference_image(batch)).items():
            self.values[layer].extend(cosine(f_out.double().mean((2, 3)), f_gt.double().mean((2, 3))).tolist())

    def compute(self):
        self.settings = self._settings()
        return self._result({l: f"sem_consistency_global_{l}" for l in self.layers}, "sem_consistency_global")
