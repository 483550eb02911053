"""The CoCosNet v1 converter (methods/cocosnet/convert.py) against the full-width manifests of every
released configuration (``$BENCH_PARITY_DIR/cocosnet/manifests``): every official key consumed or
deliberately dropped, every shape right, on the meta device (no weights); the README test commands'
options; the Caffe VGG layout; and the errors."""
from __future__ import annotations

import json

import pytest
import torch

import methods  # noqa: F401  (registers the methods)
from bench.parity.fixtures import parity_dir
from methods.cocosnet import convert as C
from methods.cocosnet.model import CoCosNetMethod
from methods.common.convert import ConversionError, build_converted, check_state_dict, meta_state_dict
from methods.common.vgg_caffe import CONVS, CaffeVGG19

MANIFESTS = parity_dir() / "cocosnet" / "manifests"
RELEASE_FILES = sorted(MANIFESTS.glob("*.json")) if MANIFESTS.is_dir() else []
CONFIGS = [(p.stem, cfg) for p in RELEASE_FILES if p.stem in C.RELEASES for cfg in json.loads(p.read_text())["configs"]]
needs_manifests = pytest.mark.skipif(not CONFIGS, reason=f"no CoCosNet manifests under {MANIFESTS} (set BENCH_PARITY_DIR)")

torch.set_num_threads(1)


def manifest(release: str) -> dict:
    return json.loads((MANIFESTS / f"{release}.json").read_text())


def check_fits(converted, official) -> None:
    """``converted`` against our method built (on meta) from its own options: one error for every
    missing, unexpected and mis-shaped key; networks the release lacks may be absent."""
    ours = build_converted(CoCosNetMethod, converted, training="netD" in official)
    expected = {k: v for k, v in ours.state_dict().items() if not k.startswith(ours.pretrained_exclude)}
    absent = [f"{net}." for net in ("netG", "netCorr", "netD") if net not in official]
    check_state_dict(expected, converted.state_dict, "cocosnet", allow_missing=absent)


@needs_manifests
@pytest.mark.parametrize("release,config", CONFIGS, ids=[f"{r}-{c}" for r, c in CONFIGS])
def test_every_manifest_key_is_converted_or_dropped_with_the_right_shape(release, config):
    cfg = manifest(release)["configs"][config]
    official = {net: meta_state_dict(keys) for net, keys in cfg["networks"].items()}
    converted = C.convert(official, cfg["options"])
    check_fits(converted, official)
    total = sum(len(sd) for sd in official.values())
    dropped = [f"{net}.{k}" for net, sd in official.items() for k in sd if C.our_key(net, k) is None]
    assert len(converted.state_dict) + len(dropped) == total
    assert set(converted.dropped) == {C.dropped_as(k.split(".", 1)[0], k.split(".", 1)[1]) for k in dropped}
    assert all(k.endswith(("conv1.bias", "conv2.bias")) or ".dec." in k for k in dropped)
    ctx = converted.context
    assert ctx["resolution"] == 256 and ctx["dataset"] == C.RELEASES[release].dataset
    # Our parameter count equals the official one, minus the dropped biases and the unused decoder.
    param = lambda k: not k.endswith(("weight_u", "weight_v"))  # noqa: E731  (u/v are buffers)
    ours = {net: sum(v.numel() for k, v in converted.state_dict.items() if k.startswith(net + ".") and param(k))
            for net in official}
    dropped_params = {net: sum(sd[k].numel() for k in sd if param(k) and C.our_key(net, k) is None)
                      for net, sd in official.items()}
    for net, count in cfg["parameter_count"].items():
        assert ours[net] == count - dropped_params[net], (net, ours[net], count)


@needs_manifests
@pytest.mark.parametrize("release", sorted(C.RELEASES))
def test_release_options_are_what_the_readme_test_command_records(release):
    rel = C.RELEASES[release]
    assert rel.options == manifest(release)["configs"]["test"]["options"]
    assert rel.files["netG"] == "latest_net_G.pth" and rel.files["netCorr"] == "latest_net_Corr.pth"
    assert rel.optional_files == ("netD",)


def test_release_options_give_the_released_networks():
    opts = {name: C.method_options(rel.options) for name, rel in C.RELEASES.items()}
    assert opts["ade20k"]["maskmix"] and opts["ade20k"]["adaptor_kernel"] == 3 and not opts["ade20k"]["warp_bilinear"]
    assert all(opts[n]["adaptor_kernel"] == 4 and opts[n]["warp_bilinear"] for n in ("celebahq", "celebahqedge", "deepfashion"))
    assert opts["deepfashion"]["warp_patch"] and not opts["deepfashion"]["maskmix"]
    assert all(o["norm"] == "positional" and o["corr_centre"] == "channel" and o["use_attention"] for o in opts.values())
    # a test command sets no training options: losses and sampling stay at our (official training) defaults
    assert opts["ade20k"].keys().isdisjoint({"lambda_mask", "pseudo_pair", "self_ref_probability"})
    ctx = {name: C.context(rel.options) for name, rel in C.RELEASES.items()}
    assert ctx["ade20k"]["cond_channels"] == ctx["ade20k"]["num_classes"] == 151
    assert (ctx["celebahqedge"]["cond_channels"], ctx["celebahqedge"]["num_classes"]) == (15, None)
    assert (ctx["deepfashion"]["dataset"], ctx["deepfashion"]["cond_channels"]) == ("deepfashion", 20)


@needs_manifests
def test_training_options_map_to_the_official_losses_and_sampling():
    ade = C.method_options(manifest("ade20k")["configs"]["train"]["options"])
    assert (ade["lambda_mask"], ade["lambda_feat_vgg"], ade["lambda_perc"], ade["perc_layer"]) == (100.0, 1.0, 0.01, "relu5_2")
    assert ade["self_ref_probability"] == pytest.approx(0.3) and ade["pseudo_pair"] == "recrop" and ade["pseudo_flip"]
    assert ade["recrop_scale"] == pytest.approx(256 / 286) and ade["lr_decay_start"] == 0.5
    df = C.method_options(manifest("deepfashion")["configs"]["train"]["options"])
    assert (df["pseudo_pair"], df["self_ref_probability"], df["pseudo_flip"]) == ("exemplar", 1.0, False)
    assert (df["lambda_warp_self"], df["lambda_feat_vgg"], df["perc_layer"], df["lambda_perc"]) == (100.0, 10.0, "relu4_2", 0.001)
    edge = C.method_options(manifest("celebahqedge")["configs"]["train"]["options"])
    assert edge["lambda_cycle"] == 1.0 and edge["lambda_mask"] == 0.0


def test_command_options_parse_flags_and_typed_values():
    opts = C.command_options("python test.py --name x --dataset_mode ade20k --batchSize 6 --which_epoch 90 "
                             "--use_attention --gpu_ids 0 --adaptor_kernel 4")
    assert opts["batchSize"] == 6 and opts["which_epoch"] == "90" and opts["gpu_ids"] == "0"
    assert opts["use_attention"] is True and opts["adaptor_kernel"] == 4 and opts["label_nc"] == 150


@needs_manifests
def test_the_caffe_vgg_manifest_loads_into_our_loader_unchanged():
    keys = manifest("vgg19_conv")["configs"]["any"]["networks"]["vggnet_fix"]
    with torch.device("meta"):
        net = CaffeVGG19(len(CONVS))
    check_state_dict(net.state_dict(), meta_state_dict(keys), "vgg19_conv.pth")


def test_unknown_missing_and_misshaped_keys_each_give_one_error_naming_them():
    rel = C.RELEASES["ade20k"]
    with torch.device("meta"):
        ours = build_converted(CoCosNetMethod, C.Converted({}, C.method_options(rel.options), C.context(rel.options)))
    inverse = {}  # our key -> an official key (by the converter's own rules, on our key names)
    official = {"netG": {}, "netCorr": {}}
    for k, v in ours.state_dict().items():
        net, rest = k.split(".", 1)
        name = rest.replace(".shared.0.", ".mlp_shared.1.").replace(".gamma.", ".mlp_gamma.").replace(".beta.", ".mlp_beta.")
        name = name.replace("adaptor_", "adaptive_model_")
        official[net][name] = v
        inverse[k] = name
    assert C.convert(official, rel.options).state_dict.keys() == ours.state_dict().keys()  # the round trip
    bad = {net: dict(sd) for net, sd in official.items()}
    bad["netG"]["head_0.norm_0.mlp_shared.2.weight"] = torch.empty(1, device="meta")
    bad["netCorr"]["layer.0.conv3.weight"] = torch.empty(1, device="meta")
    with pytest.raises(ConversionError) as err:
        C.convert(bad, rel.options)
    assert "netG.head_0.norm_0.mlp_shared.2.weight" in str(err.value) and "netCorr.layer.0.conv3.weight" in str(err.value)
    bad = {net: dict(sd) for net, sd in official.items()}
    del bad["netG"][inverse["netG.up_1.conv_s.weight_orig"]]
    bad["netCorr"]["theta.weight"] = torch.empty(3, 3, 1, 1, device="meta")
    converted = C.convert(bad, rel.options)
    with pytest.raises(ConversionError) as err:
        check_fits(converted, bad)
    text = str(err.value)
    assert "missing: netG.up_1.conv_s.weight_orig" in text and "netCorr.theta.weight: (3, 3, 1, 1)" in text


def test_options_our_method_lacks_are_refused():
    for flag in ("use_coordconv", "noise_for_mask", "adaptor_se", "eqlr_sn"):
        with pytest.raises(ConversionError, match=flag):
            C.convert({}, {**C.RELEASES["ade20k"].options, flag: True})
    with pytest.raises(ConversionError, match="dataset_mode"):
        C.convert({}, {**C.RELEASES["ade20k"].options, "dataset_mode": "coco"})
    with pytest.raises(ConversionError, match="unknown network"):
        C.convert({"netE": {}}, C.RELEASES["ade20k"].options)
