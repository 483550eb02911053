"""SPADE's converter: every full-width manifest of ../shared/parity/spade/manifests converts (every
official key consumed, every shape right, without weights), the ADE20K label channels are rolled to
our one-hot, and a checkpoint that does not fit is one error naming every offending key."""
from __future__ import annotations

import json

import pytest
import torch

from bench.parity.fixtures import parity_dir
from methods.common.convert import ConversionError, Converted, build_converted, check_state_dict, meta_state_dict
from methods.common.vgg import vgg19_features
from methods.spade.convert import NETWORK_PREFIXES, RELEASES, convert, official_key, resolve_options
from methods.spade.model import SPADEMethod

MANIFESTS = parity_dir() / "spade" / "manifests"
CONFIGS = sorted((p.stem, name) for p in MANIFESTS.glob("*.json") for name in json.loads(p.read_text())["configs"]) \
    if MANIFESTS.is_dir() else []


@pytest.mark.skipif(not CONFIGS, reason=f"no SPADE manifests under {MANIFESTS} (set BENCH_PARITY_DIR)")
@pytest.mark.parametrize("manifest,config", CONFIGS, ids=[f"{m}/{c}" for m, c in CONFIGS])
def test_every_manifest_config_converts_at_full_width(manifest, config):
    cfg = json.loads((MANIFESTS / f"{manifest}.json").read_text())["configs"][config]
    official = {net: meta_state_dict(keys) for net, keys in cfg["networks"].items()}
    if manifest == "torchvision_vgg19":
        # The loss VGG19 is no network of the checkpoint: our VGG loader reads torchvision's own file,
        # in this key layout (features.N.*), every conv of it.
        with torch.device("meta"):
            ours = {f"features.{k}": v for k, v in vgg19_features().state_dict().items()}
        check_state_dict(ours, official["vgg19"], "torchvision VGG19 features")
        return
    converted = convert(official, cfg["options"])
    method = build_converted(SPADEMethod, converted, training="netD" in official)
    absent = tuple(p for net, prefixes in NETWORK_PREFIXES.items() if net not in official for p in prefixes)
    check_state_dict(method.state_dict(), converted.state_dict, f"spade {config}", allow_missing=absent)
    assert len(converted.state_dict) == sum(len(sd) for sd in official.values()) and not converted.dropped
    assert converted.context["resolution"] == cfg["options"]["crop_size"] == 256
    assert converted.context["cond_channels"] == 151 and converted.context["dataset"] == "ade20k"
    assert converted.options["use_vae"] == cfg["options"]["use_vae"] == ("netE" in official)
    method.load_pretrained(converted.state_dict)  # the harness's init_from path accepts it


def test_the_release_is_the_readme_test_command():
    release = RELEASES["ade20k_pretrained"]
    assert release.files == {"netG": "latest_net_G.pth"} and release.dataset == "ade20k"
    assert "--name ade20k_pretrained --dataset_mode ade20k" in release.command
    assert release.options["use_vae"] is False and release.options["isTrain"] is False


# ---- a tiny official-format checkpoint, made from our own key map ---------------------------------------
def _tiny_official(training=True):
    """Official options of a tiny ADE20K SPADE (ngf 2, 64x64, no VAE) and random official-format state
    dicts for it (netG, and netD when ``training``), named through our key map."""
    options = {"label_nc": 150, "contain_dontcare_label": True, "no_instance": True, "crop_size": 64, "ngf": 2,
               "ndf": 2, "norm_G": "spectralspadesyncbatch3x3", "use_vae": False, "dataset_mode": "ade20k"}
    ours, context = resolve_options(options)
    method = build_converted(SPADEMethod, Converted({}, dict(ours, lambda_vgg=0.0), context), training=training)
    gen = torch.Generator().manual_seed(0)
    official = {}
    for key, value in method.state_dict().items():
        net, off = official_key(key, ours["n_layers_d"])
        if not value.is_floating_point():
            value = torch.zeros(value.shape, dtype=value.dtype)
        else:
            value = torch.randn(value.shape, generator=gen)
            value = value.abs() + 0.5 if off.endswith("running_var") else value
        official.setdefault(net, {})[off] = value
    return options, official


def test_ade20k_label_channels_are_rolled_to_our_one_hot():
    options, official = _tiny_official()
    converted = convert(official, options)
    fc, ofc = converted.state_dict["fc.weight"], official["netG"]["fc.weight"]
    assert torch.equal(fc[:, 0], ofc[:, 150]) and torch.equal(fc[:, 1:], ofc[:, :150])  # ours c = ADE c
    key = "decoder.up_1.norm_s.shared.0.weight"
    assert torch.equal(converted.state_dict[key], official["netG"]["up_1.norm_s.mlp_shared.0.weight"].roll(1, 1))
    d0, od0 = converted.state_dict["netD.nets.1.layers.0.0.weight"], official["netD"]["discriminator_1.model0.0.weight"]
    assert torch.equal(d0[:, :151], od0[:, :151].roll(1, 1)) and torch.equal(d0[:, 151:], od0[:, 151:])  # image part kept
    other = convert(official, dict(options, dataset_mode="custom"))  # not SPADE's ADE20K loader: as it is
    assert torch.equal(other.state_dict["fc.weight"], ofc) and other.context["dataset"] == "custom"


def test_rolled_generator_on_raw_labels_equals_the_official_order_on_spade_labels():
    options, official = _tiny_official(training=False)
    rolled, plain = convert(official, options), convert(official, dict(options, dataset_mode="custom"))
    raw = torch.randint(0, 151, (2, 1, 64, 64))
    spade = torch.where(raw == 0, torch.full_like(raw, 150), raw - 1)  # ADE20KDataset.postprocess
    outs = []
    for conv, label in ((rolled, raw), (plain, spade), (rolled, spade)):
        method = build_converted(SPADEMethod, conv, training=False, device="cpu")
        method.load_pretrained(conv.state_dict)
        method.eval()
        onehot = torch.zeros(2, 151, 64, 64).scatter_(1, label, 1.0)
        outs.append(method.generate({"cond": onehot}).output)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    assert (outs[0] - outs[2]).abs().max() > 1e-2  # the labels matter: unrolled they would differ


def test_a_checkpoint_that_does_not_fit_is_one_error_naming_every_key():
    options, official = _tiny_official()
    net_g = dict(official["netG"])
    net_g["head_0.surprise.weight"] = torch.zeros(1)  # unknown
    del net_g["up_2.conv_1.bias"]  # missing
    net_g["conv_img.weight"] = torch.zeros(3, 5, 3, 3)  # mis-shaped
    with pytest.raises(ConversionError) as exc:
        convert(dict(official, netG=net_g), options)
    msg = str(exc.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
    assert "netG.head_0.surprise.weight" in msg and "netG.up_2.conv_1.bias" in msg and "netG.conv_img.weight" in msg
    with pytest.raises(ConversionError, match="netE"):  # an encoder for a configuration without one
        convert(dict(official, netE={"layer1.0.weight_orig": torch.zeros(2, 3, 3, 3)}), options)
    with pytest.raises(ConversionError, match="unknown official networks"):
        convert(dict(official, netX={}), options)


def test_unsupported_official_configurations_name_every_reason():
    options, official = _tiny_official(training=False)
    bad = dict(options, no_instance=False, norm_G="spectralspadeinstance5x5", aspect_ratio=2.0)
    with pytest.raises(ConversionError) as exc:
        convert(official, bad)
    assert all(k in str(exc.value) for k in ("no_instance", "norm_G", "aspect_ratio"))
    with pytest.raises(ConversionError, match="crop_size >= 256"):
        convert(official, dict(options, use_vae=True))
