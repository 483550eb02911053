"""SPADE parity runner: our ``spade`` method, built from a fixture's official options through the
converter (``methods/spade/convert.py``) and loaded with the converted filled official weights, run on
the fixture's inputs in its mode and dtype.

Output groups (by official name), each produced when the fixture stores it:
- ``fake_image``, ``G/<block>``: netG(seg, z) (``z`` from the inputs with ``--use_vae``); ``G/fc`` is
  the fc output, ``G/<block>`` a trunk block's, ``G/conv_img`` the last conv before tanh.
- ``D/scale<i>/model<j>``: netD on the fakes (input ``fake_image``) then the reals (``image``).
- ``<eval|train>/<input>/{mu,logvar,layer<k>}``, ``train/after_forward/<SN u/v>``: the style encoder
  on each image input, in each mode, every pass from the filled weights.
- ``G_losses/*``, ``G_step/*``, ``D_losses/*``, ``D_step/*``: one generator and one discriminator step
  (train mode, each from the filled weights) with the fixture's reparameterisation draws injected.

The condition is our one-hot of the label map in our convention: with ``--dataset_mode ade20k`` the
raw ADE labels (``label_ade_raw``), which the converter's rolled label channels expect.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Dict, Iterator, Mapping, Optional

import torch
from torch import nn

from bench.parity.fixtures import Fixture
from methods.base import BackboneSettings
from methods.common.convert import Converted, build_converted, strip_prefix
from methods.common.losses import VGGLoss
from methods.common.vgg import vgg19_features
from methods.spade.convert import NETWORK_PREFIXES, NETWORKS, OFFICIAL_LOSS_NAMES, convert, official_key, \
    rolls_ade20k_labels
from methods.spade.model import SPADEMethod


def run(fx: Fixture) -> Dict[str, torch.Tensor]:
    official = {net: fx.state_dict(net) for net in fx.networks if net in NETWORKS}
    converted = convert(official, fx.run_options)
    r = _Run(fx, converted, _build(fx, converted))
    names = set(fx.outputs)
    out: Dict[str, torch.Tensor] = {}
    if any(n == "fake_image" or n.startswith(("G/", "D/")) for n in names):
        out.update(_generator_and_discriminator(r))
    if any(re.match(r"(eval|train)/", n) for n in names):
        out.update(_encoder(r))
    if any(n.startswith(("G_losses/", "G_step/", "D_losses/", "D_step/")) for n in names):
        out.update(_training_steps(r))
    return out


# ---- building and loading -------------------------------------------------------------------------
def _build(fx: Fixture, converted: Converted) -> SPADEMethod:
    """Our method on the meta device with only the networks the fixture uses materialised, in the
    fixture's dtype (loaded by ``_Run.reset``); the loss VGG19 from the fixture's ``vgg19`` weights."""
    networks = [net for net in fx.networks if net in NETWORKS]
    method = build_converted(SPADEMethod, converted, training="netD" in networks or "vgg19" in fx.networks)
    for net in networks:
        for prefix in NETWORK_PREFIXES[net]:
            getattr(method, prefix.rstrip(".")).to_empty(device="cpu")
    method.to(fx.dtype)
    if "vgg19" in fx.networks and method.vgg_loss is not None:
        features = vgg19_features(fx.state_dict("vgg19")).to(fx.dtype)
        method.vgg_loss = VGGLoss(BackboneSettings(), imagenet_normalize=method.options.vgg_imagenet_norm,
                                  features=features)
    return method


@dataclass
class _Run:
    fx: Fixture
    converted: Converted
    method: SPADEMethod

    def reset(self, train: bool) -> SPADEMethod:
        """Back to the filled official weights (every pass starts there: train-mode passes move the
        spectral-norm u/v and the BatchNorm statistics), in train or eval mode. Each network the
        fixture has is loaded strictly; the others stay unmaterialised on the meta device."""
        state = self.converted.state_dict
        for net in self.fx.networks:
            for prefix in NETWORK_PREFIXES.get(net, ()):
                getattr(self.method, prefix.rstrip(".")).load_state_dict(strip_prefix(state, prefix))
        return self.method.train(train)

    def cond(self) -> torch.Tensor:
        """Our condition: the one-hot of the label map in our convention (raw ADE labels for ADE20K)."""
        fx = self.fx
        label = fx.inputs["label_ade_raw" if rolls_ade20k_labels(fx.run_options) else "label"].long()
        nc = self.converted.context["cond_channels"]
        return torch.zeros((label.shape[0], nc) + tuple(label.shape[2:]), dtype=fx.dtype).scatter_(1, label, 1.0)

    def draw(self, name: str) -> Optional[torch.Tensor]:
        """A random draw the fixture recorded (to inject); None when it has none."""
        if name not in self.fx.outputs:
            return None
        if int(self.fx.meta[name].get("stride", 1)) != 1:
            raise ValueError(f"{self.fx.name}: {name} is stored strided and cannot be injected")
        return self.fx.outputs[name]


@contextlib.contextmanager
def _captured(modules: Mapping[str, nn.Module]) -> Iterator[Dict[str, list]]:
    """Every output of each named module while inside, in call order."""
    store: Dict[str, list] = {name: [] for name in modules}
    handles = [m.register_forward_hook(lambda mod, inp, out, name=name: store[name].append(out))
               for name, m in modules.items()]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _generator_blocks(method: SPADEMethod, names, prefix: str) -> Dict[str, nn.Module]:
    """Our module of each official ``<prefix><block>`` output of netG (fc, head_0, ..., conv_img)."""
    blocks = {}
    for name in names:
        block = name[len(prefix):]
        if name.startswith(prefix) and "/" not in block and block != "fake_image":
            blocks[name] = method.fc if block == "fc" else getattr(method.decoder, block)
    return blocks


def _discriminator_maps(pred, prefix: str) -> Dict[str, torch.Tensor]:
    return {f"{prefix}scale{i}/model{j}": t for i, scale in enumerate(pred) for j, t in enumerate(scale)}


# ---- output groups --------------------------------------------------------------------------------
@torch.no_grad()
def _generator_and_discriminator(r: _Run) -> Dict[str, torch.Tensor]:
    fx = r.fx
    method = r.reset(train=fx.mode == "train")
    cond = r.cond()
    out: Dict[str, torch.Tensor] = {}
    with _captured(_generator_blocks(method, fx.outputs, "G/")) as store:
        fake = method.generator(cond, fx.inputs.get("z"))
    out.update({name: outs[0] for name, outs in store.items()})
    out["G/fake_image" if "G/fake_image" in fx.outputs else "fake_image"] = fake
    if any(n.startswith("D/") for n in fx.outputs):
        pairs = [torch.cat([cond, fx.inputs["fake_image"]], 1), torch.cat([cond, fx.inputs["image"]], 1)]
        out.update(_discriminator_maps(method.netD(torch.cat(pairs, 0)), "D/"))
    return out


@torch.no_grad()
def _encoder(r: _Run) -> Dict[str, torch.Tensor]:
    fx, encoder = r.fx, r.method.encoder
    layers = {f"layer{i + 1}": getattr(encoder, f"layer{i + 1}") for i in range(encoder.num_layers)}
    out: Dict[str, torch.Tensor] = {}
    for mode in ("eval", "train"):
        inputs = sorted({n.split("/")[1] for n in fx.outputs if n.startswith(mode + "/")} - {"after_forward"})
        for name in inputs:
            r.reset(train=mode == "train")
            with _captured(layers) as store:
                mu, logvar = encoder(fx.inputs[name])
            out.update({f"{mode}/{name}/mu": mu, f"{mode}/{name}/logvar": logvar})
            out.update({f"{mode}/{name}/{layer}": outs[0] for layer, outs in store.items()})
            if mode == "train":  # the spectral-norm u/v after this pass's power iteration
                for key, value in r.method.state_dict().items():
                    if key.startswith("encoder.") and key.endswith(("_u", "_v")):
                        name_ = official_key(key, r.converted.options["n_layers_d"])[1]
                        out[f"train/after_forward/{name_}"] = value.clone()
    return out


@torch.no_grad()  # forward values only, as the fixture stores
def _training_steps(r: _Run) -> Dict[str, torch.Tensor]:
    fx = r.fx
    batch = {"cond": r.cond(), "image": fx.inputs["image"]}
    batch["exemplar"] = batch["image"]

    def official_losses(prefix: str, losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        # the official dictionaries hold some terms as shape-(1,) tensors
        names = {k: f"{prefix}/{OFFICIAL_LOSS_NAMES[k]}" for k in losses}
        return {names[k]: v.reshape(fx.meta[names[k]]["shape"]) for k, v in losses.items()}

    out: Dict[str, torch.Tensor] = {}
    method = r.reset(train=True)
    eps = r.draw("G_step/rng/reparameterize_eps")
    modules = dict(_generator_blocks(method, fx.outputs, "G_step/G/"), netD=method.netD)
    if method.vgg_loss is not None:
        modules["vgg"] = method.vgg_loss.vgg
    with _captured(modules) as store:
        losses, gen = method.generator_losses(batch, eps)
    out.update(official_losses("G_losses", losses))
    step = {"fake_image": gen["fake"], "mu": gen.get("mu"), "logvar": gen.get("logvar"), "rng/reparameterize_eps": eps}
    out.update({f"G_step/{k}": v for k, v in step.items() if v is not None})
    out.update({name: outs[0] for name, outs in store.items() if name.startswith("G_step/G/")})
    out.update(_discriminator_maps(store["netD"][0], "G_step/netD/"))
    for which, feats in zip(("vgg_fake", "vgg_real"), store.get("vgg", [])):  # VGGLoss runs fake, then real
        out.update({f"G_step/{which}/{layer}": f for layer, f in feats.items()})

    method = r.reset(train=True)
    eps = r.draw("D_step/rng/reparameterize_eps")
    losses, gen = method.discriminator_losses(batch, eps)
    out.update(official_losses("D_losses", losses))
    out["D_step/fake_image"] = gen["fake"]
    if eps is not None:
        out["D_step/rng/reparameterize_eps"] = eps
    return out
