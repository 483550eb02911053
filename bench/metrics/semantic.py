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

Options (``eval.metric_options.<metric>``; the same for the style metrics): ``resolution``
(default 256, the protocol's) and ``backbone``:

* ``torchvision`` (default): torchvision's ImageNet VGG19 (``vgg19-dcbb9e9d.pth``, RGB, ImageNet
  mean/std). It is the default because it is the file that can be fetched from a stable URL (the
  harness downloads it when the network allows); absolute values differ from the papers'.
* ``caffe``: the authors' network and preprocessing exactly: the Caffe VGG19 ``vgg19_conv.pth``
  (BGR, minus the Caffe mean, x255; ``methods/common/vgg_caffe.py``). That file is never
  downloaded (Google-Drive link only): put it in the weights directory.

The backbone is recorded in the settings (``backbone``) and its weights' hash or untrained seed in
the provenance (``vgg19`` for torchvision, ``vgg19_caffe`` for caffe).

Shared features: within one evaluation, the VGG metrics (semantic and style, label-wise and
global) share one feature extractor per backbone (``SharedVGG``, in ``MetricContext.memo``). Each
metric registers which layers it reads from which image set (output, ground truth, exemplar) at
which resolution; every image set of a batch then goes through the VGG once, for the union of
those layers, and the features are dropped after the batch. A metric computed alone gives the
same values (tested).

Upsampling a feature map with nearest and averaging over a region equals a count-weighted average
over the low-resolution cells, which is how it is computed here (exact, and ~(256/h)^2 times
cheaper than materialising the upsampled maps; tested against the direct way).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from bench.metrics.base import METRICS, EvalMemo, Metric, MetricContext, reference_image, to_uint8_hwc
from methods.base import BackboneSettings
from methods.common.vgg_caffe import BACKBONES, VGG19Features
from methods.common.weights import is_untrained

SEM_LAYERS = ("relu3_2", "relu4_2", "relu5_2")
PROTOCOL_SIZE = 256
DEFAULT_BACKBONE = "torchvision"
PROVENANCE_NAME = {"torchvision": "vgg19", "caffe": "vgg19_caffe"}
# settings["backbone"]: (backbone, untrained) -> note
BACKBONE_NOTES = {
    ("torchvision", False): ("torchvision VGG19 IMAGENET1K_V1, ImageNet mean/std (authors: Caffe vgg19_conv.pth, "
                             "BGR mean-only; absolute values differ)"),
    ("torchvision", True): "torchvision VGG19 architecture, seeded random init (untrained: numbers are not comparable)",
    ("caffe", False): "Caffe VGG19 vgg19_conv.pth, BGR minus the Caffe mean, x255 (the authors' network and preprocessing)",
    ("caffe", True): "Caffe VGG19 architecture, seeded random init (untrained: numbers are not comparable)",
}


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


class SharedVGG:
    """One backbone's VGG19 for every VGG metric of an evaluation (one per ``MetricContext.memo``).

    ``register(image_set, size, layers)`` at metric construction; ``features`` then runs the
    network once per image tensor and batch, for the union of the layers registered for its
    image set and resolution, and hands every metric the same result.
    """

    def __init__(self, backbone: str, settings: BackboneSettings, device: torch.device):
        self.backbone, self.settings, self.device = backbone, settings, device
        self.layers: Dict[Tuple[str, int], List[str]] = {}
        self.nets: Dict[Tuple[str, int], VGG19Features] = {}

    def register(self, image_set: str, size: int, layers: Sequence[str]) -> None:
        have = self.layers.setdefault((image_set, size), [])
        new = [l for l in layers if l not in have]
        if new:
            have.extend(new)
            self.nets.pop((image_set, size), None)  # rebuilt for the union (the weights are cached)

    def _run(self, key: Tuple[str, int], x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if key not in self.nets:
            self.nets[key] = VGG19Features(self.backbone, self.layers[key], self.settings).to(self.device)
        return self.nets[key](prepare_images(x, key[1]))

    @torch.no_grad()
    def features(self, memo: EvalMemo, batch: dict, image_set: str, x: torch.Tensor,
                 size: int) -> Dict[str, torch.Tensor]:
        key = (image_set, size)
        return memo.per_batch(batch, ("vgg19", id(self), key), x, lambda: self._run(key, x))


class _VGGMetric(Metric):
    """Shared plumbing: VGG19 features of two image sets at the protocol resolution."""

    layers: Sequence[str] = ()
    image_sets: Tuple[str, str] = ("output", "reference")  # what is compared with what
    prefix = ""

    def __init__(self, ctx: MetricContext):
        super().__init__(ctx)
        opts = dict(ctx.options)
        self.size = int(opts.pop("resolution", PROTOCOL_SIZE))
        self.backbone = str(opts.pop("backbone", DEFAULT_BACKBONE))
        if opts:
            raise ValueError(f"{self.prefix}: unknown options {sorted(opts)}; valid: backbone, resolution")
        if self.backbone not in BACKBONES:
            raise ValueError(f"{self.prefix}: backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        # Built here so that a missing weights file fails the trial before training.
        vgg = VGG19Features(self.backbone, self.layers, ctx.backbones,
                            purpose=f"{self.prefix} metric (VGG19, backbone: {self.backbone})")
        self.provenance = {PROVENANCE_NAME[self.backbone]: vgg.provenance}
        self.vgg = ctx.memo.resource(("vgg19", self.backbone, repr(ctx.backbones), str(ctx.device)),
                                     lambda: SharedVGG(self.backbone, ctx.backbones, ctx.device))
        for image_set in self.image_sets:
            self.vgg.register(image_set, self.size, self.layers)
        self.values: Dict[str, List[float]] = {l: [] for l in self.layers}

    def features(self, batch: dict, a: torch.Tensor, b: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """layer -> (features of a, features of b), a and b being ``image_sets``' images of ``batch``."""
        fa, fb = (self.vgg.features(self.ctx.memo, batch, s, x, self.size) for s, x in zip(self.image_sets, (a, b)))
        return {l: (fa[l], fb[l]) for l in self.layers}

    def _settings(self) -> Dict[str, object]:
        n = len(next(iter(self.values.values())))
        untrained = is_untrained(self.provenance[PROVENANCE_NAME[self.backbone]])
        return {"backbone": BACKBONE_NOTES[(self.backbone, untrained)], "resolution": self.size, "n_images": n,
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
        for layer, (f_out, f_gt) in self.features(batch, out.output, reference_image(batch)).items():
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
        for layer, (f_out, f_gt) in self.features(batch, out.output, reference_image(batch)).items():
            self.values[layer].extend(cosine(f_out.double().mean((2, 3)), f_gt.double().mean((2, 3))).tolist())

    def compute(self):
        self.settings = self._settings()
        return self._result({l: f"sem_consistency_global_{l}" for l in self.layers}, "sem_consistency_global")
