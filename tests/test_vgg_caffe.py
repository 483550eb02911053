"""The one Caffe VGG19 (methods/common/vgg_caffe.py): preprocessing by hand, loading the official
file layout (a synthetic state dict with random values: a loader test, not a pretrained network)
against an F.conv2d reference, strictness, missing-file errors, seeded random init, and the
wrapper giving both backbones under the same layer names."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from methods.base import BackboneSettings
from methods.common import vgg_caffe as V
from methods.common import weights as W

UNTRAINED = BackboneSettings(allow_untrained=True, download=False, seed=0)
FIVE = ("relu1_2", "relu2_2", "relu3_2", "relu4_2", "relu5_2")


@pytest.fixture(autouse=True)
def _offline(offline_weights):
    torch.set_num_threads(1)


def official_state(seed: int = 0, convs=V.CONVS):
    """Random weights in the official key layout (conv1_1.weight ... conv5_4.bias), He-scaled so
    activations stay moderate through 16 convs."""
    g = torch.Generator().manual_seed(seed)
    chans = {b: (cin, cout) for b, (cin, cout, _) in enumerate(V.BLOCKS, start=1)}
    state = {}
    for name in convs:
        b, i = int(name[4]), int(name[6])
        cin, cout = chans[b][0] if i == 1 else chans[b][1], chans[b][1]
        state[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
        state[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.1
    return state


def reference_forward(state, x):
    """The official VGG19_feature_color_torchversion by hand: Caffe input, conv+relu, max pool."""
    mean = torch.tensor([0.40760392, 0.45795686, 0.48501961], dtype=x.dtype).view(1, 3, 1, 1)
    h = (((x + 1) / 2)[:, [2, 1, 0]] - mean) * 255
    out = {}
    for name in V.CONVS[:14]:
        if name.endswith("_1") and name != "conv1_1":
            h = F.max_pool2d(h, kernel_size=2, stride=2)
        h = F.relu(F.conv2d(h, state[f"{name}.weight"], state[f"{name}.bias"], padding=1))
        out["relu" + name[4:]] = h
    return out


def test_caffe_preprocess_by_hand():
    # one pixel per channel value: RGB (-1, 0, 1) -> [0, 1]: (0, .5, 1) -> BGR (1, .5, 0)
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    got = V.caffe_preprocess(x).flatten().tolist()
    # 255 * (1 - 0.40760392), 255 * (0.5 - 0.45795686), 255 * (0 - 0.48501961): the Caffe mean
    # 103.939 / 116.779 / 123.68 subtracted from 255, 127.5 and 0
    assert got == pytest.approx([151.061, 10.721, -123.68], abs=1e-3)


def test_loads_official_layout_and_equals_conv2d_reference(tmp_path):
    state = official_state()  # all 16 convs, as the real file: conv5_3 / conv5_4 are ignored
    torch.save(state, tmp_path / V.CAFFE_FILE)
    vgg = V.VGG19Features("caffe", FIVE, BackboneSettings(weights_dir=str(tmp_path), download=False))
    assert vgg.provenance == "sha256:" + hashlib.sha256((tmp_path / V.CAFFE_FILE).read_bytes()).hexdigest()
    assert torch.equal(vgg._caffe.conv4_3.weight, state["conv4_3.weight"])
    assert not hasattr(vgg._caffe, "conv5_3")  # only the convs up to relu5_2 are built
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    feats, ref = vgg(x), reference_forward(state, x)
    assert list(feats) == list(FIVE)
    for layer in FIVE:
        torch.testing.assert_close(feats[layer], ref[layer], rtol=1e-4, atol=1e-4)
    assert feats["relu5_2"].shape == (2, 512, 1, 1)
    # frozen, shared, and kept out of checkpoints
    assert all(not p.requires_grad for p in vgg._caffe.parameters())
    assert not vgg.state_dict() and not list(vgg.parameters())
    # layers come back in the requested order, computed only as deep as needed
    two = V.VGG19Features("caffe", ("relu2_2", "relu1_1"), BackboneSettings(weights_dir=str(tmp_path), download=False))
    out = two(x)
    assert list(out) == ["relu2_2", "relu1_1"]
    torch.testing.assert_close(out["relu2_2"], ref["relu2_2"], rtol=1e-4, atol=1e-4)


def test_strict_on_the_convs_used(tmp_path):
    short = tmp_path / "short"  # a file holding only conv1_1 ... conv2_2
    short.mkdir()
    torch.save(official_state(convs=V.CONVS[:4]), short / V.CAFFE_FILE)
    settings = BackboneSettings(weights_dir=str(short), download=False)
    assert V.VGG19Features("caffe", ("relu1_2", "relu2_2"), settings).provenance.startswith("sha256:")
    with pytest.raises(ValueError, match=r"vgg19_conv.pth.*conv3_1.weight"):
        V.VGG19Features("caffe", ("relu3_2",), settings)
    bad = tmp_path / "bad"  # right keys, wrong shape
    bad.mkdir()
    state = official_state(convs=V.CONVS[:4])
    state["conv2_1.weight"] = state["conv2_1.weight"][:, :32]
    torch.save(state, bad / V.CAFFE_FILE)
    with pytest.raises(ValueError, match=r"(?s)not the official vgg19_conv.pth.*size mismatch for conv2_1"):
        V.VGG19Features("caffe", ("relu2_2",), BackboneSettings(weights_dir=str(bad), download=False))
    with pytest.raises(ValueError, match="unknown Caffe VGG19 layers"):
        V.VGG19Features("caffe", ("relu6_1",), UNTRAINED)


def test_missing_file_is_never_downloaded_and_names_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_OFFLINE", raising=False)

    def no_download(*a, **k):
        raise AssertionError("vgg19_conv.pth must never be downloaded")

    monkeypatch.setattr(W, "_download", no_download)
    with pytest.raises(W.MissingWeightsError) as e:
        V.VGG19Features("caffe", FIVE, BackboneSettings(weights_dir=str(tmp_path), download=True), purpose="a test")
    msg = str(e.value)
    assert "vgg19_conv.pth" in msg and str(tmp_path) in msg and "drive.google.com" in msg and "a test" in msg


def test_untrained_is_seeded_labelled_and_keeps_the_global_rng():
    rng = torch.random.get_rng_state()
    a = V.VGG19Features("caffe", FIVE, BackboneSettings(allow_untrained=True, download=False, seed=3))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert a.provenance == "untrained(seed=3)" and W.is_untrained(a.provenance)
    b = V.VGG19Features("caffe", ("relu2_2",), BackboneSettings(allow_untrained=True, download=False, seed=3))
    c = V.VGG19Features("caffe", ("relu2_2",), BackboneSettings(allow_untrained=True, download=False, seed=4))
    # the same seed gives the same convs whatever the depth (the init the methods always used:
    # torch's default Conv2d init, convs created in order after manual_seed)
    assert torch.equal(a._caffe.conv2_2.weight, b._caffe.conv2_2.weight)
    assert not torch.equal(b._caffe.conv2_2.weight, c._caffe.conv2_2.weight)
    torch.manual_seed(3)
    first = torch.nn.Conv2d(3, 64, 3, padding=1)
    torch.random.set_rng_state(rng)
    assert torch.equal(a._caffe.conv1_1.weight, first.weight)


def test_both_backbones_give_the_same_layer_names():
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    tv = V.VGG19Features("torchvision", FIVE, UNTRAINED)
    caffe = V.VGG19Features("caffe", FIVE, UNTRAINED)
    ft, fc = tv(x), caffe(x)
    assert list(ft) == list(fc) == list(FIVE)
    assert [t.shape for t in ft.values()] == [t.shape for t in fc.values()]
    assert not torch.allclose(ft["relu1_2"], fc["relu1_2"])  # different weights and preprocessing
    with pytest.raises(ValueError, match="backbone must be one of"):
        V.VGG19Features("imagenet", FIVE, UNTRAINED)


def test_given_state_dict_builds_a_private_network_in_its_dtype():
    """Official-layout weights handed over directly (the parity runner's vggnet_fix): loaded
    strictly into an uncached network of the state dict's dtype."""
    state = {k: v.double() for k, v in official_state().items()}
    vgg = V.VGG19Features("caffe", FIVE, UNTRAINED, state_dict=state)
    assert vgg.provenance == "given state dict" and vgg._caffe.conv1_1.weight.dtype == torch.float64
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    feats, ref = vgg(x), reference_forward(state, x)
    for layer in FIVE:
        torch.testing.assert_close(feats[layer], ref[layer], rtol=1e-12, atol=1e-10)
    shared, _ = V.load_caffe_vgg19(UNTRAINED, FIVE)
    assert vgg._caffe is not shared
    with pytest.raises(ValueError, match="missing keys"):
        V.VGG19Features("caffe", FIVE, UNTRAINED, state_dict={k: v for k, v in state.items() if "conv5" not in k})
    with pytest.raises(ValueError, match="only supported for the caffe backbone"):
        V.VGG19Features("torchvision", FIVE, UNTRAINED, state_dict=state)


def test_a_network_built_on_the_meta_device_is_never_handed_out_for_real_use():
    settings = BackboneSettings(allow_untrained=True, download=False, seed=11)
    with torch.device("meta"):  # e.g. a converter check building a method on meta
        meta, _ = V.load_caffe_vgg19(settings, FIVE)
    real, _ = V.load_caffe_vgg19(settings, FIVE)
    assert meta.conv1_1.weight.device.type == "meta" and real.conv1_1.weight.device.type == "cpu"
