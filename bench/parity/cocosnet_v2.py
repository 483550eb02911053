"""Parity runner of CoCosNet v2: a fixture's official weights, converted by our converter
(``methods/cocosnet_v2/convert.py``), in our ``cocosnet_v2`` built from the fixture's official
options, run on its inputs in its mode and dtype; every output under its official name.

What runs is derived from the fixture: a discriminator-only fixture runs ``discriminate`` once per
mode (``eval``/``train`` prefixes when it has both); a fixture storing ``G_losses/*`` runs one
generator step (``generator_losses``) and one discriminator step on its fake, each from the filled
weights (the official fixture made no optimiser step between them); otherwise it is an inference
pass (correspondence + generator). The propagation-order draws the official code took from
python's ``random.random()`` are injected from the fixture's ``rng/pm_random_draws``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List

import torch

from bench.parity.fixtures import Fixture
from methods.cocosnet_v2.convert import convert
from methods.cocosnet_v2.model import CoCosNetV2Method, CoCosNetV2Options, discriminate
from methods.common.convert import build_converted, check_state_dict
from methods.common.vgg_caffe import CaffeVGG19

NETWORKS = ("netCorr", "netG", "netD")
LOSS_NAMES = {"G_align": "no_vgg_feat", "G_warp_cycle": "G_warp_cycle", "G_corr": "G_warp_self", "G_gan": "GAN",
              "G_gan_feat": "GAN_Feat", "G_fm": "fm", "G_perc": "perc", "G_contextual": "contextual",
              "D_fake": "D_Fake", "D_real": "D_real"}
G_BLOCKS = ("fc", "head_0", "G_middle_0", "G_middle_1", "up_0", "up_1", "up_2", "up_3", "conv_img")


class _Draws:
    """The recorded ``random.random()`` values, handed out in call order."""

    def __init__(self, values: torch.Tensor):
        self.values = [float(v) for v in values.flatten()]
        self.used: List[float] = []

    def __call__(self) -> float:
        if len(self.used) == len(self.values):
            raise RuntimeError(f"PatchMatch asked for more than the {len(self.values)} recorded propagation draws")
        self.used.append(self.values[len(self.used)])
        return self.used[-1]


class _Wanted(dict):
    """A trace that keeps only what the fixture stores (``prefix`` + name): the per-iteration
    PatchMatch tensors are GBs at 512^2 in float64."""

    def __init__(self, fx: Fixture, prefix: str = ""):
        super().__init__()
        self.names, self.prefix = set(fx.outputs), prefix

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if self.prefix + name in self.names:
            super().__setitem__(name, value)


@contextmanager
def _hooks(m: CoCosNetV2Method, out: Dict[str, torch.Tensor]) -> Iterator[None]:
    """Forward hooks naming what the official fixtures store of the encoders, theta/phi and G."""
    calls = {"enc_b": 0}
    handles = []

    def keep(name_of: Callable[[], str]):
        def hook(_module, _inputs, output):
            name = name_of()
            if isinstance(output, (list, tuple)):
                for i, t in enumerate(output):
                    out[f"{name}/level{i}"] = t.detach()
            else:
                out[name] = output.detach()
        return hook

    def enc_b_name() -> str:  # official order: the exemplar, then (training) the ground-truth pair
        calls["enc_b"] += 1
        return "corr/adaptive_model_img_out" if calls["enc_b"] == 1 else "corr/adaptive_model_img_pair_out"

    handles.append(m.enc_a.register_forward_hook(keep(lambda: "corr/adaptive_model_seg_out")))
    handles.append(m.enc_b.register_forward_hook(keep(enc_b_name)))
    for i, (t, p) in enumerate(zip(m.theta, m.phi)):
        handles.append(t.register_forward_hook(keep(lambda i=i: f"corr/theta_{i}_conv")))
        handles.append(p.register_forward_hook(keep(lambda i=i: f"corr/phi_{i}_conv")))
    for name in G_BLOCKS:
        handles.append(getattr(m.netG, name).register_forward_hook(keep(lambda name=name: f"G/{name}")))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _build(fx: Fixture, training: bool):
    official = {net: fx.state_dict(net) for net in fx.networks if net in NETWORKS}
    conv = convert(official, fx.run_options)
    m = build_converted(CoCosNetV2Method, conv, training=training, device="cpu")
    m.load_pretrained(conv.state_dict, what=f"{fx.name} converted weights")
    m.to(fx.dtype)
    if training and m.vgg is not None and "vggnet_fix" in fx.networks:
        _use_fixture_vgg(m, fx)
    return m, conv


def _use_fixture_vgg(m: CoCosNetV2Method, fx: Fixture) -> None:
    """The fixture's loss VGG (official ``vgg19_conv.pth`` layout) in place of the shared one."""
    net = CaffeVGG19(len(m.vgg._caffe.state_dict()) // 2)
    state = fx.state_dict("vggnet_fix")
    net.load_state_dict({k: state[k] for k in net.state_dict()}, strict=True)
    net.to(fx.dtype).eval().requires_grad_(False)
    object.__setattr__(m.vgg, "_caffe", net)  # VGG19Features keeps its network unregistered


def _reload(m: CoCosNetV2Method, conv, prefix: str) -> None:
    """Back to the filled weights (train-mode spectral norm advanced u/v in place)."""
    m.load_pretrained({k: v for k, v in conv.state_dict.items() if k.startswith(prefix)})  # keeps our dtype


def _level_outputs(m: CoCosNetV2Method, out: Dict[str, torch.Tensor], results, fake) -> None:
    out.update({f"pm/{k}": v for k, v in m.pm.trace.items()})
    for i, res in enumerate(results):
        out[f"warp_out/{i}"] = res.warp.detach()
    out["fake_image"] = fake.detach()


def _discriminator(fx: Fixture) -> Dict[str, torch.Tensor]:
    """Only the discriminator is built (the rest of the method is not needed)."""
    conv = convert({"netD": fx.state_dict("netD")}, fx.run_options)
    net_d = CoCosNetV2Method.make_discriminator(CoCosNetV2Options(**conv.options), conv.context["cond_channels"], 1.0)
    state = {k[len("netD."):]: v for k, v in conv.state_dict.items()}
    check_state_dict(net_d.state_dict(), state, f"{fx.name}: converted netD")
    net_d.to(fx.dtype)
    x = fx.inputs
    modes = fx.mode.split("+")
    out: Dict[str, torch.Tensor] = {}
    for mode in modes:
        net_d.load_state_dict(state)  # from the filled weights: train mode advances u/v in place
        net_d.train(mode == "train")
        with torch.no_grad():
            pred_fake, pred_real = discriminate(net_d, x["label"], x["fake_image"], x["image"])
        prefix = f"{mode}/" if len(modes) > 1 else ""
        for side, preds in (("pred_fake", pred_fake), ("pred_real", pred_real)):
            for i, scale in enumerate(preds):
                for j, f in enumerate(scale):
                    out[f"{prefix}{side}/scale{i}/model{j}"] = f
    return out


def _inference(fx: Fixture) -> Dict[str, torch.Tensor]:
    m, _ = _build(fx, training=False)
    m.train(fx.mode == "train")
    x = fx.inputs
    draws = _Draws(fx.outputs["rng/pm_random_draws"])
    m.pm.order_source, m.pm.trace = draws, _Wanted(fx, "pm/")
    out: Dict[str, torch.Tensor] = {}
    with torch.no_grad(), _hooks(m, out):
        results, _, _ = m.correspondence(x["label"], x["ref"], x["label_ref"])
        fake = m.netG(x["label"], [res.warp for res in results])
    _level_outputs(m, out, results, fake)
    out["rng/pm_random_draws"] = torch.tensor(draws.used, dtype=torch.float64)
    return out


def _losses(fx: Fixture) -> Dict[str, torch.Tensor]:
    m, conv = _build(fx, training=True)
    m.train(fx.mode != "eval")
    x = fx.inputs
    draws = _Draws(fx.outputs["G_step/rng/pm_random_draws"])
    m.pm.order_source, m.pm.trace, m.trace = draws, _Wanted(fx, "G_step/pm/"), _Wanted(fx, "G_step/")
    # the dense cycle warp: as the converter resolved it, and never when --phase came from the
    # command line (official ``opt.phase is 'train'`` is then False)
    cycle = m.options.lambda_warp_cycle > 0 and "--phase" not in str(fx.data.get("official_command", ""))
    step: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        with _hooks(m, step):
            g_losses, fake, results = m.generator_losses(x["label"], x["ref"], x["label_ref"], x["image"],
                                                         x["self_ref"], cycle=cycle)
        _level_outputs(m, step, results, fake)
        step.update(m.trace)
        step["rng/pm_random_draws"] = torch.tensor(draws.used, dtype=torch.float64)
        _reload(m, conv, "netD.")
        d_losses = m.discriminator_losses(x["label"], fake, x["image"])
    out = {f"G_step/{k}": v for k, v in step.items()}
    for ours, value in {**g_losses, **d_losses}.items():
        side = "D_losses" if ours.startswith("D_") else "G_losses"
        out[f"{side}/{LOSS_NAMES[ours]}"] = value
    for name, value in out.items():  # official loss shapes (e.g. GANLoss returns shape (1,))
        shape = tuple(fx.meta.get(name, {}).get("shape", value.shape))
        if value.numel() == 1 and tuple(value.shape) != shape:
            out[name] = value.reshape(shape)
    return out


def run(fx: Fixture) -> Dict[str, torch.Tensor]:
    """Our outputs for ``fx`` by official output name (see the module doc for what runs)."""
    unknown = [n for n in fx.networks if n not in NETWORKS + ("vggnet_fix",)]
    if unknown:
        raise ValueError(f"{fx.name}: networks {unknown} are not CoCosNet v2's ({NETWORKS + ('vggnet_fix',)})")
    if "netD" in fx.networks and "netCorr" not in fx.networks:
        return _discriminator(fx)
    if any(name.startswith("G_losses/") for name in fx.outputs):
        return _losses(fx)
    return _inference(fx)
