"""Official CoCosNet v1 checkpoints (microsoft/CoCosNet @de0c1bb) -> our ``cocosnet`` method.

The releases (README "Inference Using Pretrained Model") are folders ``checkpoints/<name>/`` with
``latest_net_G.pth`` and ``latest_net_Corr.pth`` (a training folder also has ``latest_net_D.pth``
and ``opt.txt``). ``RELEASES`` holds each one's README test command and the options it gives
(what ``opt.txt`` would record); ``convert`` maps official state dicts to ours:

* netG / netCorr: same module names except the SPADE MLPs (``mlp_shared.1`` / ``mlp_gamma`` /
  ``mlp_beta`` -> ``shared.0`` / ``gamma`` / ``beta``; the official index 0 is a padding layer)
  and the adaptors (``adaptive_model_seg`` / ``adaptive_model_img`` -> ``adaptor_seg`` /
  ``adaptor_img``). The correspondence ``ResidualBlock`` conv biases are dropped: an affine-free
  instance norm follows each conv and removes them exactly (they never get a gradient either).
* netD: ``discriminator_<i>.model<j>`` -> ``nets.<i>.layers.<j>`` (the official spectral-norm groups
  nest one level deeper), ``attn`` kept; the ``dec`` decoder is dropped: it is built but never
  called by the official code (it would only feed an unused segmentation head).

Options outside what our method implements (coordconv, SE/non-local/deeper adaptors, equalised
lr, mask noise, the domain classifier, CAM, EMA-only releases are fine) are a ``ConversionError``.
"""
from __future__ import annotations

import re
import shlex
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from methods.common.convert import ConversionError, Converted, Release

OFFICIAL_REPO = "microsoft/CoCosNet"
OFFICIAL_COMMIT = "de0c1bbd3389e0ae4631997513d7ddca32ce4432"

# ---- the official options --------------------------------------------------------------------
# TestOptions defaults (options/base_options.py + test_options.py, with SPADEGenerator's norm_G):
# what opt.txt records for a test command, before the dataset's own defaults and the command.
_TEST_DEFAULTS: Dict[str, Any] = {
    "CBN_intype": "warp_mask", "PONO": False, "PONO_C": False, "adaptor_kernel": 3, "adaptor_nonlocal": False,
    "adaptor_res_deeper": False, "adaptor_se": False, "apex": False, "aspect_ratio": 1.0, "batchSize": 4,
    "cache_filelist_read": False, "cache_filelist_write": False, "checkpoints_dir": "./checkpoints",
    "contain_dontcare_label": False, "crop_size": 256, "dataroot": "/mnt/blob/Dataset/ADEChallengeData2016/images",
    "dataset_mode": "ade20k", "dilation_conv": False, "display_winsize": 256, "domain_rela": False, "ema_beta": 0.999,
    "eqlr_sn": False, "gpu_ids": "0,1,2,3", "how_many": float("inf"), "init_type": "xavier", "init_variance": 0.02,
    "isTrain": False, "label_nc": 182, "load_from_opt_file": False, "load_size": 256, "mask_noise": False,
    "maskmix": False, "match_kernel": 3, "max_dataset_size": sys.maxsize, "model": "pix2pix", "nThreads": 16,
    "name": "label2coco", "netG": "spade", "ngf": 64, "no_flip": True, "no_pairing_check": False,
    "noise_for_mask": False, "norm_D": "spectralinstance", "norm_E": "spectralinstance",
    "norm_G": "spectralspadesyncbatch3x3", "output_nc": 3, "phase": "test", "preprocess_mode": "scale_width_and_crop",
    "results_dir": "./results/", "save_per_img": False, "serial_batches": True, "show_corr": False,
    "show_warpmask": False, "two_cycle": False, "use_attention": False, "use_coordconv": False, "use_ema": False,
    "vgg_normal_correct": False, "video_like": False, "warp_bilinear": False, "warp_cycle_w": 0.0,
    "warp_mask_losstype": "none", "warp_patch": False, "warp_stride": 4, "weight_domainC": 0.0,
    "which_epoch": "latest", "z_dim": 256,
}
_FOLDER = {"preprocess_mode": "resize_and_crop", "load_size": 256, "crop_size": 256, "display_winsize": 256,
           "cache_filelist_read": False, "cache_filelist_write": False}
# data/<mode>_dataset.py modify_commandline_options (test phase)
_DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "ade20k": {**_FOLDER, "label_nc": 150, "contain_dontcare_label": True},
    "celebahq": {**_FOLDER, "label_nc": 19, "contain_dontcare_label": False, "no_pairing_check": True},
    "celebahqedge": {**_FOLDER, "label_nc": 15, "contain_dontcare_label": False, "no_pairing_check": True},
    "deepfashion": {**_FOLDER, "label_nc": 20, "contain_dontcare_label": False, "no_pairing_check": True},
}
# Our dataset and variant per official dataset_mode, and whether the condition is a one-hot label map.
_DATASETS: Dict[str, Tuple[str, str, bool]] = {
    "ade20k": ("ade20k", "full", True), "celebahq": ("celebahq", "mask", True),
    "celebahqedge": ("celebahq", "edge", False), "deepfashion": ("deepfashion", "inshop", False),
}


def command_options(command: str) -> Dict[str, Any]:
    """The options a README ``test.py`` command gives: TestOptions defaults, the dataset's defaults,
    then the command's flags (``--flag`` = True, ``--key value`` typed like the default)."""
    args = shlex.split(command)
    flags: Dict[str, Any] = {}
    i = next(k for k, a in enumerate(args) if a.startswith("--"))
    while i < len(args):
        key = args[i][2:]
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            flags[key], i = args[i + 1], i + 2
        else:
            flags[key], i = True, i + 1
    mode = flags.get("dataset_mode", _TEST_DEFAULTS["dataset_mode"])
    out = {**_TEST_DEFAULTS, **_DATASET_DEFAULTS[mode]}
    for key, value in flags.items():
        default = out.get(key)
        if value is not True and isinstance(default, (int, float)) and not isinstance(default, bool):
            value = type(default)(value)
        out[key] = value
    return out


_README_TEST = {
    "ade20k": "python test.py --name ade20k --dataset_mode ade20k --dataroot ./imgs/ade20k --gpu_ids 0 --nThreads 0 "
              "--batchSize 6 --use_attention --maskmix --warp_mask_losstype direct --PONO --PONO_C",
    "celebahq": "python test.py --name celebahq --dataset_mode celebahq --dataroot ./imgs/celebahq --gpu_ids 0 "
                "--nThreads 0 --batchSize 4 --use_attention --maskmix --warp_mask_losstype direct --PONO --PONO_C "
                "--warp_bilinear --adaptor_kernel 4",
    "celebahqedge": "python test.py --name celebahqedge --dataset_mode celebahqedge --dataroot ./imgs/celebahqedge "
                    "--gpu_ids 0 --nThreads 0 --batchSize 4 --use_attention --maskmix --PONO --PONO_C --warp_bilinear "
                    "--adaptor_kernel 4",
    "deepfashion": "python test.py --name deepfashion --dataset_mode deepfashion --dataroot ./imgs/DeepFashion "
                   "--gpu_ids 0 --nThreads 0 --batchSize 4 --use_attention --PONO --PONO_C --warp_bilinear --no_flip "
                   "--warp_patch --video_like --adaptor_kernel 4",
}
_FILES = {"netG": "latest_net_G.pth", "netCorr": "latest_net_Corr.pth", "netD": "latest_net_D.pth"}


def _release(name: str) -> Release:
    options = command_options(_README_TEST[name])
    dataset, variant, _ = _DATASETS[options["dataset_mode"]]
    return Release(name=name, files=dict(_FILES), command=_README_TEST[name], options=options, dataset=dataset,
                   variant=variant, optional_files=("netD",),
                   note="test.py loads netG and netCorr only; a training folder's netD converts too")


RELEASES: Dict[str, Release] = {name: _release(name) for name in _README_TEST}

# ---- options -----------------------------------------------------------------------------------
def _unsupported(opt: Mapping[str, Any]) -> List[str]:
    train = bool(opt.get("isTrain"))
    checks = [
        (opt.get("netG", "spade") != "spade", "netG (only 'spade')"),
        (opt.get("CBN_intype", "warp_mask") not in ("warp_mask", "warp"), "CBN_intype 'mask'"),
        (not re.fullmatch(r"spectralspade\w+3x3", str(opt.get("norm_G", "spectralspadesyncbatch3x3"))),
         "norm_G (only spectralspade<norm>3x3)"),
        (opt.get("norm_E", "spectralinstance") != "spectralinstance", "norm_E (only spectralinstance)"),
        (train and opt.get("norm_D", "spectralinstance") != "spectralinstance", "norm_D (only spectralinstance)"),
        (float(opt.get("aspect_ratio", 1.0)) != 1.0, "aspect_ratio != 1"),
        (train and opt.get("netD", "multiscale") != "multiscale", "netD (only multiscale)"),
        (train and opt.get("netD_subarch", "n_layer") != "n_layer", "netD_subarch (only n_layer)"),
        (train and opt.get("gan_mode", "hinge") != "hinge", "gan_mode (only hinge)"),
        (train and not opt.get("vgg_normal_correct", True), "training without --vgg_normal_correct"),
        (float(opt.get("D_cam", 0.0)) > 0, "D_cam"),
        (float(opt.get("weight_domainC", 0.0)) > 0, "weight_domainC (domain classifier)"),
        (train and opt.get("warp_mask_losstype") == "cycle" and float(opt.get("weight_mask", 0.0)) > 0,
         "warp_mask_losstype cycle"),
    ] + [(bool(opt.get(k)), k) for k in ("use_coordconv", "adaptor_nonlocal", "adaptor_res_deeper", "adaptor_se",
                                         "eqlr_sn", "mask_noise", "noise_for_mask", "two_cycle")]
    return [what for bad, what in checks if bad]


def _param_free_norm(opt: Mapping[str, Any]) -> str:
    if opt.get("PONO"):
        return "positional"
    kind = re.fullmatch(r"spectralspade(\w+)3x3", str(opt.get("norm_G", "spectralspadesyncbatch3x3"))).group(1)
    return {"syncbatch": "batch", "batch": "batch", "instance": "instance"}[kind]


def method_options(opt: Mapping[str, Any]) -> Dict[str, Any]:
    """Our ``CoCosNetOptions`` (as a dict) for an official options dict. Training-only options
    (losses, self-reference sampling, schedule) are read only from training options (``isTrain``);
    a test command leaves them at our defaults (the official training defaults)."""
    bad = _unsupported(opt)
    if bad:
        raise ConversionError(f"cocosnet: official options our method does not implement: {', '.join(bad)}")
    get = lambda k, d: opt.get(k, d)  # noqa: E731
    out: Dict[str, Any] = {
        "ngf": int(get("ngf", 64)), "ndf": int(get("ndf", 64)), "num_d": int(get("num_D", 2)),
        "n_layers_d": int(get("n_layers_D", 4)), "norm": _param_free_norm(opt),
        "use_attention": bool(get("use_attention", False)), "adaptor_kernel": int(get("adaptor_kernel", 3)),
        "match_kernel": int(get("match_kernel", 3)), "corr_centre": "channel" if get("PONO_C", False) else "spatial",
        "warp_down": int(get("warp_stride", 4)), "warp_bilinear": bool(get("warp_bilinear", False)),
        "warp_patch": bool(get("warp_patch", False)), "maskmix": bool(get("maskmix", False)),
        "cbn_input": str(get("CBN_intype", "warp_mask")), "init_type": str(get("init_type", "xavier")),
        "init_gain": float(get("init_variance", 0.02)), "vgg": "caffe",
        "lambda_cycle": float(get("warp_cycle_w", 0.0)),
    }
    if opt.get("isTrain"):
        lambda_vgg = float(get("lambda_vgg", 10.0))
        niter, decay = float(get("niter", 100)), float(get("niter_decay", 100))
        out.update({
            "lambda_gan": float(get("weight_gan", 10.0)),
            "lambda_gan_feat": 0.0 if get("no_ganFeat_loss", False) else float(get("lambda_feat", 10.0)),
            "lambda_feat_vgg": lambda_vgg * float(get("fm_ratio", 0.1)),
            "lambda_perc": float(get("weight_perceptual", 0.01)),
            "perc_layer": {"5_2": "relu5_2", "4_2": "relu4_2"}[str(get("which_perceptual", "5_2"))],
            "lambda_context": lambda_vgg * float(get("ctx_w", 1.0)),
            "context_use_22": bool(get("use_22ctx", False)),
            "lambda_domain": float(get("novgg_featpair", 10.0)),
            "lambda_mask": float(get("weight_mask", 0.0)) if get("warp_mask_losstype", "none") == "direct" else 0.0,
            "lambda_warp_self": float(get("warp_self_w", 0.0)),
            "self_ref_probability": 1.0 - float(get("real_reference_probability", 0.7)),
            "pseudo_pair": "exemplar" if get("video_like", False) else "recrop",
            "pseudo_flip": not get("no_flip", False),
            "recrop_scale": float(get("crop_size", 256)) / float(get("load_size", 286)),
            "lr_decay_start": niter / (niter + decay) if niter + decay > 0 else 1.0,
        })
    return out


def context(opt: Mapping[str, Any]) -> Dict[str, Any]:
    """Resolution, condition channels, classes and our dataset/variant of an official options dict."""
    mode = str(opt.get("dataset_mode", "ade20k"))
    if mode not in _DATASETS:
        raise ConversionError(f"cocosnet: unknown official dataset_mode {mode!r} (known: {', '.join(_DATASETS)})")
    dataset, variant, label_map = _DATASETS[mode]
    semantic_nc = int(opt["label_nc"]) + (1 if opt.get("contain_dontcare_label") else 0)
    return {"resolution": int(opt.get("crop_size", 256)), "cond_channels": semantic_nc,
            "num_classes": semantic_nc if label_map else None, "dataset": dataset, "variant": variant}


# ---- state-dict keys -----------------------------------------------------------------------------
_SN = r"(weight_orig|weight_u|weight_v)"
Rule = Tuple[str, str]  # (official key regex, our key template); matched with re.fullmatch


def _spade_blocks(blocks: str) -> List[Rule]:
    """The SPADE residual blocks named by the regex group ``blocks``."""
    return [
        (rf"{blocks}\.(conv_[01])\.(bias|weight_orig|weight_u|weight_v)", r"\1.\2.\3"),
        (rf"{blocks}\.conv_s\.{_SN}", r"\1.conv_s.\2"),
        (rf"{blocks}\.norm_([01s])\.mlp_shared\.1\.(weight|bias)", r"\1.norm_\2.shared.0.\3"),
        (rf"{blocks}\.norm_([01s])\.mlp_(gamma|beta)\.(weight|bias)", r"\1.norm_\2.\3.\4"),
    ]


_ATTENTION: Rule = (r"attn\.(gamma|(?:theta|phi|g|o)\.weight_(?:orig|u|v))", r"attn.\1")
_G_RULES: List[Rule] = [(r"(fc|conv_img)\.(weight|bias)", r"\1.\2"), _ATTENTION] + _spade_blocks(r"(head_0|G_middle_[01]|up_[0-3])")
_ADAPTOR_RULES: List[Rule] = [(rf"(layer[1-5])\.0\.{_SN}", r"\1.0.\2")] + _spade_blocks(r"(head_0|G_middle_[01])")
_CORR_RULES: List[Rule] = [(r"layer\.(\d+)\.(conv[12]\.weight|prelu\.weight)", r"layer.\1.\2"),
                           (r"(theta|phi)\.(weight|bias)", r"\1.\2")]
_D_RULES: List[Rule] = [(r"model(\d+)\.0\.(weight|bias)", r"layers.\1.0.\2"),  # plain convs (first, logits)
                        (rf"model(\d+)\.0\.0\.{_SN}", r"layers.\1.0.\2"),  # spectral norm + instance norm groups
                        _ATTENTION]
# Official keys left out on purpose (pattern as shown in Converted.dropped -> regex, why).
_DROPPED: Dict[str, Tuple[str, str]] = {
    "netCorr.layer.*.conv*.bias": (r"layer\.\d+\.conv[12]\.bias",
                                   "ResidualBlock conv biases: the affine-free InstanceNorm after each conv "
                                   "removes them exactly (no effect, no gradient)"),
    "netD.discriminator_*.dec.*": (r"discriminator_\d+\.dec\..*",
                                   "the D's decoder is built but never called by the official code"),
}


def _apply(rules: List[Rule], key: str) -> Optional[str]:
    for pattern, template in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template)
    return None


def our_key(net: str, key: str) -> Optional[str]:
    """Our state-dict key for official ``key`` of network ``net`` (``netG``, ``netCorr``,
    ``netD``); None if it is deliberately dropped (``dropped_as``). Raises ``KeyError`` for a key
    no rule knows."""
    if dropped_as(net, key):
        return None
    mapped = None
    if net == "netG":
        mapped = _apply(_G_RULES, key)
    elif net == "netCorr":
        m = re.fullmatch(r"adaptive_model_(seg|img)\.(.+)", key)
        inner = _apply(_ADAPTOR_RULES, m.group(2)) if m else None
        mapped = f"adaptor_{m.group(1)}.{inner}" if inner else _apply(_CORR_RULES, key)
    elif net == "netD":
        m = re.fullmatch(r"discriminator_(\d+)\.(.+)", key)
        inner = _apply(_D_RULES, m.group(2)) if m else None
        mapped = f"nets.{m.group(1)}.{inner}" if inner else None
    if mapped is None:
        raise KeyError(f"{net}.{key}")
    return f"{net}.{mapped}"


def dropped_as(net: str, key: str) -> Optional[str]:
    """The ``Converted.dropped`` entry covering official ``net.key`` (None: the key is converted)."""
    return next((shown for shown, (pattern, _) in _DROPPED.items()
                 if shown.startswith(net + ".") and re.fullmatch(pattern, key)), None)


def convert(official: Dict[str, Dict[str, torch.Tensor]], options: Dict[str, Any]) -> Converted:
    """Official state dicts by network (``netG``, ``netCorr``, optionally ``netD``) and an official
    options dict -> our state dict, options and context. Works on meta tensors (renaming only).
    Every official key must be known (one ``ConversionError`` lists the unknown ones); whether the
    result fits our network (missing keys, shapes) is checked against the network built from the
    returned options (``methods.common.convert.check_state_dict``; ``python -m bench.convert``)."""
    unknown_nets = sorted(set(official) - {"netG", "netCorr", "netD"})
    state: Dict[str, torch.Tensor] = {}
    dropped: Dict[str, str] = {}
    unknown: List[str] = [f"{n}.* (unknown network; CoCosNet has netG, netCorr, netD)" for n in unknown_nets]
    for net in ("netG", "netCorr", "netD"):
        for key, value in official.get(net, {}).items():
            try:
                ours = our_key(net, key)
            except KeyError:
                unknown.append(f"{net}.{key}")
                continue
            if ours is None:
                shown = dropped_as(net, key)
                dropped[shown] = _DROPPED[shown][1]
            else:
                state[ours] = value
    if unknown:
        lines = [f"cocosnet: {len(unknown)} official keys no rule knows"] + [f"  unknown: {k}" for k in unknown[:40]]
        if len(unknown) > 40:
            lines.append(f"  unknown: ... and {len(unknown) - 40} more")
        raise ConversionError("\n".join(lines))
    return Converted(state_dict=state, options=method_options(options), context=context(options), dropped=dropped)
