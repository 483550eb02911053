"""Official CoCosNet v2 checkpoints (microsoft/CoCosNet-v2 @5ebd60c) -> our ``cocosnet_v2``.

The release (README: ``checkpoints/deepfashionHD/latest_net_{Corr,G,D}.pth``) holds three state
dicts: ``netCorr`` (``NoVGGHPMCorrespondence``: the two ``AdaptiveFeatureGenerator``s, theta_0..3,
phi_0..3 and the ``PatchMatchGRU``), ``netG`` (the v2 ``SPADEGenerator``) and ``netD``
(``MultiscaleDiscriminator``). Its ``latest_net_Corr.pth`` is a broken torch zip;
``methods.common.convert.load_official_file`` repairs it.

Key mapping (official -> ours; values are never changed, only renamed):

* netCorr ``adaptive_model_seg.*`` / ``adaptive_model_img.*`` -> ``enc_a.*`` / ``enc_b.*``, with
  ``layer3..5`` -> ``downs.0..2`` and ``head_0, G_middle_0..2`` -> ``ups.0..3``; ``theta_i`` /
  ``phi_i`` -> ``theta.i`` / ``phi.i``; ``patch_match.initial_layer`` ->
  ``pm.refiner.initial_layer``; ``patch_match.refine_net.{encoder, gru, flow_head}`` ->
  ``pm.refiner.{encoder, cell, flow_head}``.
* netG -> ``netG.*``. In every SPADE norm ``mlp_shared.1`` / ``mlp_gamma`` / ``mlp_beta`` ->
  ``shared.0`` / ``gamma`` / ``beta``.
* netD ``discriminator_i.model0.0`` / ``model{1..n-1}.0.0`` (spectral conv inside the norm's
  Sequential) / ``model{n}.0`` -> ``netD.nets.i.layers.{0..n}.0``.
* Dropped: ``discriminator_i.dec.*`` (a decoder the official D builds but never calls) and every
  ``ResidualBlock``'s ``relu.weight`` (the same PReLU as ``model.3.weight``, listed twice in the
  state dict; the official ``load_state_dict`` writes ``model.3.weight`` last, so that value is
  the one used, for both of our keys).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from methods.common.convert import ConversionError, Converted, Release

OFFICIAL_REPO = "microsoft/CoCosNet-v2"
OFFICIAL_COMMIT = "5ebd60c1bedb242be99060a66e4de06f6fe9018d"

TEST_COMMAND = ("python test.py --name deepfashionHD --dataset_mode deepfashionHD --dataroot dataset/deepfashionHD "
                "--PONO --PONO_C --no_flip --batchSize 8 --gpu_ids 0 --netCorr NoVGGHPM --nThreads 16 --nef 32 "
                "--amp --display_winsize 512 --iteration_count 5 --load_size 512 --crop_size 512")

# What opt.txt records for the README test command (test_options.py + base_options.py + the
# deepfashionHD dataset and SPADEGenerator option setters).
TEST_OPTIONS: Dict[str, Any] = {
    "CBN_intype": "warp_mask", "PONO": True, "PONO_C": True, "amp": True, "aspect_ratio": 1.0, "batchSize": 8,
    "cache_filelist_read": False, "cache_filelist_write": False, "checkpoints_dir": "./checkpoints",
    "contain_dontcare_label": False, "crop_size": 512, "dataroot": "dataset/deepfashionHD",
    "dataset_mode": "deepfashionHD", "display_winsize": 512, "featEnc_kernel": 3, "gpu_ids": "0",
    "how_many": float("inf"), "init_type": "xavier", "init_variance": 0.02, "isTrain": False, "iteration_count": 5,
    "label_nc": 20, "load_from_opt_file": False, "load_size": 512, "match_kernel": 1,
    "max_dataset_size": 9223372036854775807, "model": "pix2pix", "nThreads": 16, "name": "deepfashionHD", "nef": 32,
    "netCorr": "NoVGGHPM", "netG": "spade", "ngf": 64, "no_flip": True, "no_pairing_check": True,
    "norm_D": "spectralinstance", "norm_E": "spectralinstance", "norm_G": "spectralspadesyncbatch3x3",
    "output_nc": 3, "phase": "test", "preprocess_mode": "resize_and_crop", "results_dir": "./results/",
    "save_per_img": False, "serial_batches": True, "show_corr": False, "temperature": 0.01, "use_coordconv": False,
    "vgg_normal_correct": False, "video_like": False, "which_epoch": "latest",
}

RELEASES: Dict[str, Release] = {
    "deepfashionHD": Release(
        name="deepfashionHD",
        files={"netCorr": "latest_net_Corr.pth", "netG": "latest_net_G.pth", "netD": "latest_net_D.pth"},
        command=TEST_COMMAND, options=TEST_OPTIONS, dataset="deepfashion", variant="hd",
        optional_files=("netD",),
        note="DeepFashion-HD pose -> person at 512x512 (the README's Google-Drive release); "
             "latest_net_Corr.pth is a broken zip that load_official_file repairs."),
}

# official dataset_mode -> our (dataset, variant)
DATASETS = {"deepfashionHD": ("deepfashion", "hd")}

_ENCODER_BLOCKS = {"layer3": "downs.0", "layer4": "downs.1", "layer5": "downs.2",
                   "head_0": "ups.0", "G_middle_0": "ups.1", "G_middle_1": "ups.2", "G_middle_2": "ups.3"}
_REFINER = {"initial_layer": "initial_layer", "refine_net.encoder": "encoder", "refine_net.gru": "cell",
            "refine_net.flow_head": "flow_head"}
_SPADE = (("mlp_shared.1.", "shared.0."), ("mlp_gamma.", "gamma."), ("mlp_beta.", "beta."))
_PRELU_ALIAS = re.compile(r"^adaptive_model_(seg|img)\.layer\d\.1\.relu\.weight$")
_D_DEC = re.compile(r"^discriminator_\d+\.dec\.")

DROPPED = {
    "netD: discriminator_*.dec.*": "a decoder the official discriminator builds but never calls",
    "netCorr: adaptive_model_*.layer*.1.relu.weight": (
        "the same PReLU as layer*.1.model.3.weight (listed twice; the official load writes model.3.weight last: "
        "that value is used)"),
}


def _spade(key: str) -> str:
    for old, new in _SPADE:
        key = key.replace(old, new)
    return key


def _corr_key(key: str) -> Optional[List[str]]:
    """Our key(s) for an official netCorr key, None if unknown."""
    m = re.match(r"^adaptive_model_(seg|img)\.([A-Za-z_0-9]+)\.(.+)$", key)
    if m:
        enc = {"seg": "enc_a", "img": "enc_b"}[m.group(1)]
        block, rest = m.group(2), m.group(3)
        if block in ("layer1", "layer2"):
            ours = f"{enc}.{block}.{rest}"
        elif block in _ENCODER_BLOCKS:
            ours = f"{enc}.{_ENCODER_BLOCKS[block]}.{_spade(rest)}"
        else:
            return None
        if rest.endswith("1.model.3.weight"):  # the shared PReLU: both of our keys (see module doc)
            return [ours, ours.replace(".model.3.weight", ".relu.weight")]
        return [ours]
    m = re.match(r"^(theta|phi)_(\d+)\.(weight|bias)$", key)
    if m:
        return [f"{m.group(1)}.{m.group(2)}.{m.group(3)}"]
    for prefix, ours in _REFINER.items():
        if key.startswith(f"patch_match.{prefix}."):
            return [f"pm.refiner.{ours}.{key[len('patch_match.' + prefix) + 1:]}"]
    return None


def _g_key(key: str) -> Optional[List[str]]:
    if re.match(r"^(fc|conv_img)\.(weight|bias)$", key) or re.match(r"^(head_0|G_middle_[01]|up_[0-3])\.", key):
        return [f"netG.{_spade(key)}"]
    return None


def _d_key(key: str, last: int) -> Optional[List[str]]:
    m = re.match(r"^discriminator_(\d+)\.model(\d+)\.(.+)$", key)
    if not m:
        return None
    scale, layer, rest = m.group(1), int(m.group(2)), m.group(3)
    if 0 < layer < last:  # norm_layer(conv) = Sequential(spectral conv, InstanceNorm): one level deeper
        if not rest.startswith("0.0."):
            return None
        rest = rest[2:]
    return [f"netD.nets.{scale}.layers.{layer}.{rest}"]


def _d_last_layer(state: Mapping[str, Any]) -> int:
    layers = [int(m.group(1)) for k in state for m in [re.match(r"^discriminator_\d+\.model(\d+)\.", k)] if m]
    return max(layers) if layers else 0


def convert_state_dicts(official: Mapping[str, Mapping[str, torch.Tensor]]
                        ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Official network state dicts (``netCorr``, ``netG``, ``netD``) -> our state dict and the
    dropped keys with why. One ``ConversionError`` lists every unknown network or key."""
    unknown_nets = [n for n in official if n not in ("netCorr", "netG", "netD")]
    ours: Dict[str, torch.Tensor] = {}
    unknown: List[str] = []
    dropped: Dict[str, str] = {}
    for net, state in official.items():
        if net in unknown_nets:
            continue
        last = _d_last_layer(state)
        for key, value in state.items():
            pattern = ("netD: discriminator_*.dec.*" if net == "netD" and _D_DEC.match(key) else
                       "netCorr: adaptive_model_*.layer*.1.relu.weight" if net == "netCorr" and _PRELU_ALIAS.match(key)
                       else None)
            if pattern:
                dropped[pattern] = DROPPED[pattern]
                continue
            mapped = {"netCorr": _corr_key, "netG": _g_key, "netD": lambda k: _d_key(k, last)}[net](key)
            if mapped is None:
                unknown.append(f"{net}: {key}")
                continue
            for k in mapped:
                ours[k] = value
    if unknown_nets or unknown:
        lines = [f"CoCosNet v2 conversion: {len(unknown_nets)} unknown networks, {len(unknown)} unknown keys"]
        lines += [f"  unknown network: {n} (known: netCorr, netG, netD)" for n in unknown_nets]
        lines += [f"  unknown key: {k}" for k in unknown[:60]]
        if len(unknown) > 60:
            lines.append(f"  ... and {len(unknown) - 60} more")
        raise ConversionError("\n".join(lines))
    return ours, dropped


def _require(options: Mapping[str, Any], key: str, allowed, problems: List[str]) -> None:
    if key in options and options[key] not in allowed:
        problems.append(f"{key}={options[key]!r} (supported: {list(allowed)})")


def convert_options(options: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """An official options dict -> (our ``CoCosNetV2Options`` fields, our context)."""
    o = dict(options)
    problems: List[str] = []
    _require(o, "netCorr", ("NoVGGHPM",), problems)
    _require(o, "netG", ("spade",), problems)
    _require(o, "match_kernel", (1,), problems)
    _require(o, "PONO", (True,), problems)
    _require(o, "PONO_C", (True,), problems)
    _require(o, "use_coordconv", (False,), problems)
    _require(o, "aspect_ratio", (1.0,), problems)
    _require(o, "gan_mode", ("hinge",), problems)
    _require(o, "which_perceptual", ("4_2", "5_2"), problems)
    if o.get("isTrain"):  # our loss VGG always maps [-1, 1] to [0, 1] first (--vgg_normal_correct)
        _require(o, "vgg_normal_correct", (True,), problems)
    norm_g, norm_e = str(o.get("norm_G", "spectral")), str(o.get("norm_E", "spectralinstance"))
    if "spectral" not in norm_g or norm_e != "spectralinstance":
        problems.append(f"norm_G={o.get('norm_G')!r}, norm_E={o.get('norm_E')!r} (supported: spectral SPADE, "
                        "spectralinstance encoder)")
    if problems:
        raise ConversionError("CoCosNet v2: official options our implementation does not reproduce:\n  "
                              + "\n  ".join(problems))
    ours: Dict[str, Any] = {"levels": (8, 4, 2, 1)}  # the official code's four levels (64..512 at 512^2)
    simple = {"nef": "nef", "ngf": "ngf", "ndf": "ndf", "featEnc_kernel": "feat_kernel",
              "iteration_count": "iterations", "temperature": "temperature", "num_D": "num_d",
              "n_layers_D": "n_layers_d", "init_type": "init_type", "init_variance": "init_gain",
              "weight_novgg_featpair": "lambda_align", "weight_warp_self": "lambda_corr",
              "weight_perceptual": "lambda_perc", "weight_vgg": "lambda_vgg", "weight_fm_ratio": "fm_ratio",
              "weight_contextual": "lambda_contextual", "weight_gan": "lambda_gan", "weight_ganFeat": "lambda_gan_feat"}
    for theirs, mine in simple.items():
        if theirs in o:
            ours[mine] = o[theirs]
    if "which_perceptual" in o:
        ours["perceptual_layer"] = {"4_2": "r42", "5_2": "r52"}[o["which_perceptual"]]
    if o.get("no_ganFeat_loss"):
        ours["lambda_gan_feat"] = 0.0
    if o.get("isTrain"):
        # The cycle warp runs only when ``opt.phase is 'train'`` (the default phase; a --phase given
        # on the command line is a different string object and switches it off, which opt.txt
        # cannot show).
        ours["lambda_warp_cycle"] = float(o.get("weight_warp_cycle", 0.0)) if o.get("phase") == "train" else 0.0
        if o.get("video_like"):  # same-person exemplars, the photo as ground truth (self_ref = 1)
            ours.update(real_reference_probability=1.0, use_target_as_gt=True)
        else:
            ours["real_reference_probability"] = float(o.get("real_reference_probability", 0.0))
    dataset, variant = DATASETS.get(o.get("dataset_mode"), (o.get("dataset_mode") or "official", None))
    context = {"resolution": int(o.get("crop_size", 512)),
               "cond_channels": int(o.get("label_nc", 20)) + (1 if o.get("contain_dontcare_label") else 0),
               "num_classes": None, "dataset": dataset, "variant": variant}
    return ours, context


def convert(official: Mapping[str, Mapping[str, torch.Tensor]], options: Mapping[str, Any]) -> Converted:
    """Official state dicts by network name + an official options dict -> ``Converted``."""
    state, dropped = convert_state_dicts(official)
    ours, context = convert_options(options)
    return Converted(state_dict=state, options=ours, context=context, dropped=dropped)


__all__ = ["DATASETS", "RELEASES", "TEST_COMMAND", "TEST_OPTIONS", "convert", "convert_options", "convert_state_dicts"]
