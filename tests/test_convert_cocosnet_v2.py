"""The CoCosNet v2 converter (methods/cocosnet_v2/convert.py) against the full-width manifests of the
official release (../shared/parity/cocosnet_v2/manifests, no weights: meta tensors), its error
reporting, the broken release zip, and the official options it resolves."""
from __future__ import annotations

import json
import math
import zipfile

import pytest
import torch

from bench.parity.fixtures import parity_dir
from methods.cocosnet_v2.convert import RELEASES, convert, convert_state_dicts
from methods.cocosnet_v2.model import CoCosNetV2Method, CoCosNetV2Options
from methods.common import vgg_caffe
from methods.common.convert import (ConversionError, build_converted, check_state_dict, load_official_file,
                                    meta_state_dict)

MANIFESTS = parity_dir() / "cocosnet_v2" / "manifests"
RELEASE = MANIFESTS / "deepfashionHD.json"
needs_manifests = pytest.mark.skipif(not RELEASE.is_file(), reason=f"no CoCosNet v2 manifests under {MANIFESTS} "
                                     "(set BENCH_PARITY_DIR)")


def _configs():
    if not RELEASE.is_file():
        return []
    return sorted(json.loads(RELEASE.read_text())["configs"])


def _config(name):
    return json.loads(RELEASE.read_text())["configs"][name]


@pytest.fixture(autouse=True)
def _private_vgg_cache(monkeypatch):
    """Building a training model on the meta device builds its loss VGG there too: keep that
    network out of the process-wide cache of the Caffe VGG."""
    monkeypatch.setattr(vgg_caffe, "_CACHE", {})


@needs_manifests
@pytest.mark.parametrize("config", _configs())
def test_every_manifest_config_converts_completely(config):
    c = _config(config)
    official = {net: meta_state_dict(keys) for net, keys in c["networks"].items()}
    conv = convert(official, c["options"])
    m = build_converted(CoCosNetV2Method, conv, training="netD" in official)
    # every official key consumed or deliberately dropped, every shape right, nothing of ours missing
    check_state_dict(m.state_dict(), conv.state_dict, f"cocosnet_v2 {config}")
    dropped = set(conv.dropped)
    assert ("netD: discriminator_*.dec.*" in dropped) == ("netD" in official)
    assert conv.context == {"resolution": 512, "cond_channels": 20, "num_classes": None,
                            "dataset": "deepfashion", "variant": "hd"}
    o = CoCosNetV2Options(**conv.options)
    assert (o.levels, o.nef, o.iterations, o.temperature) == ((8, 4, 2, 1), 32, 5, 0.01)
    if c["options"]["isTrain"]:  # the README training command
        assert (o.lambda_corr, o.lambda_warp_cycle, o.real_reference_probability, o.use_target_as_gt) == (
            500.0, 1.0, 1.0, True)


@needs_manifests
def test_release_table_matches_the_manifest():
    manifest = json.loads(RELEASE.read_text())
    release = RELEASES["deepfashionHD"]
    assert sorted(release.files.values()) == sorted(p.rsplit("/", 1)[-1] for p in manifest["released_files"])
    test = manifest["configs"]["test"]
    assert release.command == test["command"]
    assert {k: v for k, v in release.options.items() if not (isinstance(v, float) and math.isinf(v))} == {
        k: v for k, v in test["options"].items() if not (isinstance(v, float) and math.isinf(v))}
    assert (release.dataset, release.variant, release.optional_files) == ("deepfashion", "hd", ("netD",))


@pytest.mark.skipif(not (MANIFESTS / "vgg19_conv.json").is_file(), reason=f"no vgg19_conv manifest under {MANIFESTS}")
def test_vgg19_conv_layout_loads_into_the_caffe_vgg():
    manifest = json.loads((MANIFESTS / "vgg19_conv.json").read_text())
    keys = next(iter(manifest["configs"].values()))["networks"]["vggnet_fix"]
    net = vgg_caffe.CaffeVGG19()  # every conv of the file
    check_state_dict(net.state_dict(), meta_state_dict(keys), "vgg19_conv.pth")


def test_unknown_keys_and_networks_are_one_error_naming_all():
    official = {"netCorr": {"theta_0.weight": torch.zeros(1), "patch_match.refine_net.mystery.weight": torch.zeros(1),
                            "adaptive_model_seg.layer9.weight": torch.zeros(1)},
                "netE": {"x": torch.zeros(1)}}
    with pytest.raises(ConversionError) as err:
        convert_state_dicts(official)
    text = str(err.value)
    assert "patch_match.refine_net.mystery.weight" in text and "adaptive_model_seg.layer9.weight" in text
    assert "unknown network: netE" in text and "theta_0.weight" not in text


@needs_manifests
def test_missing_and_misshaped_keys_are_one_error_naming_all():
    c = _config("test")
    official = {net: meta_state_dict(keys) for net, keys in c["networks"].items()}
    del official["netG"]["up_3.conv_1.bias"]
    official["netCorr"]["phi_2.weight"] = torch.empty(32, 65, 1, 1, device="meta")
    conv = convert(official, c["options"])
    m = build_converted(CoCosNetV2Method, conv)
    with pytest.raises(ConversionError) as err:
        check_state_dict(m.state_dict(), conv.state_dict, "release")
    text = str(err.value)
    assert "netG.up_3.conv_1.bias" in text and "phi.2.weight: (32, 65, 1, 1)" in text


def test_the_broken_release_zip_is_repaired_and_converted(tmp_path):
    """The released latest_net_Corr.pth also holds latest_net_D.pth / latest_net_G.pth records
    outside its archive folder; torch.load rejects it, load_official_file reads it."""
    g = torch.Generator().manual_seed(0)
    state = {"patch_match.refine_net.gru.convz1.weight": torch.randn(32, 96, 1, 5, generator=g),
             "patch_match.initial_layer.0.bias": torch.randn(32, generator=g),
             "theta_3.weight": torch.randn(32, 32, 1, 1, generator=g)}
    path = tmp_path / "latest_net_Corr.pth"
    torch.save(state, path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("latest_net_D.pth", b"\0" * 64)
        z.writestr("latest_net_G.pth", b"\0" * 64)
    with pytest.raises(RuntimeError, match="not in a subdirectory"):
        torch.load(path, weights_only=True)
    loaded = load_official_file(path)
    ours, _ = convert_state_dicts({"netCorr": loaded})
    assert torch.equal(ours["pm.refiner.cell.convz1.weight"], state["patch_match.refine_net.gru.convz1.weight"])
    assert torch.equal(ours["pm.refiner.initial_layer.0.bias"], state["patch_match.initial_layer.0.bias"])
    assert torch.equal(ours["theta.3.weight"], state["theta_3.weight"])


def test_shared_prelu_takes_the_value_the_official_load_keeps():
    a, b = torch.tensor([0.1]), torch.tensor([0.3])
    ours, dropped = convert_state_dicts({"netCorr": {"adaptive_model_img.layer4.1.relu.weight": a,
                                                     "adaptive_model_img.layer4.1.model.3.weight": b}})
    assert ours == {"enc_b.downs.1.1.model.3.weight": b, "enc_b.downs.1.1.relu.weight": b}
    assert list(dropped) == ["netCorr: adaptive_model_*.layer*.1.relu.weight"]


@needs_manifests
def test_options_the_implementation_does_not_reproduce_are_refused():
    opts = dict(_config("train")["options"], match_kernel=3, PONO_C=False)
    with pytest.raises(ConversionError) as err:
        convert({}, opts)
    assert "match_kernel=3" in str(err.value) and "PONO_C=False" in str(err.value)


@needs_manifests
def test_cycle_warp_follows_the_official_phase_gate():
    train = _config("train")["options"]
    assert convert({}, train).options["lambda_warp_cycle"] == 1.0
    assert convert({}, dict(train, phase="val")).options["lambda_warp_cycle"] == 0.0
    assert "lambda_warp_cycle" not in convert({}, _config("test")["options"]).options  # test: no cycle weight
