"""Parity runner for CoCosNet v1 (``python -m bench.parity -k cocosnet/``): our ``cocosnet``
method, built from a fixture's official options through the converter
(``methods/cocosnet/convert.py``) and loaded with the converted filled official weights, run on
the fixture's inputs in its mode and dtype.

Three kinds of fixture, told apart by the outputs they store:
* inference (``fake_image``, ``corr/*``, ``G/*``): the official ``Pix2PixModel.inference`` --
  correspondence then generator, with the intermediates taken from forward hooks on our modules;
* discriminator (``eval/*``, ``train/*``): D on (fakes ++ reals), per scale every feature map and
  the attention block's input/output, and the spectral-norm u vectors after the train-mode pass;
* losses (``G_losses/*``, ``D_losses/*``, ``G_step/*``): one generator step
  (``generator_losses``) and one discriminator step (``discriminator_losses``, from the filled D
  again, as the fixture's notes say), with our loss terms under their official names.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from bench.parity.fixtures import Fixture
from methods.base import BackboneSettings
from methods.cocosnet.convert import convert, our_key
from methods.cocosnet.model import VGG_LAYERS, CoCosNetMethod
from methods.common.convert import build_converted
from methods.common.vgg_caffe import OFFICIAL_NAMES, VGG19Features

NETWORKS = ("netG", "netCorr", "netD")
# official G_losses / D_losses name -> (our loss key, the option that switches it off at 0)
G_LOSSES = {"no_vgg_feat": ("G_domain", "lambda_domain"), "GAN": ("G_gan", "lambda_gan"),
            "GAN_Feat": ("G_gan_feat", "lambda_gan_feat"), "fm": ("G_feat", "lambda_feat_vgg"),
            "perc": ("G_perc", "lambda_perc"), "contextual": ("G_context", "lambda_context"),
            "mask": ("G_mask", "lambda_mask"), "G_warp_self": ("G_warp_self", "lambda_warp_self"),
            "G_warp_cycle": ("G_reg", "lambda_cycle")}
D_LOSSES = {"D_Fake": "D_fake", "D_real": "D_real"}
G_BLOCKS = ("fc", "head_0", "G_middle_0", "G_middle_1", "up_0", "up_1", "attn", "up_2", "up_3", "conv_img")
OFFICIAL_VGG = {ours: official for official, ours in OFFICIAL_NAMES.items()}  # relu1_2 -> r12


def official_batch(inputs: Dict[str, torch.Tensor], opts: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Our batch from an official data dict, as ``Pix2PixModel.preprocess_input`` builds the
    conditions: label maps become one-hot maps of ``semantic_nc`` channels (CelebA-HQ: the
    glasses channel written over channel -3), edge / pose maps are used as they are."""
    mode = opts["dataset_mode"]
    batch = {"image": inputs["image"], "exemplar": inputs["ref"], "self_ref": inputs["self_ref"][:, 0, 0, 0]}
    label, label_ref = inputs["label"], inputs["label_ref"]
    if mode in ("celebahqedge", "deepfashion"):
        batch["cond"], batch["exemplar_cond"] = label, label_ref
        return batch
    nc = int(opts["label_nc"]) + (1 if opts.get("contain_dontcare_label") else 0)
    for key, lab in (("", label), ("exemplar_", label_ref)):
        glasses = None
        if mode == "celebahq":
            glasses, lab = lab[:, 1::2], lab[:, ::2]
        lab = lab[:, 0].long()
        onehot = F.one_hot(lab, nc).permute(0, 3, 1, 2).to(inputs["image"].dtype)
        if glasses is not None:
            onehot[:, -3:-2] = glasses.long().to(onehot.dtype)
        batch[key + "label"], batch[key + "cond"] = lab, onehot
    return batch


class Recorder:
    """Forward hooks that keep the first input and the output of every call of the named modules."""

    def __init__(self, modules: Dict[str, nn.Module]):
        self.inputs: Dict[str, List[torch.Tensor]] = {name: [] for name in modules}
        self.outputs: Dict[str, List[torch.Tensor]] = {name: [] for name in modules}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module, args, output):
            self.inputs[name].append(args[0])
            self.outputs[name].append(output)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def build(fx: Fixture, dtype: torch.dtype) -> Tuple[CoCosNetMethod, Dict[str, torch.Tensor]]:
    """Our method for ``fx`` (options and weights through the converter, on the CPU in ``dtype``)
    and the converted filled weights (to restart a network from)."""
    official = {net: fx.state_dict(net) for net in fx.networks if net in NETWORKS}
    converted = convert(official, fx.run_options)
    method = build_converted(CoCosNetMethod, converted, training="netD" in official)
    for net in official:  # the networks the fixture does not use stay on the meta device (no memory)
        getattr(method, net).to_empty(device="cpu")
    missing, unexpected = method.load_state_dict(converted.state_dict, strict=False)
    missing = [k for k in missing if k.split(".", 1)[0] in official]
    if missing or unexpected:
        raise RuntimeError(f"{fx.name}: converted weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for net in official:
        getattr(method, net).to(dtype)
    if "vggnet_fix" in fx.networks:
        vgg = {k: v.to(dtype) for k, v in fx.state_dict("vggnet_fix").items()}
        method.vgg = VGG19Features("caffe", VGG_LAYERS, BackboneSettings(download=False), "the fixture's vggnet_fix",
                                   state_dict=vgg)
    return method, converted.state_dict


def reload(method: CoCosNetMethod, filled: Dict[str, torch.Tensor], net: str) -> None:
    """Network ``net`` back to the fixture's filled weights (spectral-norm u/v included)."""
    method.load_state_dict({k: v for k, v in filled.items() if k.startswith(net + ".")}, strict=False)


def correspondence_and_generator(method: CoCosNetMethod, batch: Dict[str, torch.Tensor], step: Callable) -> Dict[str, torch.Tensor]:
    """Run ``step()`` (an inference or a generator-loss pass) with hooks on the correspondence and
    generator modules; returns ``step``'s result under "result" and the intermediates by name."""
    corr, gen = method.netCorr, method.netG
    modules = {"corr/adaptive_model_seg_out": corr.adaptor_seg, "corr/adaptive_model_img_out": corr.adaptor_img,
               "corr/layer": corr.layer, "corr/theta_conv": corr.theta, "corr/phi_conv": corr.phi}
    modules.update({f"G/{name}": getattr(gen, name) for name in G_BLOCKS if getattr(gen, name) is not None})
    rec = Recorder(modules)
    try:
        result = step()
    finally:
        rec.remove()
    out = {name: calls[0] for name, calls in rec.outputs.items() if calls and name != "corr/layer"}
    img = rec.outputs["corr/adaptive_model_img_out"]
    if len(img) > 1:  # the second image-adaptor call is on the photo (the domain-alignment loss)
        out["corr/adaptive_model_img_pair_out"] = img[1]
    out["corr/layer_cont"], out["corr/layer_ref"] = rec.outputs["corr/layer"][:2]
    out["result"] = result
    return out


def run_inference(fx: Fixture, method: CoCosNetMethod, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    method.eval()
    want_mask = "corr/warp_mask" in fx.outputs

    def step():
        with torch.no_grad():
            return method._translate(batch["cond"], batch["exemplar"], batch["exemplar_cond"],
                                     exemplar_onehot=batch["exemplar_cond"] if want_mask else None)

    out = correspondence_and_generator(method, batch, step)
    fake, corr = out.pop("result")
    out.update({"fake_image": fake, "corr/warp_out": corr["warp"], "corr/f_WTA": corr["scores"] * method.options.alpha})
    if want_mask:
        out["corr/warp_mask"] = corr["warp_mask"]
    return out


def discriminator_maps(method: CoCosNetMethod, cond, fake, real, prefix: str) -> Dict[str, torch.Tensor]:
    """Every D feature map of (fakes ++ reals) per scale, as ``<prefix>pred_fake|pred_real/scale<i>/model<j>``,
    and the attention block's input and output per scale (``<prefix>scale<i>/attn_in|attn_out``)."""
    attn = {f"{prefix}scale{i}/attn": net.attn for i, net in enumerate(method.netD.nets) if net.attn is not None}
    rec = Recorder(attn)
    try:
        pred_fake, pred_real = method._discriminate(cond, fake, real)
    finally:
        rec.remove()
    out = {}
    for i, (f_maps, r_maps) in enumerate(zip(pred_fake, pred_real)):
        for j, (f, r) in enumerate(zip(f_maps, r_maps)):
            out[f"{prefix}pred_fake/scale{i}/model{j}"], out[f"{prefix}pred_real/scale{i}/model{j}"] = f, r
    for name in attn:
        out[name + "_in"], out[name + "_out"] = rec.inputs[name][0], rec.outputs[name][0]
    return out


def run_discriminator(fx: Fixture, method: CoCosNetMethod, filled, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    fake = fx.inputs["fake_image"].to(batch["image"].dtype)
    for mode in fx.mode.split("+"):
        reload(method, filled, "netD")  # each pass starts from the filled state dict
        method.netD.train(mode == "train")
        with torch.no_grad():
            out.update(discriminator_maps(method, batch["cond"], fake, batch["image"], f"{mode}/"))
        state = method.state_dict()
        prefix = f"{mode}/after_forward/"
        for name in fx.outputs:
            if name.startswith(prefix):
                out[name] = state[our_key("netD", name[len(prefix):])].clone()
    return out


def run_losses(fx: Fixture, method: CoCosNetMethod, filled, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    method.train()
    o = method.options
    with torch.no_grad():
        out = correspondence_and_generator(method, batch, lambda: method.generator_losses(batch))
        losses, fwd = out.pop("result")
        result = {f"G_step/{k}": v for k, v in out.items()}
        result.update({"G_step/fake_image": fwd["fake"], "G_step/warp_out": fwd["warp"]})
        if "warp_mask" in fwd:
            result["G_step/warp_mask"] = fwd["warp_mask"]
        for which in ("fake", "real", "ref"):
            for layer, feat in zip(VGG_LAYERS, fwd.get(f"vgg_{which}", [])):
                result[f"G_step/vgg_{which}/{OFFICIAL_VGG[layer]}"] = feat
        for i, (f_maps, r_maps) in enumerate(zip(fwd.get("pred_fake", []), fwd.get("pred_real", []))):
            for j, (f, r) in enumerate(zip(f_maps, r_maps)):
                result[f"G_step/netD/scale{i}/model{j}"] = torch.cat([f, r], 0)  # fakes first, as fed
        reload(method, filled, "netD")  # the fixture's D step starts from the filled D again
        d_losses = method.discriminator_losses(batch, fwd["fake"])
    for official, (ours, option) in G_LOSSES.items():
        result[f"G_losses/{official}"] = losses.get(ours, fwd["fake"].new_zeros(()) if getattr(o, option) == 0 else None)
    for official, ours in D_LOSSES.items():
        result[f"D_losses/{official}"] = d_losses.get(ours)
    # The official code returns some terms as [1]-shaped tensors (GANLoss, the GAN_Feat accumulator).
    for name, value in result.items():
        if value is not None and name in fx.meta and (name.startswith("G_losses/") or name.startswith("D_losses/")):
            result[name] = value.reshape(fx.meta[name]["shape"])
    return result


def run(fx: Fixture) -> Dict[str, torch.Tensor]:
    dtype = fx.dtype
    method, filled = build(fx, dtype)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in official_batch(fx.inputs, fx.run_options).items()}
    if any(name.startswith(("G_losses/", "D_losses/")) for name in fx.outputs):
        return run_losses(fx, method, filled, batch)
    if any(name.startswith(("eval/", "train/")) for name in fx.outputs):
        return run_discriminator(fx, method, filled, batch)
    return run_inference(fx, method, batch)
