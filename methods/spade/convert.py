"""Official NVlabs/SPADE checkpoints (``latest_net_G.pth``, ``latest_net_D.pth``, ``latest_net_E.pth``)
-> our ``spade`` method.

Key layout: official ``netG`` = ``fc`` + the trunk blocks (``head_0`` ... ``conv_img``) -> our ``fc`` +
``decoder.<block>``, with the SPADE layers' parts renamed (``param_free_norm`` -> ``norm``,
``mlp_shared`` -> ``shared``, ``mlp_gamma`` -> ``gamma``, ``mlp_beta`` -> ``beta``); ``netE`` (the
``ConvEncoder``) -> ``encoder.*`` as it is; ``netD`` ``discriminator_i.model_j`` -> ``netD.nets.i.layers.j``
(the official normed layers nest one Sequential deeper: ``model_j.0.0`` -> ``layers.j.0``). The map is
derived from our own module: every key our method expects is named in the official layout
(``official_key``) and the official state dict is checked against that, so an unknown, missing or
mis-shaped key is one ``ConversionError`` naming them all.

The ADE20K trap: SPADE's ADE20K loader maps ADE label 0 ('other') to one-hot channel 150 (label - 1),
while our datasets one-hot the raw ADE label (channel 0 = other, ``datasets/ade20k.py``). Converting an
``--dataset_mode ade20k`` checkpoint therefore rolls the label input channels by one position:
``fc.weight`` (without ``--use_vae``: a conv on the label map), every ``*.mlp_shared.0.weight`` and the
label part of each discriminator's first conv (its input is label + image).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Mapping, Tuple

import torch

from methods.common.convert import ConversionError, Converted, Release, build_converted, check_state_dict
from methods.common.spade_blocks import SPADEDecoder

OFFICIAL_REPO = "NVlabs/SPADE"
OFFICIAL_COMMIT = "fecacc920c1367a038995c45a39c15f6521ca64f"

NETWORKS = ("netG", "netD", "netE")
# Our state-dict prefixes of each official network.
NETWORK_PREFIXES: Dict[str, Tuple[str, ...]] = {"netG": ("fc.", "decoder."), "netE": ("encoder.",), "netD": ("netD.",)}
# Our loss names -> the official ones (G_losses / D_losses dictionaries of Pix2PixModel).
OFFICIAL_LOSS_NAMES = {"G_kld": "KLD", "G_gan": "GAN", "G_feat": "GAN_Feat", "G_vgg": "VGG",
                       "D_fake": "D_Fake", "D_real": "D_real"}
# Our SPADE layer's part names -> the official ones.
_SPADE_PARTS = {"norm": "param_free_norm", "shared": "mlp_shared", "gamma": "mlp_gamma", "beta": "mlp_beta"}
_NORM_G = re.compile(r"spectralspade(syncbatch|batch|instance)3x3")

# The README test command's options (TestOptions + ade20k dataset defaults), what opt.txt records.
_ADE20K_TEST_OPTIONS: Dict[str, Any] = {
    "aspect_ratio": 1.0, "batchSize": 1, "cache_filelist_read": False, "cache_filelist_write": False,
    "checkpoints_dir": "./checkpoints", "contain_dontcare_label": True, "crop_size": 256,
    "dataroot": "[path_to_dataset]", "dataset_mode": "ade20k", "display_winsize": 256, "gpu_ids": "0",
    "how_many": float("inf"), "init_type": "xavier", "init_variance": 0.02, "isTrain": False, "label_nc": 150,
    "load_from_opt_file": False, "load_size": 256, "max_dataset_size": 9223372036854775807, "model": "pix2pix",
    "nThreads": 0, "name": "ade20k_pretrained", "nef": 16, "netG": "spade", "ngf": 64, "no_flip": True,
    "no_instance": True, "no_pairing_check": False, "norm_D": "spectralinstance", "norm_E": "spectralinstance",
    "norm_G": "spectralspadesyncbatch3x3", "num_upsampling_layers": "normal", "output_nc": 3, "phase": "test",
    "preprocess_mode": "resize_and_crop", "results_dir": "./results/", "serial_batches": True, "use_vae": False,
    "which_epoch": "latest", "z_dim": 256,
}

RELEASES: Dict[str, Release] = {
    "ade20k_pretrained": Release(
        name="ade20k_pretrained",
        files={"netG": "latest_net_G.pth"},
        command="python test.py --name ade20k_pretrained --dataset_mode ade20k --dataroot [path_to_dataset]",
        options=_ADE20K_TEST_OPTIONS,
        dataset="ade20k", variant="full",
        note="checkpoints.tar.gz of the SPADE README (checkpoints/ade20k_pretrained/): the generator only, "
             "without --use_vae (no style encoder: the output ignores the exemplar; no netD/netE released, "
             "issues #91/#171). Label channels are rolled to our ADE20K one-hot (channel 0 = other).",
    ),
}


def official_key(ours: str, n_layers_d: int) -> Tuple[str, str]:
    """(official network, official key) of one of our state-dict keys."""
    if ours.startswith("fc."):
        return "netG", ours
    if ours.startswith("decoder."):
        parts = ours[len("decoder."):].split(".")
        return "netG", ".".join(_SPADE_PARTS.get(p, p) if i > 1 else p for i, p in enumerate(parts))
    if ours.startswith("encoder."):
        return "netE", ours[len("encoder."):]
    m = re.fullmatch(r"netD\.nets\.(\d+)\.layers\.(\d+)\.0\.(.+)", ours)
    if m:
        scale, layer, rest = m.group(1), int(m.group(2)), m.group(3)
        # official normed layers: model_j = Sequential(Sequential(SN conv, InstanceNorm), LeakyReLU)
        nested = "0." if 1 <= layer <= n_layers_d - 1 else ""
        return "netD", f"discriminator_{scale}.model{layer}.0.{nested}{rest}"
    raise KeyError(f"spade: no official counterpart known for our key {ours!r}")


def _require(options: Mapping[str, Any], key: str) -> Any:
    if key not in options:
        raise ConversionError(f"spade: the official options lack {key!r} (opt.txt always records it)")
    return options[key]


def semantic_nc(options: Mapping[str, Any]) -> int:
    """The official ``semantic_nc``: label_nc (+1 dontcare) (+1 instance edges)."""
    return (int(_require(options, "label_nc")) + (1 if _require(options, "contain_dontcare_label") else 0)
            + (0 if _require(options, "no_instance") else 1))


def resolve_options(options: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(our SPADEOptions as a dict, our context) reproducing an official options dict; a
    configuration our method cannot reproduce is a ``ConversionError`` naming every reason."""
    from methods.spade.model import SPADEOptions

    o = dict(options)
    problems = []

    def expect(key, allowed, default):
        value = o.get(key, default)
        if value not in allowed:
            problems.append(f"{key}={value!r} (supported: {', '.join(map(repr, allowed))})")
        return value

    expect("netG", ("spade",), "spade")
    expect("netD", ("multiscale",), "multiscale")
    expect("netD_subarch", ("n_layer",), "n_layer")
    expect("norm_D", ("spectralinstance",), "spectralinstance")
    expect("norm_E", ("spectralinstance",), "spectralinstance")
    expect("gan_mode", ("hinge",), "hinge")
    expect("aspect_ratio", (1.0,), 1.0)
    expect("output_nc", (3,), 3)
    expect("no_instance", (True,), None)  # instance edge maps: no dataset of ours provides them
    mode = expect("num_upsampling_layers", tuple(SPADEDecoder.UPSAMPLINGS), "normal")
    norm_g = str(_require(o, "norm_G"))
    m = _NORM_G.fullmatch(norm_g)
    if not m:
        problems.append(f"norm_G={norm_g!r} (supported: spectralspade{{syncbatch,batch,instance}}3x3)")
    crop = int(_require(o, "crop_size"))
    use_vae = bool(o.get("use_vae", False))
    down = SPADEDecoder.downsampling(mode) if mode in SPADEDecoder.UPSAMPLINGS else 1
    if crop % down:
        problems.append(f"crop_size={crop} is not a multiple of {down}")
    if use_vae and crop < 256:
        problems.append(f"use_vae with crop_size={crop}: the official encoder needs crop_size >= 256")
    if problems:
        raise ConversionError("spade: official configuration not supported: " + "; ".join(problems))
    ours = dataclasses.asdict(SPADEOptions())
    ours.update(
        ngf=int(_require(o, "ngf")), ndf=int(o.get("ndf", 64)), z_dim=int(o.get("z_dim", 256)),
        num_d=int(o.get("num_D", 2)), n_layers_d=int(o.get("n_layers_D", 4)),
        norm={"syncbatch": "batch"}.get(m.group(1), m.group(1)), num_upsampling_layers=mode, use_vae=use_vae,
        lambda_feat=0.0 if o.get("no_ganFeat_loss", False) else float(o.get("lambda_feat", 10.0)),
        lambda_vgg=0.0 if o.get("no_vgg_loss", False) else float(o.get("lambda_vgg", 10.0)),
        lambda_kld=float(o.get("lambda_kld", 0.05)),
        init_type=str(o.get("init_type", "xavier")), init_variance=float(o.get("init_variance", 0.02)),
    )
    nc = semantic_nc(o)
    ade = o.get("dataset_mode") == "ade20k"
    context = {"resolution": crop, "cond_channels": nc, "num_classes": nc,
               "dataset": "ade20k" if ade else str(o.get("dataset_mode", "official")),
               "variant": "full" if ade else None}
    return ours, context


def rolls_ade20k_labels(options: Mapping[str, Any]) -> bool:
    """Whether the label channels are rolled from SPADE's ADE20K order (channel c = ADE label c + 1,
    150 = ADE 0) to ours (channel c = ADE label c)."""
    return options.get("dataset_mode") == "ade20k"


def _roll_labels(network: str, key: str, value: torch.Tensor, nc: int) -> torch.Tensor:
    if network == "netG" and (key.endswith(".mlp_shared.0.weight") or (key == "fc.weight" and value.dim() == 4)):
        return torch.roll(value, 1, dims=1)  # ours[:, c] = official[:, (c - 1) mod nc]
    if network == "netD" and re.fullmatch(r"discriminator_\d+\.model0\.0\.weight", key):
        return torch.cat([torch.roll(value[:, :nc], 1, dims=1), value[:, nc:]], dim=1)
    return value


def convert(official: Mapping[str, Mapping[str, torch.Tensor]], options: Mapping[str, Any]) -> Converted:
    """Official state dicts by network (any of ``netG``, ``netD``, ``netE``; a release has netG) + an
    official options dict -> our state dict, options and context (see the module docstring)."""
    from methods.spade.model import SPADEMethod

    unknown = [n for n in official if n not in NETWORKS]
    if unknown:
        raise ConversionError(f"spade: unknown official networks {unknown} (known: {list(NETWORKS)})")
    if not official:
        raise ConversionError("spade: no official network to convert")
    ours_opts, context = resolve_options(options)
    # Our networks on the meta device name every key we expect (the loss VGG is not part of them).
    check_opts = dict(ours_opts, lambda_vgg=0.0)
    method = build_converted(SPADEMethod, Converted({}, check_opts, context), training="netD" in official)
    n_layers = ours_opts["n_layers_d"]
    to_ours: Dict[Tuple[str, str], str] = {}
    expected: Dict[str, torch.Size] = {}
    for key, value in method.state_dict().items():
        net, off = official_key(key, n_layers)
        if net in official:
            to_ours[(net, off)] = key
            expected[f"{net}.{off}"] = value.shape
    given = {f"{net}.{k}": v for net, sd in official.items() for k, v in sd.items()}
    check_state_dict(expected, given, f"spade: official {'/'.join(official)} vs our spade "
                                      f"({context['resolution']}px, {context['cond_channels']} label channels)")
    roll = rolls_ade20k_labels(options)
    state = {}
    for net, sd in official.items():
        for k, v in sd.items():
            state[to_ours[(net, k)]] = _roll_labels(net, k, v, context["cond_channels"]) if roll else v
    return Converted(state_dict=state, options=ours_opts, context=context, dropped={})
