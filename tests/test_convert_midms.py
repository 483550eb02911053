"""The MIDMs converter against the full-width manifests of the released checkpoint (meta tensors,
no weights): every official key is consumed or deliberately dropped, our method built from the
converted options takes every converted tensor with its shape; broken inputs give one error that
names every offending key."""
from __future__ import annotations

import json

import pytest
import torch

from bench.parity.fixtures import parity_dir
from methods.common.convert import ConversionError, build_converted, check_state_dict, meta_state_dict
from methods.midms.convert import RELEASES, convert
from methods.midms.model import MIDMsMethod

MANIFESTS = sorted((parity_dir() / "midms" / "manifests").glob("*.json"))
WEIGHT_KINDS = {"matching (trained)": "matching.", "UNet (finetuned)": "unet.", "VQ-f4 first stage (frozen)": "first_stage."}
DIFF = "diff_model."


def _configs():
    for path in MANIFESTS:
        manifest = json.loads(path.read_text())
        for name, config in manifest["configs"].items():
            yield pytest.param(manifest, config, id=f"{path.stem}/{name}")


def _covered(key: str, dropped) -> bool:
    return key in dropped or any(p.endswith("*") and key.startswith(p[:-1]) for p in dropped)


@pytest.mark.skipif(not MANIFESTS, reason=f"no MIDMs manifests under {parity_dir() / 'midms' / 'manifests'}")
@pytest.mark.parametrize("manifest,config", list(_configs()))
def test_release_converts_completely(manifest, config):
    official = meta_state_dict(config["networks"]["MIDMs"])
    release = RELEASES[manifest["release"]]
    converted = convert({"MIDMs": official}, release.options)
    # every weight is taken, everything else is dropped with a reason
    kinds = config["kind"]
    for key in official:
        if kinds[key] in WEIGHT_KINDS:
            assert not _covered(key, converted.dropped), key
        else:
            assert _covered(key, converted.dropped), f"{key} ({kinds[key]}) neither converted nor dropped"
    for kind, prefix in WEIGHT_KINDS.items():
        n_official = sum(1 for k in official if kinds[k] == kind)
        n_ours = sum(1 for k in converted.state_dict if k.startswith(prefix))
        unet_attn = sum(1 for k in official if kinds[k] == kind and k.endswith(".qkv.weight")) if prefix == "unet." else 0
        # the UNet's fused qkv weight and bias become three tensors each
        assert n_ours == n_official + 2 * unet_attn * 2, kind
    assert converted.context["resolution"] == 256 and converted.context["cond_channels"] == 15
    assert (converted.context["dataset"], converted.context["variant"]) == (release.dataset, release.variant)
    m = build_converted(MIDMsMethod, converted)
    ours = m.state_dict()
    check_state_dict(ours, converted.state_dict, f"{manifest['release']} -> midms")
    counts = config["parameter_count"]
    assert sum(p.numel() for p in m.matching.parameters()) == counts["matching"]
    assert sum(p.numel() for p in m.unet.parameters()) == counts["unet"]
    assert sum(p.numel() for p in m.first_stage.parameters()) == counts["first_stage"]
    assert m.options.ldm_from_checkpoint and m.pretrained and m.ae_steps == 0


@pytest.mark.skipif(not MANIFESTS, reason="no MIDMs manifests")
def test_ldm_checkpoint_alone_is_the_official_training_start():
    """model.ckpt (LDM layout, no diff_model.): UNet and first stage; the matching networks keep
    their initialisation when loaded, as official training starts from random matching."""
    config = next(iter(json.loads(MANIFESTS[0].read_text())["configs"].values()))
    ldm = {k[len(DIFF):]: v for k, v in meta_state_dict(config["networks"]["MIDMs"]).items() if k.startswith(DIFF)}
    converted = convert({"LDM": ldm}, {"benchmark": "celebahqedge", "label_nc": 15, "crop_size": 256})
    assert not any(k.startswith("matching.") for k in converted.state_dict)
    assert "model_ema.*" in converted.dropped
    m = build_converted(MIDMsMethod, converted)
    check_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("matching.")},
                     converted.state_dict, "model.ckpt -> midms")


def _release_meta():
    """The release's MIDMs state dict on the meta device."""
    config = next(iter(json.loads(MANIFESTS[0].read_text())["configs"].values()))
    return meta_state_dict(config["networks"]["MIDMs"])


@pytest.mark.skipif(not MANIFESTS, reason="no MIDMs manifests")
def test_unknown_missing_and_misshaped_keys_are_one_error():
    official = _release_meta()
    options = RELEASES["midms_celebA_finetuned"].options
    official["seg_enc.extra.weight"] = torch.empty(3, device="meta")
    del official["iter_enc.G_middle_1.norm_s.mlp_beta.bias"]
    official["layer.2.conv1.weight"] = torch.empty(271, 270, 3, 3, device="meta")
    official["diffusion_sampler.something"] = torch.empty(3, device="meta")
    del official["diff_model.model.diffusion_model.out.2.bias"]
    official["diff_model.first_stage_model.quant_conv.weight"] = torch.empty(4, 3, 1, 1, device="meta")
    official["diff_model.model.diffusion_model.surplus"] = torch.empty(1, device="meta")
    with pytest.raises(ConversionError) as err:
        convert({"MIDMs": official}, options)
    text = str(err.value)
    for key in ("seg_enc.extra.weight", "iter_enc.G_middle_1.norm_s.mlp_beta.bias", "layer.2.conv1.weight",
                "diffusion_sampler.something", "diff_model.model.diffusion_model.out.2.bias",
                "diff_model.first_stage_model.quant_conv.weight", "diff_model.model.diffusion_model.surplus"):
        assert key in text, key
    with pytest.raises(ConversionError, match="expected official networks"):
        convert({"netG": {}}, options)


@pytest.mark.skipif(not MANIFESTS, reason="no MIDMs manifests")
def test_converted_weights_load_into_our_method():
    """Values survive the mapping (the matching networks with values, the LDM on meta)."""
    official = _release_meta()
    torch.manual_seed(0)
    matching = {k: torch.randn(v.shape) for k, v in official.items() if not k.startswith(("diff_model.", "diffusion_sampler."))}
    converted = convert({"MIDMs": {**official, **matching}}, RELEASES["midms_celebA_finetuned"].options)
    assert torch.equal(converted.state_dict["matching.f_x.block.norm_0.shared.0.weight"],
                       matching["seg_enc.G_middle_1.norm_0.mlp_shared.1.weight"])
    assert torch.equal(converted.state_dict["matching.f_y_iter.block.conv_s.weight_orig"],
                       matching["iter_enc.G_middle_1.conv_s.weight_orig"])
    assert torch.equal(converted.state_dict["matching.layer.3.prelu.weight"], matching["layer.3.prelu.weight"])
