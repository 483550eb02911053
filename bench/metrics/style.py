"""Style relevance (output vs its exemplar), the CoCosNet authors' ``ref_vgg_metric.py``.

Protocol (reference/metrics.md 5.3): as semantic consistency (uint8, 256x256, VGG19, features
nearest-upsampled to 256), but the output is compared with its *exemplar*, each with its own
label map (the input's ``label`` for the output, ``exemplar_label`` for the exemplar):

* shared classes = labels present in both maps, excluding 0;
* for each shared class k: cosine of the output's mean feature over its class-k region and the
  exemplar's mean feature over *its* class-k region (the regions need not overlap);
* weighted by the class's pixel count in the output's label / the total pixels of shared classes
  in the output's label; an image with no shared class scores 0 and is still averaged in.

relu1_2 gives ``style_color`` and relu2_2 ``style_texture`` (CoCosNet: "relu1_2 and relu2_2 ...
colour and texture"). ``style_relevance_global`` is the label-free variant: the cosine of the
whole-image mean features (``style_color_global``, ``style_texture_global``).

Options ``resolution`` and ``backbone`` (``torchvision`` by default, ``caffe`` for the authors'
``vgg19_conv.pth``), and the VGG features shared with the other VGG metrics of an evaluation:
see ``bench/metrics/semantic.py``.
"""
from __future__ import annotations

import torch

from bench.metrics.base import METRICS
from bench.metrics.semantic import _VGGMetric, cosine, no_label_reason, prepare_labels, region_means, relabel

STYLE_LAYERS = ("relu1_2", "relu2_2")
STYLE_NAMES = {"relu1_2": "style_color", "relu2_2": "style_texture"}
IGNORE_LABEL = 0


def style_relevance(feat_out: torch.Tensor, feat_ex: torch.Tensor, label_out: torch.Tensor,
                    label_ex: torch.Tensor) -> torch.Tensor:
    """Per-image weighted cosine over shared non-zero classes of the region means, (B,)."""
    (lo, le), classes = relabel(label_out, label_ex)
    m_out, area_out = region_means(feat_out, lo, len(classes))
    m_ex, area_ex = region_means(feat_ex, le, len(classes))
    shared = (area_out > 0) & (area_ex > 0) & (classes != IGNORE_LABEL)[None]
    weights = torch.where(shared, area_out, torch.zeros_like(area_out))
    total = weights.sum(-1, keepdim=True)
    weights = torch.where(total > 0, weights / total.clamp(min=1), torch.zeros_like(weights))
    return (cosine(m_out, m_ex) * weights).sum(-1)


@METRICS.register("style_relevance")
class StyleRelevance(_VGGMetric):
    """Same-class region-mean VGG cosine of output vs exemplar at relu1_2 / relu2_2 (higher is better)."""

    layers = STYLE_LAYERS
    image_sets = ("output", "exemplar")
    prefix = "style_relevance"

    @classmethod
    def unsupported_reason(cls, data, has_warp):
        return no_label_reason(data)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.no_shared = 0

    def update(self, batch, out):
        missing = [k for k in ("label", "exemplar_label") if k not in batch]
        if missing:
            raise ValueError(f"style_relevance needs batch keys {missing} (class maps of input and exemplar)")
        lo = prepare_labels(batch["label"], self.size)
        le = prepare_labels(batch["exemplar_label"], self.size)
        for layer, (f_out, f_ex) in self.features(batch, out.output, batch["exemplar"]).items():
            self.values[layer].extend(style_relevance(f_out, f_ex, lo, le).tolist())
        shared = [len(set(a.unique().tolist()) & set(b.unique().tolist()) - {IGNORE_LABEL}) for a, b in zip(lo, le)]
        self.no_shared += sum(1 for s in shared if s == 0)

    def compute(self):
        self.settings = {**self._settings(), "ignore_label": IGNORE_LABEL,
                         "images_without_shared_class": self.no_shared,
                         "weights": "output-label pixels of shared classes, normalised"}
        return self._result(STYLE_NAMES, None)


@METRICS.register("style_relevance_global")
class StyleRelevanceGlobal(_VGGMetric):
    """Cosine of whole-image mean VGG features of output vs exemplar (no label maps needed)."""

    layers = STYLE_LAYERS
    image_sets = ("output", "exemplar")
    prefix = "style_relevance_global"

    def update(self, batch, out):
        for layer, (f_out, f_ex) in self.features(batch, out.output, batch["exemplar"]).items():
            self.values[layer].extend(cosine(f_out.double().mean((2, 3)), f_ex.double().mean((2, 3))).tolist())

    def compute(self):
        self.settings = self._settings()
        return self._result({l: f"{n}_global" for l, n in STYLE_NAMES.items()}, None)
