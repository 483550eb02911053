"""Semantic consistency and style relevance: hand-built known answers, a direct (upsample-then-mask)
reference for the region means, PIL for the resizing conventions, and end-to-end properties with a
seeded random VGG19 (allow_untrained; offline) at a small resolution to stay fast."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench.metrics import semantic as S
from bench.metrics import style as T
from bench.evaluate import evaluate
from bench.metrics import METRICS
from bench.metrics.base import EvalMemo, MetricContext
from datasets.base import DataInfo
from methods.base import BackboneSettings, MethodOutput
from methods.common.vgg_caffe import VGG19Features
from methods.common.weights import MissingWeightsError

UNTRAINED = BackboneSettings(allow_untrained=True, download=False, seed=0)


@pytest.fixture(autouse=True)
def _offline(offline_weights, monkeypatch, tmp_path):
    torch.set_num_threads(1)


def _info(num_classes=4):
    return DataInfo(name="t", variant="default", split="test", size=4, resolution=32, cond_channels=1,
                    num_classes=num_classes)


def _ctx(resolution=32, backbones=UNTRAINED, options=None):
    return MetricContext(data=_info(), device=torch.device("cpu"), backbones=backbones, cache_dir=None,
                         data_key="t", options={"resolution": resolution, **(options or {})})


def direct_region_means(feat, label, k):
    """The script's way: upsample with nearest to the label size, then a masked mean per class."""
    up = F.interpolate(feat.double(), size=label.shape[-2:], mode="nearest")
    means = torch.zeros(feat.shape[0], k, feat.shape[1], dtype=torch.float64)
    for b in range(feat.shape[0]):
        for c in range(k):
            mask = label[b] == c
            if mask.any():
                means[b, c] = up[b][:, mask].mean(1)
    return means


@pytest.mark.parametrize("h", [4, 5, 7])
def test_region_means_equal_upsample_then_mask(h):
    g = torch.Generator().manual_seed(h)
    feat = torch.rand(2, 3, h, h, generator=g)
    label = torch.randint(0, 4, (2, 16, 16), generator=g)
    label[1][label[1] == 2] = 1  # an absent class in one image
    means, areas = S.region_means(feat, label, 4)
    torch.testing.assert_close(means, direct_region_means(feat, label, 4))
    assert torch.equal(areas, torch.stack([(label == c).sum((1, 2)) for c in range(4)], 1).double())


def test_semantic_known_answer():
    # 2x2 feature cells upsampled to a 4x4 label; class 7 = the top-right 2x2 block, class 0 the rest
    f_out = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]]])[None]  # C=2
    f_gt = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[1.0, 2.0], [1.0, 1.0]]])[None]
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    label[0, :2, 2:] = 7
    # class 0: out mean (1, 0), gt mean (1, 1) -> cos = 1/sqrt2, area 12/16
    # class 7: out (0, 1), gt (0, 2) -> cos = 1, area 4/16
    expect = 12 / 16 / math.sqrt(2) + 4 / 16
    assert float(S.semantic_consistency(f_out, f_gt, label)) == pytest.approx(expect)
    # a zero mean vector counts as cosine 0 (sklearn normalize semantics)
    assert float(S.semantic_consistency(f_out * 0, f_gt, label)) == 0.0


def test_style_known_answer():
    f_out = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]]])[None]
    f_ex = torch.tensor([[[3.0, 3.0], [0.0, 0.0]], [[3.0, 3.0], [5.0, 0.0]]])[None]
    lo = torch.zeros(1, 4, 4, dtype=torch.long)
    lo[0, :2, 2:] = 7  # output: class 7 top-right (4 px), class 2 bottom (8 px), class 0 rest
    lo[0, 2:, :] = 2
    le = torch.zeros(1, 4, 4, dtype=torch.long)
    le[0, :2, :] = 7  # exemplar: class 7 the top half, class 0 the bottom (class 2 absent)
    # shared non-zero classes: only 7. out mean over its region: cell (0,1) -> (0, 1);
    # exemplar mean over the top half: cells (0,0), (0,1) -> (3, 3): cos = 1/sqrt2, weight 4/4
    assert float(T.style_relevance(f_out, f_ex, lo, le)) == pytest.approx(1 / math.sqrt(2))
    le[0, :2, :] = 0  # no shared non-zero class -> 0
    assert float(T.style_relevance(f_out, f_ex, lo, le)) == 0.0
    # two shared classes weighted by the output's pixels: 7 (4 px, cos 1) and 2 (8 px, cos 0)
    le[0, :2, :] = 7
    le[0, 2:, :] = 2
    f_ex2 = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])[None]
    # out class 2 mean = bottom cells (1,0),(1,1) -> (1, 0); ex class 2 -> (1, 0): cos 1
    # out class 7 mean (0, 1); ex class 7 = top cells -> (0, 1): cos 1 -> 1
    assert float(T.style_relevance(f_out, f_ex2, lo, le)) == pytest.approx(1.0)
    f_ex3 = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])[None]
    # class 2: (1, 0) vs (0, 1) -> 0 with weight 8/12; class 7: 1 with weight 4/12
    assert float(T.style_relevance(f_out, f_ex3, lo, le)) == pytest.approx(4 / 12)


def test_resize_conventions_match_pil():
    lab = np.random.RandomState(0).randint(0, 9, (24, 24)).astype(np.uint8)
    for size in (16, 40):
        pil = np.asarray(Image.fromarray(lab).resize((size, size), Image.NEAREST))
        got = S.prepare_labels(torch.from_numpy(lab.astype(np.int64))[None], size)[0].numpy()
        np.testing.assert_array_equal(got, pil)
        img = np.random.RandomState(1).randint(0, 256, (24, 24, 3)).astype(np.uint8)
        pil_img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)).astype(np.float64)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
        ours = ((S.prepare_images(x, size)[0].permute(1, 2, 0).numpy() + 1) * 127.5)
        assert np.abs(ours - pil_img).max() <= 1.0 + 1e-4


def _batch(seed, n=2, size=32, classes=4):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    label = torch.randint(0, classes, (n, 4, 4), generator=g)
    label = F.interpolate(label[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    return img, label


def test_sem_consistency_is_one_for_output_equal_gt_and_lower_otherwise():
    gt, label = _batch(1)
    other, _ = _batch(2)
    same, diff = S.SemanticConsistency(_ctx()), S.SemanticConsistency(_ctx())
    same.update({"image": gt, "label": label}, MethodOutput(output=gt))
    diff.update({"image": gt, "label": label}, MethodOutput(output=other))
    s, d = same.compute(), diff.compute()
    assert set(s) == {"sem_consistency", "sem_consistency_relu3_2", "sem_consistency_relu4_2",
                      "sem_consistency_relu5_2"}
    for k in s:
        assert s[k] == pytest.approx(1.0, abs=1e-6)
        assert d[k] < s[k]
    assert d["sem_consistency"] == pytest.approx(np.mean([d[f"sem_consistency_{l}"] for l in S.SEM_LAYERS]))
    assert same.provenance == {"vgg19": "untrained(seed=0)"} and same.settings["resolution"] == 32
    g = S.SemanticConsistencyGlobal(_ctx())
    g.update({"image": gt}, MethodOutput(output=gt))
    assert g.compute()["sem_consistency_global"] == pytest.approx(1.0, abs=1e-6)


def test_style_relevance_end_to_end():
    ex, label = _batch(3)
    other, _ = _batch(4)
    m, d = T.StyleRelevance(_ctx()), T.StyleRelevance(_ctx())
    m.update({"exemplar": ex, "label": label, "exemplar_label": label}, MethodOutput(output=ex))
    d.update({"exemplar": ex, "label": label, "exemplar_label": label}, MethodOutput(output=other))
    r, q = m.compute(), d.compute()
    assert set(r) == {"style_color", "style_texture"}
    assert r["style_color"] == pytest.approx(1.0, abs=1e-6) and r["style_texture"] == pytest.approx(1.0, abs=1e-6)
    assert q["style_color"] < 1.0
    g = T.StyleRelevanceGlobal(_ctx())
    g.update({"exemplar": ex}, MethodOutput(output=ex))
    assert g.compute() == pytest.approx({"style_color_global": 1.0, "style_texture_global": 1.0}, abs=1e-6)
    with pytest.raises(ValueError, match="exemplar_label"):
        T.StyleRelevance(_ctx()).update({"exemplar": ex, "label": label}, MethodOutput(output=ex))


def test_unsupported_without_labels_and_missing_weights(tmp_path):
    no_label = _info(num_classes=None)
    assert "label" in S.SemanticConsistency.unsupported_reason(no_label, False)
    assert "label" in T.StyleRelevance.unsupported_reason(no_label, False)
    assert S.SemanticConsistencyGlobal.unsupported_reason(no_label, False) is None
    assert T.StyleRelevanceGlobal.unsupported_reason(no_label, False) is None
    with pytest.raises(MissingWeightsError) as e:
        S.SemanticConsistency(_ctx(backbones=BackboneSettings(weights_dir=str(tmp_path), download=False)))
    assert "vgg19-dcbb9e9d.pth" in str(e.value) and "download.pytorch.org" in str(e.value)


# ---------------------------------------------------------------------------------------------
# backbone option: the authors' Caffe VGG19
# ---------------------------------------------------------------------------------------------
def test_backbone_caffe_is_the_caffe_vgg_and_recorded():
    gt, label = _batch(1)
    other, _ = _batch(2)
    feed = ({"image": gt, "label": label}, MethodOutput(output=other))
    caffe = S.SemanticConsistency(_ctx(options={"backbone": "caffe"}))
    caffe.update(*feed)
    got = caffe.compute()
    assert caffe.provenance == {"vgg19_caffe": "untrained(seed=0)"}
    assert caffe.settings["backbone"].startswith("Caffe VGG19 architecture, seeded random init")
    # reference: the Caffe VGG19 on the protocol's images, the region cosine per layer
    vgg = VGG19Features("caffe", S.SEM_LAYERS, UNTRAINED)
    f_out, f_gt = vgg(S.prepare_images(other, 32)), vgg(S.prepare_images(gt, 32))
    per_layer = {l: float(S.semantic_consistency(f_out[l], f_gt[l], label).mean()) for l in S.SEM_LAYERS}
    assert got == pytest.approx({**{f"sem_consistency_{l}": v for l, v in per_layer.items()},
                                 "sem_consistency": np.mean(list(per_layer.values()))}, rel=1e-12)
    tv = S.SemanticConsistency(_ctx())  # default: torchvision, a different network
    tv.update(*feed)
    assert tv.compute()["sem_consistency"] != pytest.approx(got["sem_consistency"], rel=1e-6)
    assert tv.provenance == {"vgg19": "untrained(seed=0)"} and tv.settings["backbone"].startswith("torchvision")
    style = T.StyleRelevanceGlobal(_ctx(options={"backbone": "caffe"}))
    assert style.provenance == {"vgg19_caffe": "untrained(seed=0)"}


def test_backbone_option_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown options \['bogus'\]; valid: backbone, resolution"):
        S.SemanticConsistency(_ctx(options={"bogus": 1}))
    with pytest.raises(ValueError, match="backbone must be one of"):
        T.StyleRelevance(_ctx(options={"backbone": "imagenet"}))
    # the Caffe file is never downloaded; without it (and without allow_untrained) the metric
    # fails at construction, naming the file
    with pytest.raises(MissingWeightsError, match="vgg19_conv.pth"):
        S.SemanticConsistency(_ctx(backbones=BackboneSettings(weights_dir=str(tmp_path)), options={"backbone": "caffe"}))


# ---------------------------------------------------------------------------------------------
# VGG features shared by the metrics of one evaluation
# ---------------------------------------------------------------------------------------------
VGG_METRICS = ("sem_consistency", "sem_consistency_global", "style_relevance", "style_relevance_global")


class _Stub(torch.nn.Module):
    def generate(self, batch):
        return MethodOutput(output=torch.roll(batch["image"], 1, dims=3).flip(2))


def _loader(n_batches=2, n=2):
    out = []
    for i in range(n_batches):
        img, label = _batch(10 + i, n=n)
        ex, ex_label = _batch(20 + i, n=n)
        out.append({"image": img, "cond": img, "label": label, "exemplar": ex, "exemplar_label": ex_label})
    return out


def _evaluate(names, options, loader, ctx=None):
    """evaluate() as a trial runs it: one context, per-metric options via dataclasses.replace."""
    ctx = ctx or _ctx()
    metrics = {n: METRICS.get(n)(dataclasses.replace(ctx, options={"resolution": 32, **options.get(n, {})}))
               for n in names}
    values, _ = evaluate(_Stub(), loader, metrics, torch.device("cpu"))
    return values, metrics


@pytest.mark.parametrize("options", [
    {},
    # mixed backbones and resolutions: only identical (backbone, image set, resolution) share
    {"sem_consistency": {"backbone": "caffe"}, "style_relevance_global": {"resolution": 16}},
])
def test_shared_features_give_exactly_the_values_of_each_metric_alone(options):
    loader = _loader()
    shared, metrics = _evaluate(VGG_METRICS, options, loader)
    alone = {}
    for name in VGG_METRICS:  # each with its own context (own memo): nothing shared
        alone.update(_evaluate([name], options, loader)[0])
    assert shared == alone  # exactly
    assert len({id(m.ctx.memo) for m in metrics.values()}) == 1
    settings = {n: m.settings for n, m in metrics.items()}
    assert settings["sem_consistency"]["backbone"].startswith("Caffe") == bool(options)
    assert settings["style_relevance"]["backbone"].startswith("torchvision")


def test_vgg_runs_once_per_image_set_and_batch(monkeypatch):
    calls = []
    forward = VGG19Features.forward

    def counting(self, x):
        calls.append((self.backbone, x.shape[0], tuple(self.layers)))
        return forward(self, x)

    monkeypatch.setattr(VGG19Features, "forward", counting)
    loader = _loader(n_batches=3, n=2)
    ctx = _ctx()
    _evaluate(["sem_consistency", "sem_consistency_global"], {}, loader, ctx)
    # per batch: the outputs once and the ground truths once (before: each metric ran both)
    assert len(calls) == 2 * 3 and all(n == 2 for _, n, _ in calls)
    assert not ctx.memo._values  # dropped after every batch
    calls.clear()
    _evaluate(VGG_METRICS, {}, loader)
    # outputs (for relu1_2 ... relu5_2), ground truths (relu3_2 ... 5_2), exemplars (relu1_2, 2_2)
    assert len(calls) == 3 * 3
    assert sorted(set(len(layers) for _, _, layers in calls)) == [2, 3, 5]


def test_eval_memo_is_per_batch():
    memo = EvalMemo()
    assert memo.resource("r", object) is memo.resource("r", object)
    n = []
    compute = lambda: n.append(1) or len(n)  # noqa: E731
    batch, x = {}, torch.zeros(2)
    assert memo.per_batch(batch, "k", x, compute) == 1
    assert memo.per_batch(batch, "k", x, compute) == 1  # reused
    assert memo.per_batch(batch, "k", x.clone(), compute) == 2  # another tensor
    assert memo.per_batch(batch, "other", x, compute) == 3  # another key
    x.add_(1)  # changed in place: not the same images any more
    assert memo.per_batch(batch, "k", x, compute) == 4
    assert memo.per_batch({}, "k", x, compute) == 5  # a new batch drops the old values
    assert len(memo._values) == 1
    memo.end_batch()
    assert not memo._values and memo.per_batch(batch, "k", x, compute) == 6
