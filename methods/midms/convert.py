"""Official MIDMs checkpoints (KU-CVLAB/MIDMs @625d88a) -> our ``midms`` method.

The release (README "Pretrained weights", CelebA-HQ edge-to-face only) is ``weights/celeba/``:

* ``midms_celebA_finetuned.pth`` -- train.py's ``save_checkpoint`` dict; its ``state_dict`` is
  ``MIDMs.state_dict()``: the matching networks (``seg_enc``, ``real_enc``, ``iter_enc``, ``layer``,
  ``theta``, ``phi``), the fine-tuned LatentDiffusion under ``diff_model.`` (UNet
  ``model.diffusion_model.*``, frozen VQ-f4 ``first_stage_model.*``, LDM's EMA copy and schedule
  buffers), and the ``DDIMSampler`` -- which holds the same LatentDiffusion as a submodule, so
  ``diffusion_sampler.model.*`` repeats every ``diff_model.*`` key -- with its DDIM buffers;
* ``pretrained/config.yaml`` + ``pretrained/model.ckpt`` -- the LDM it started from (LDM layout,
  no ``diff_model.``). ``inference.py`` builds the model from them and then loads the fine-tuned
  state dict over it (``strict=False``), so the fine-tuned ``diff_model.*`` wins wherever both exist;
  ``model.ckpt`` alone is the official *training* start (matching networks at random init).

``convert({"MIDMs": state, "LDM": state}, options)`` takes either or both. The LDM parts go
through ``ldm_convert`` (UNet qkv layout, VQ-f4 levels); the matching networks map by module name
(``seg_enc``/``real_enc``/``iter_enc`` -> ``f_x``/``f_y``/``f_y_iter``, ``G_middle_1`` -> ``block``,
SPADE ``mlp_shared.1``/``mlp_gamma``/``mlp_beta`` -> ``shared.0``/``gamma``/``beta``). Everything is
renaming, so it runs on meta tensors.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from methods.common.convert import ConversionError, Converted, Release, format_key_problems
from methods.midms.components import ldm_spec
from methods.midms.ldm_convert import (LDM_CONFIGS, LDMSpec, MIDMS_PREFIX, convert_ldm_state_dict, detect_prefix,
                                       ldm_config_for)
from methods.midms.matching import MatchingNetworks
from methods.midms.recipes import RECIPES

OFFICIAL_REPO = "KU-CVLAB/MIDMs"
OFFICIAL_COMMIT = "625d88a8a6421b04a3251a4f01a058b88fdeb999"

README_TEST = "python inference.py --benchmark celebahqedge --inference_mode target_fixed --pick 11"
# inference.py's namespace for the README command, after the celebahqedge dataset's option setter.
INFERENCE_OPTIONS: Dict[str, Any] = {
    "batch_size": 10, "benchmark": "celebahqedge", "cache_filelist_read": False, "cache_filelist_write": False,
    "contain_dontcare_label": False, "crop_size": 256, "dataroot": "/mnt/hdd/dataset/CelebAMask-HQ/CelebAMask-HQ",
    "display_winsize": 256, "distributed": False,
    "finetuned_weight": "pretrained/celeba/midms_celebA_finetuned.pth", "inference_mode": "target_fixed",
    "is_train": False, "label_nc": 15, "ldm_config": "pretrained/celeba/config.yaml", "load_size": 256,
    "max_dataset_size": sys.maxsize, "n_threads": 4, "no_pairing_check": True, "pick": 11,
    "preprocess_mode": "resize_and_crop", "pretrained_weight": "pretrained/celeba/model.ckpt",
}

RELEASES: Dict[str, Release] = {
    "midms_celebA_finetuned": Release(
        name="midms_celebA_finetuned",
        files={"MIDMs": "midms_celebA_finetuned.pth", "LDM": "pretrained/model.ckpt"},
        command=README_TEST, options=dict(INFERENCE_OPTIONS, ldm_config="celebahq-ldm-vq-4"),
        dataset="celebahq", variant="edge", optional_files=("LDM",),
        note="weights/celeba/ of the README (OneDrive link, dead per issues #8/#14); pretrained/config.yaml is "
             "LDM's celebahq-ldm-vq-4 with MIDMs' module paths (ldm_convert.LDM_CONFIGS)"),
}

# official benchmark -> our (dataset, variant)
_DATASETS: Dict[str, Tuple[str, Optional[str]]] = {
    "celebahqedge": ("celebahq", "edge"), "deepfashion": ("deepfashion", "inshop"), "lsun_church": ("lsun_church", None),
}
# official network prefix -> ours
_MATCHING = {"seg_enc.": "matching.f_x.", "real_enc.": "matching.f_y.", "iter_enc.": "matching.f_y_iter.",
             "layer.": "matching.layer.", "theta.": "matching.theta.", "phi.": "matching.phi."}
_INSIDE = (("G_middle_1.", "block."), ("mlp_shared.1.", "shared.0."), ("mlp_gamma.", "gamma."), ("mlp_beta.", "beta."))
# DDIMSampler.make_schedule buffers (DDIM tables for the last ddim_num_steps used) and register_schedule's
SAMPLER_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                   "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                   "sqrt_recipm1_alphas_cumprod", "ddim_sigmas", "ddim_alphas", "ddim_alphas_prev",
                   "ddim_sqrt_one_minus_alphas", "ddim_sigmas_for_original_num_steps")


def _matching_key(key: str) -> Optional[str]:
    for official, ours in _MATCHING.items():
        if key.startswith(official):
            rest = key[len(official):]
            for old, new in _INSIDE:
                rest = rest.replace(old, new)
            return ours + rest
    return None


def _official_matching_key(ours: str) -> str:
    """The inverse of ``_matching_key`` (to name a missing key as the checkpoint would)."""
    for official, mine in _MATCHING.items():
        if ours.startswith(mine):
            rest = ours[len(mine):]
            for old, new in _INSIDE:
                rest = rest.replace(new, old)
            return official + rest
    return ours


def _shape(state: Mapping[str, torch.Tensor], key: str, dim: int, default: int) -> int:
    return int(state[key].shape[dim]) if key in state else default


def _matching_sizes(midms: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> Dict[str, Any]:
    """The matching networks' widths, read off the checkpoint (official: N_CH 256, ndf 64, SPADE
    hidden 128; label channels from the condition; maskmix when theta also sees the semantics)."""
    cond = _shape(midms, "seg_enc.layer1.0.weight_orig", 1, int(options.get("label_nc", 15)))
    channels = _shape(midms, "theta.weight", 0, 256)
    return {"cond_channels": cond, "match_channels": channels,
            "match_hidden": _shape(midms, "seg_enc.layer1.0.weight_orig", 0, 64),
            "spade_hidden": _shape(midms, "seg_enc.G_middle_1.norm_0.mlp_shared.1.weight", 0, 128),
            "maskmix": _shape(midms, "theta.weight", 1, channels + cond) != channels,
            "recurrent": "iter_enc.layer1.0.weight_orig" in midms or "theta.weight" not in midms}


def _check_matching(ours: Mapping[str, torch.Tensor], sizes: Mapping[str, Any], latent_channels: int) -> List[str]:
    """Every matching key against our ``MatchingNetworks`` of those sizes (built on meta); the
    problems named as in the official checkpoint."""
    with torch.device("meta"):
        net = MatchingNetworks(latent_channels, sizes["cond_channels"], sizes["match_channels"], sizes["match_hidden"],
                               sizes["spade_hidden"], maskmix=sizes["maskmix"], recurrent=sizes["recurrent"])
    expected = {"matching." + k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: v for k, v in ours.items() if k.startswith("matching.")}
    if not got:
        return []  # a release without the matching networks (model.ckpt): they keep their init
    name = _official_matching_key
    missing = [name(k) for k in expected if k not in got]
    unexpected = [name(k) for k in got if k not in expected]
    shapes = [f"{name(k)}: {tuple(v.shape)} vs expected {expected[k]}" for k, v in got.items()
              if k in expected and tuple(v.shape) != expected[k]]
    if missing or unexpected or shapes:
        return [format_key_problems("MIDMs matching networks", missing, unexpected, shapes)]
    return []


def _ldm_spec(options: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> LDMSpec:
    """The LDM config: ``options["ldm_config"]`` when it is a parsed config, a name in
    ``LDM_CONFIGS`` or a readable ``config.yaml``; otherwise (e.g. the release's relative path) the
    known config the weights' keys and shapes fit."""
    given = options.get("ldm_config")
    if isinstance(given, Mapping) or (isinstance(given, str) and (given in LDM_CONFIGS or os.path.isfile(given))):
        return ldm_spec(given)
    return LDMSpec.from_config(ldm_config_for(weights))


def _ldm_options(spec: LDMSpec) -> Dict[str, Any]:
    """Our options that rebuild the LDM of ``spec`` at width 1.0."""
    u, a, p = spec.unet, spec.first_stage, spec.params
    if u.num_head_channels == -1 or u.use_scale_shift_norm or u.resblock_updown:
        raise ConversionError("midms: only LDM UNets with num_head_channels, plain resnets and conv resampling "
                              "(celebahq-ldm-vq-4 style) can be built by our options; got " + repr(u))
    if p.get("beta_schedule", "linear") != "linear":
        raise ConversionError(f"midms: LDM beta_schedule {p.get('beta_schedule')!r}: only 'linear' is supported")
    return {
        "ldm_from_checkpoint": True, "ae_type": a.kind, "ae_channels": a.ch, "ae_channel_mult": list(a.ch_mult),
        "ae_layers_per_block": a.num_res_blocks, "ae_latent_channels": a.z_channels,
        "ae_codebook_size": a.n_embed or 8192, "unet_channels": u.model_channels,
        "unet_channel_mult": list(u.channel_mult), "unet_layers_per_block": u.num_res_blocks,
        "unet_attention_levels": [l for l in range(len(u.channel_mult)) if u.has_attention(l)],
        "unet_head_channels": u.num_head_channels, "num_train_timesteps": int(p.get("timesteps", 1000)),
        "beta_start": float(p.get("linear_start", 1e-4)), "beta_end": float(p.get("linear_end", 2e-2)),
    }


def _method_options(options: Mapping[str, Any], has_iter_enc: bool) -> Dict[str, Any]:
    """Our options from the official ones (inference.py / train.py namespaces)."""
    out: Dict[str, Any] = {"confidence_masking": bool(options.get("confidence_masking", True)),
                           "recurrent_matching": has_iter_enc}
    if options.get("phase", "e2e_recurrent") != "e2e_recurrent":
        raise ConversionError(f"midms: official phase {options['phase']!r}; only e2e_recurrent (the README's, and "
                              f"inference.py's) is implemented")
    if "weight_decay" in options:
        out["weight_decay"] = float(options["weight_decay"])
    dataset = _DATASETS.get(str(options.get("benchmark", "celebahqedge")), (None, None))[0]
    for key in ("w_perc", "perc_layer"):  # train_epoch's per-dataset perceptual setting
        if dataset in RECIPES and key in RECIPES[dataset]:
            out[key] = RECIPES[dataset][key]
    return out


def convert(official: Dict[str, Dict[str, torch.Tensor]], options: Dict[str, Any]) -> Converted:
    """Our state dict, options and context from the official ``MIDMs`` state dict (the fine-tuned
    checkpoint's ``state_dict``) and/or the ``LDM`` one (``model.ckpt``)."""
    unknown_nets = sorted(set(official) - {"MIDMs", "LDM"})
    if unknown_nets or not official:
        raise ConversionError(f"midms: expected official networks 'MIDMs' and/or 'LDM', got {sorted(official)}")
    midms = dict(official.get("MIDMs") or {})
    ldm = dict(official.get("LDM") or {})
    dropped: Dict[str, str] = {}
    ours: Dict[str, torch.Tensor] = {}
    unknown: List[str] = []
    problems: List[str] = []

    # the matching networks
    for key, value in midms.items():
        if key.startswith((MIDMS_PREFIX, "diffusion_sampler.")):
            continue
        mapped = _matching_key(key)
        if mapped is None:
            unknown.append(key)
        else:
            ours[mapped] = value
    sampler = [k for k in midms if k.startswith("diffusion_sampler.")]
    if any(k.startswith("diffusion_sampler.model.") for k in sampler):
        dropped["diffusion_sampler.model.*"] = ("the DDIMSampler's reference to the same LatentDiffusion: a second "
                                                "copy of every diff_model.* key")
    for name in SAMPLER_BUFFERS:
        if "diffusion_sampler." + name in midms:
            dropped["diffusion_sampler." + name] = "DDIM/LDM schedule buffer, recomputed from the config"
    unknown += [k for k in sampler if not k.startswith("diffusion_sampler.model.")
                and k[len("diffusion_sampler."):] not in SAMPLER_BUFFERS]

    # the latent-diffusion model: the fine-tuned one in the MIDMs checkpoint wins over model.ckpt
    diff = {k: v for k, v in midms.items() if k.startswith(MIDMS_PREFIX)}
    source, prefix = (diff, MIDMS_PREFIX) if diff else (ldm, "")
    if diff and ldm:
        dropped["LDM/*"] = ("model.ckpt, superseded by the fine-tuned diff_model.* of the MIDMs checkpoint "
                            "(inference.py loads the latter over the former)")
    if ldm and not diff:
        prefix = detect_prefix(ldm)
    spec = None
    if source:
        try:
            spec = _ldm_spec(options, source)
            has_unet = any(k.startswith(prefix + "model.diffusion_model.") for k in source)
            ldm_parts = convert_ldm_state_dict(source, spec, prefix=prefix, need_unet=has_unet)
            ours.update({"unet." + k: v for k, v in ldm_parts.unet.items()})
            ours.update({"first_stage." + k: v for k, v in ldm_parts.first_stage.items()})
            dropped.update(ldm_parts.dropped)
        except ConversionError as exc:
            problems.append(str(exc))
    sizes = _matching_sizes(midms, options)
    latent = spec.first_stage.z_channels if spec is not None else _shape(midms, "real_enc.layer1.0.weight_orig", 1, 3)
    problems += _check_matching(ours, sizes, latent)
    if unknown:
        problems.insert(0, format_key_problems("MIDMs checkpoint", [], unknown, []))
    if problems:
        raise ConversionError("\n".join(problems))
    if spec is None:
        raise ConversionError("midms: no latent-diffusion weights (diff_model.* in the MIDMs checkpoint or an LDM "
                              "model.ckpt): our method cannot be built without knowing its LDM")
    # MIDMs never applies LDM's scale_factor; the loaded first stage is trained and its codebook set.
    ours.update({"latent_scale": torch.tensor(1.0), "ae_done": torch.tensor(True),
                 "codebook_initialised": torch.tensor(True)})

    dataset, variant = _DATASETS.get(str(options.get("benchmark", "celebahqedge")), ("celebahq", "edge"))
    matching_options = {"match_channels": sizes["match_channels"], "match_hidden": sizes["match_hidden"],
                        "spade_hidden": sizes["spade_hidden"], "maskmix": sizes["maskmix"]}
    return Converted(
        state_dict=ours,
        options={**_ldm_options(spec), **_method_options(options, sizes["recurrent"]), **matching_options},
        context={"resolution": int(options.get("crop_size", 256)), "cond_channels": sizes["cond_channels"],
                 "num_classes": None, "dataset": dataset, "variant": variant},
        dropped=dropped)


__all__ = ["INFERENCE_OPTIONS", "OFFICIAL_COMMIT", "OFFICIAL_REPO", "README_TEST", "RELEASES", "convert"]
