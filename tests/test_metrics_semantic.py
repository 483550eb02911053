"""Semantic consistency and style relevance: hand-built known answers, a direct (upsample-then-mask)
reference for the region means, PIL for the resizing conventions, and end-to-end properties with a
seeded random VGG19 (allow_untrained; offline) at a small resolution to stay fast."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench.metrics import semantic as S
from bench.metrics import style as T
from bench.metrics.base import MetricContext
from datasets.base import DataInfo
from methods.base import BackboneSettings, MethodOutput
from methods.common.weights import MissingWeightsError

UNTRAINED = BackboneSettings(allow_untrained=True, download=False, seed=0)


@pytest.fixture(autouse=True)
def _offline(offline_weights, monkeypatch, tmp_path):
    torch.set_num_threads(1)


def _info(num_classes=4):
    return DataInfo(name="t", variant="default", split="test", size=4, resolution=32, cond_channels=1,
                    num_classes=num_classes)


def _ctx(resolution=32, backbones=UNTRAINED):
    return MetricContext(data=_info(), device=torch.device("cpu"), backbones=backbones, cache_dir=None,
                         data_key="t", options={"resolution": resolution})


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
