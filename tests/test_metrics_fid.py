"""FID / KID through clean-fid: each pipeline stage checked against something independent.

* features: our in-memory path == clean-fid's own folder path (PNG files -> ResizeDataset ->
  get_batch_features) with the same network;
* statistics -> number: known answers for Gaussian features;
* the metric classes: the right sets reach the Fréchet formula (a spy on
  ``frechet_distance_stats``), KID of identical sets ~ 0 and of shifted sets > 0, real-feature
  caching across "trials", guards.

The Fréchet and KID functions themselves are compared with clean-fid's in tests/test_frechet.py
and tests/test_kernel_distance.py. Networks are seeded random stand-ins (allow_untrained);
nothing touches the network.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from bench.metrics import fid as F
from bench.metrics.base import MetricContext
from bench.metrics.feature_cache import FeatureBank
from datasets.base import DataInfo
from methods.base import BackboneSettings, MethodOutput
from methods.common.weights import MissingWeightsError

UNTRAINED = BackboneSettings(allow_untrained=True, download=False, seed=0)


@pytest.fixture(autouse=True)
def _offline(offline_weights, monkeypatch, tmp_path):
    monkeypatch.setattr(F, "CLEANFID_TMP_DIR", tmp_path / "no_cleanfid_tmp")
    torch.set_num_threads(1)


def _images(n, seed, size=32):
    """Smooth random images (uint8 HWC) so features vary with content."""
    rs = np.random.RandomState(seed)
    low = rs.uniform(0, 255, (n, 3, 4, 4)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(low), size=(size, size), mode="bilinear",
                                         align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _to_pm1(u8):
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.mark.parametrize("mode", ["clean", "legacy_pytorch"])
def test_features_match_cleanfid_folder_pipeline(tmp_path, mode):
    ex = F.get_extractor(mode, UNTRAINED, torch.device("cpu"))
    imgs = _images(3, seed=1)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    from cleanfid.fid import get_folder_features

    ref = get_folder_features(str(folder), model=ex.net, num_workers=0, batch_size=8, device=torch.device("cpu"),
                              mode=mode, verbose=False)
    np.testing.assert_allclose(ex(imgs), ref, rtol=1e-5, atol=1e-6)


def test_stand_in_is_seeded_and_labelled():
    a = F.get_extractor("clean", UNTRAINED, torch.device("cpu"))
    assert a.provenance == "untrained(seed=0)" and a.untrained and a.backbone.startswith("stand-in")
    s0, s0b, s1 = (F._random_fid_inception_state(s) for s in (0, 0, 1))
    assert all(torch.equal(s0[k], s0b[k]) for k in s0)
    assert not torch.equal(s0["Conv2d_1a_3x3.conv.weight"], s1["Conv2d_1a_3x3.conv.weight"])
    f = a(_images(2, seed=2))
    assert f.shape == (2, 2048) and np.isfinite(f).all() and f.std() > 0 and not np.allclose(f[0], f[1])


def test_missing_weights_error_names_file_and_url(tmp_path):
    settings = BackboneSettings(weights_dir=str(tmp_path / "w"), download=False, allow_untrained=False)
    with pytest.raises(MissingWeightsError) as e:
        F.locate_inception("clean", settings)
    msg = str(e.value)
    assert "inception-2015-12-05.pt" in msg and F._torchscript_url() in msg and str(tmp_path / "w") in msg
    with pytest.raises(MissingWeightsError, match="pt_inception-2015-12-05-6726825d.pth"):
        F.locate_inception("legacy_pytorch", settings)
    with pytest.raises(ValueError, match="unknown clean-fid mode"):
        F.locate_inception("cleanest", settings)


def test_fid_statistics_known_answer():
    """Diagonal Gaussians: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2, with sample stats."""
    rs = np.random.RandomState(0)
    a = rs.randn(400, 6) * np.sqrt([1, 2, 3, 1, 1, 4]) + 1.0
    b = rs.randn(500, 6) * 0.5
    va, vb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # make the sample covariances exactly diagonal by whitening the off-diagonals away
    a = (a - a.mean(0)) @ np.linalg.inv(np.linalg.cholesky(va)).T * np.sqrt(np.diag(va)) + a.mean(0)
    b = (b - b.mean(0)) @ np.linalg.inv(np.linalg.cholesky(vb)).T * np.sqrt(np.diag(vb)) + b.mean(0)
    expect = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum((np.sqrt(np.diag(va)) - np.sqrt(np.diag(vb))) ** 2)
    assert F.fid_from_features(a, b) == pytest.approx(expect, rel=1e-6)
    assert F.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)


def _ctx(tmp_path, n=8, seed=0, options=None):
    info = DataInfo(name="t", variant="default", split="test", size=n, resolution=32, cond_channels=1)
    return MetricContext(data=info, device=torch.device("cpu"), backbones=UNTRAINED, cache_dir=tmp_path / "cache",
                         data_key=f"t|n={n}", seed=seed, options=options or {})


def _feed(metric, gt, out, exemplars, bs=4):
    for i in range(0, len(gt), bs):
        batch = {"image": _to_pm1(gt[i:i + bs]), "exemplar": _to_pm1(exemplars[i:i + bs])}
        metric.update(batch, MethodOutput(output=_to_pm1(out[i:i + bs])))


def test_fid_metric_passes_the_right_sets_to_the_frechet_formula(tmp_path, monkeypatch):
    """Spy on frechet_distance_stats: the statistics of the outputs and of the *distinct*
    exemplars, checked against features computed independently with the extractor."""
    seen = {}

    def spy(a, b):
        seen.update(a=a, b=b)
        return 42.0

    monkeypatch.setattr(F, "frechet_distance_stats", spy)
    gt, out, ex = _images(4, 3), _images(4, 4), _images(2, 5)
    ex = np.concatenate([ex, ex])  # every exemplar used twice: the real set has 2 images
    m = F.FIDExemplars(_ctx(tmp_path, n=4))
    _feed(m, gt, out, ex, bs=2)
    assert m.compute() == {"fid_exemplars": 42.0}
    extractor = F.get_extractor("clean", UNTRAINED, torch.device("cpu"))
    f_out, f_ex = extractor(out), extractor(ex[:2])
    for stats, feats in ((seen["a"], f_out), (seen["b"], f_ex)):
        cov = np.cov(feats, rowvar=False)
        np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats.factor @ stats.factor.T, cov, rtol=1e-4, atol=1e-9)
        assert stats.trace == pytest.approx(np.trace(cov), rel=1e-4)
    assert m.settings["n_real_distinct"] == 2 and m.settings["n_generated"] == 4
    assert m.settings["mode"] == "clean" and m.settings["covariance_rank_deficient"] is True
    assert m.provenance == {"inception": "untrained(seed=0)"}


def test_kid_identical_near_zero_shifted_positive(tmp_path):
    gt = _images(6, 6)
    shifted = np.clip(gt.astype(np.int32) + 60, 0, 255).astype(np.uint8)
    same, diff = F.KIDSources(_ctx(tmp_path)), F.KIDSources(_ctx(tmp_path))
    _feed(same, gt, gt, gt, bs=3)
    _feed(diff, gt, shifted, gt, bs=3)
    k_same, k_diff = same.compute()["kid_sources"], diff.compute()["kid_sources"]
    assert k_diff > 0 and abs(k_same) < 0.05 * k_diff
    # clean-fid's KID is random over subsets; seeded here -> reproducible
    again = F.KIDSources(_ctx(tmp_path))
    _feed(again, gt, shifted, gt, bs=3)
    assert again.compute()["kid_sources"] == k_diff
    assert diff.settings["subset_size"] == 6 and diff.settings["subset_size_requested"] == 1000


def test_small_sample_guards(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        F.kid_from_features(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        F.fid_from_features(np.zeros((5, 4)), np.zeros((1, 4)))
    assert F.kid_subset_size(50, 30, 1000) == 30
    one = _images(1, 7)
    m = F.KIDSources(_ctx(tmp_path, n=1))
    _feed(m, one, one, one)
    with pytest.raises(ValueError, match="KID needs at least 2"):
        m.compute()
    with pytest.raises(ValueError, match="unknown options"):
        F.KIDSources(_ctx(tmp_path, options={"mdoe": "clean"}))


def test_real_features_cached_across_trials(tmp_path, monkeypatch, caplog):
    gt, out = _images(4, 8), _images(4, 9)
    calls = []
    orig = F.InceptionExtractor.__call__

    def counting(self, images, batch_size=32):
        calls.append(len(images))
        return orig(self, images, batch_size)

    monkeypatch.setattr(F.InceptionExtractor, "__call__", counting)
    F._FAKE_MEMO.clear()
    first = F.KIDSources(_ctx(tmp_path, n=4))
    _feed(first, gt, out, gt, bs=2)
    v1 = first.compute()["kid_sources"]
    assert sum(calls) == 8  # 4 outputs + 4 real images
    files = list((tmp_path / "cache" / "metric_features").glob("realfeats-*.npz"))
    assert len(files) == 1

    FeatureBank._shared.clear()  # a new trial process
    F._FAKE_MEMO.clear()
    calls.clear()
    caplog.set_level(logging.INFO, logger="bench.metrics.feature_cache")
    second = F.KIDSources(_ctx(tmp_path, n=4))
    _feed(second, gt[::-1].copy(), out[::-1].copy(), gt, bs=3)  # other order and batching
    # Float32 Inception features of other batch sizes and float32 sums in another order: the KID of
    # 4 samples (a difference of small kernel means) agrees to ~1e-5 relative, not bit for bit.
    assert second.compute()["kid_sources"] == pytest.approx(v1, rel=1e-4)
    assert sum(calls) == 4  # only the outputs
    assert any("reused 4 cached rows" in r.getMessage() for r in caplog.records)
    assert any("4 cached rows found" in r.getMessage() for r in caplog.records)

    # another mode, backbone or data is another key
    keys = {F.KIDSources(_ctx(tmp_path, n=4)).bank.key,
            F.KIDSources(_ctx(tmp_path, n=4, options={"mode": "legacy_pytorch"})).bank.key,
            F.KIDSources(_ctx(tmp_path, n=5)).bank.key}
    assert len(keys) == 3


def test_fid_end_to_end_identical_zero_shifted_positive(tmp_path):
    gt = _images(8, 10)
    shifted = np.clip(gt.astype(np.int32) + 60, 0, 255).astype(np.uint8)
    m = F.FIDSources(_ctx(tmp_path))
    _feed(m, gt, gt, gt)
    same = m.compute()["fid_sources"]
    m = F.FIDSources(_ctx(tmp_path))
    _feed(m, gt, shifted, gt)
    diff = m.compute()["fid_sources"]
    assert diff > 0 and abs(same) < 0.01 * diff
