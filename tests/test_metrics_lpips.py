"""LPIPS metrics: plumbing checked against the lpips package called directly, and known answers.

The trunk is lpips' seeded random AlexNet (allow_untrained); the weight-loading path is checked by
mapping a torchvision AlexNet state dict into lpips' trunk and comparing activations. Offline.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from bench.metrics import lpips_metric as L
from bench.metrics.base import MetricContext
from datasets.base import DataInfo
from methods.base import BackboneSettings, MethodOutput
from methods.common.weights import MissingWeightsError

UNTRAINED = BackboneSettings(allow_untrained=True, download=False, seed=0)


pytestmark = pytest.mark.usefixtures("offline_weights")


def _ctx(options=None, backbones=UNTRAINED):
    info = DataInfo(name="t", variant="default", split="test", size=4, resolution=32, cond_channels=1)
    return MetricContext(data=info, device=torch.device("cpu"), backbones=backbones, cache_dir=None,
                         data_key="t", options=options or {})


def _imgs(n, seed, size=32):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def _direct(a, b):
    """lpips called directly on the uint8-quantised images (lpips.im2tensor convention)."""
    net, _ = L.load_lpips(UNTRAINED, torch.device("cpu"))
    q = lambda x: torch.from_numpy(((x.clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
                                   ).float() / 127.5 - 1
    with torch.no_grad():
        return net(q(a), q(b)).flatten()


def test_trunk_mapping_reproduces_torchvision_alexnet():
    from torchvision.models import alexnet

    torch.manual_seed(3)
    tv = alexnet(weights=None).eval()
    net, _ = L.load_lpips(UNTRAINED, torch.device("cpu"))
    import copy

    lp = copy.deepcopy(net)
    lp.net.load_state_dict(L.trunk_state(lp, tv.state_dict()), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = lp.net(x)
        assert torch.allclose(outs[4], tv.features[:12](x))  # relu5 = features up to index 11
        assert torch.allclose(outs[0], tv.features[:2](x))


def test_provenance_and_missing_weights(tmp_path):
    net, prov = L.load_lpips(UNTRAINED, torch.device("cpu"))
    assert prov["lpips_alexnet_trunk"] == "untrained(seed=0)"
    assert prov["lpips_lin_v0.1_alex"].startswith("sha256:") and len(prov["lpips_lin_v0.1_alex"]) == 71
    with pytest.raises(MissingWeightsError) as e:
        L.LPIPSGroundTruth(_ctx(backbones=BackboneSettings(weights_dir=str(tmp_path), download=False)))
    assert L.ALEXNET_FILE in str(e.value) and L.ALEXNET_URL in str(e.value)


def test_lpips_gt_matches_direct_and_zero_for_identity():
    gt, out = _imgs(4, 1), _imgs(4, 2)
    m = L.LPIPSGroundTruth(_ctx())
    m.update({"image": gt[:2]}, MethodOutput(output=out[:2]))
    m.update({"image": gt[2:], "target": gt[2:]}, MethodOutput(output=out[2:]))
    got = m.compute()["lpips_gt"]
    assert got == pytest.approx(float(_direct(out, gt).mean()), rel=1e-5)
    assert got > 0
    same = L.LPIPSGroundTruth(_ctx())
    same.update({"image": gt}, MethodOutput(output=gt))
    assert same.compute()["lpips_gt"] == 0.0
    assert m.settings["n_inputs"] == 4 and m.settings["net"] == "alex" and m.settings["version"] == "0.1"


def _diversity_batch(b, k, seed=0, distinct=True):
    exemplars = _imgs(b, 100 + seed)
    if not distinct:
        exemplars[1] = exemplars[0]
    outs = [MethodOutput(output=_imgs(b, 10 * seed + j)) for j in range(k)]
    return {"exemplar": exemplars}, outs


def test_diversity_mean_over_all_pairs():
    batch, outs = _diversity_batch(4, 3)
    m = L.LPIPSDiversity(_ctx(options={"k": 3}))
    assert m.exemplars_per_input == 3
    m.update_multi(batch, outs)
    per_pair = torch.stack([_direct(outs[a].output, outs[b].output) for a, b in itertools.combinations(range(3), 2)])
    assert m.compute()["lpips_diversity"] == pytest.approx(float(per_pair.mean(0).mean()), rel=1e-5)
    assert m.settings["k"] == 3 and m.settings["pairs"] == 12 and m.settings["pairs_skipped_same_exemplar"] == 0


def test_diversity_identical_outputs_zero_and_same_exemplar_pairs_skipped():
    batch, outs = _diversity_batch(4, 3)
    m = L.LPIPSDiversity(_ctx(options={"k": 3}))
    m.update_multi(batch, [outs[0]] * 3)
    assert m.compute()["lpips_diversity"] == 0.0
    # batch of 2 with k=3: rolls 0 and 2 give the same exemplar -> that pair is skipped
    batch, outs = _diversity_batch(2, 3, seed=1)
    m = L.LPIPSDiversity(_ctx(options={"k": 3}))
    m.update_multi(batch, outs)
    usable = [(0, 1), (1, 2)]
    expect = torch.stack([_direct(outs[a].output, outs[b].output) for a, b in usable]).mean(0).mean()
    assert m.compute()["lpips_diversity"] == pytest.approx(float(expect), rel=1e-5)
    assert m.settings["pairs_skipped_same_exemplar"] == 2 and m.settings["pairs"] == 4


def test_diversity_guards():
    with pytest.raises(ValueError, match="k >= 2"):
        L.LPIPSDiversity(_ctx(options={"k": 1}))
    m = L.LPIPSDiversity(_ctx(options={"k": 2}))
    one = {"exemplar": _imgs(1, 5)}
    m.update_multi(one, [MethodOutput(output=_imgs(1, 6)), MethodOutput(output=_imgs(1, 7))])
    with pytest.raises(ValueError, match="at least 2 distinct exemplars"):
        m.compute()
    assert m.inputs_skipped == 1
