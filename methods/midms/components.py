"""The latent-diffusion parts of MIDMs, all from diffusers: a first-stage autoencoder (``VQModel``
or ``AutoencoderKL``), a ``UNet2DModel`` and a ``DDIMScheduler``.

Three ways to get them (the paper fine-tunes a pretrained LDM):
- a local LDM in CompVis' own layout -- ``config.yaml`` + ``model.ckpt``, as MIDMs'
  ``weights/<dataset>/pretrained/`` -- converted on load (``ldm_convert``; its schedule is LDM's,
  ``schedule.py``);
- a local LDM in diffusers format (``model_index.json`` with ``vqvae``/``vae``, ``unet``,
  ``scheduler`` subfolders, e.g. a copy of CompVis/ldm-celebahq-256);
- built from scratch at the LDM config's sizes (reference/methods.md 1.3) scaled by the run's width:
  the same ``UNetSpec`` / ``FirstStageSpec`` a converted LDM is built from, with fewer GroupNorm
  groups when the scaled widths need it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel, VQModel

from methods.base import scaled
from methods.common.convert import load_official_file
from methods.common.weights import file_sha256, probing_weights
from methods.midms.ldm_convert import (LDM_CONFIGS, FirstStage, FirstStageSpec, LDMSpec, UNetSpec,
                                       convert_ldm_state_dict)
from methods.midms.schedule import ldm_schedule, ldm_scheduler

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LDM_FILES = ("config.yaml", "model.ckpt")  # CompVis' release layout (MIDMs: weights/<dataset>/pretrained/)


class PretrainedLDMError(FileNotFoundError):
    pass


@dataclass
class LatentDiffusionParts:
    first_stage: FirstStage
    unet: Optional[UNet2DModel]
    scheduler: DDIMScheduler
    latent_scale: Optional[float]  # None: to be measured (scale_by_std) after the first stage trains
    provenance: Dict[str, str] = field(default_factory=dict)
    pretrained: bool = False


def group_count(channels: Sequence[int], at_most: int = 32) -> int:
    """GroupNorm groups dividing every width (32 at the paper's widths; fewer when scaled down)."""
    return math.gcd(at_most, reduce(math.gcd, channels))


def base_width(base: int, width: float) -> int:
    """``base`` scaled by ``width``, rounded to a multiple of 8 so GroupNorm and 32-channel attention
    heads still divide the block widths at small scale."""
    return max(8, 8 * int(round(scaled(base, width) / 8)))


def widths(base: int, mult: Sequence[int], width: float) -> tuple:
    """Block widths ``base * mult`` scaled by ``width`` (see ``base_width``)."""
    b = base_width(base, width)
    return tuple(b * m for m in mult)


def first_stage_spec(kind: str, channels: int, channel_mult: Sequence[int], layers_per_block: int,
                     latent_channels: int, codebook_size: int, width: float, resolution: int) -> FirstStageSpec:
    """LDM's first stage (``ddconfig``: ch x ch_mult, num_res_blocks, z_channels = embed_dim) at
    ``width`` x its sizes."""
    if kind not in ("vq", "kl"):
        raise ValueError(f"midms: ae_type must be 'vq' or 'kl', got {kind!r}")
    return FirstStageSpec(kind=kind, in_channels=3, out_channels=3, ch=base_width(channels, width),
                          ch_mult=tuple(channel_mult), num_res_blocks=layers_per_block, z_channels=latent_channels,
                          embed_dim=latent_channels, n_embed=codebook_size if kind == "vq" else None,
                          resolution=resolution, norm_num_groups=group_count(widths(channels, channel_mult, width)))


def build_first_stage(kind: str, channels: int, channel_mult: Sequence[int], layers_per_block: int,
                      latent_channels: int, codebook_size: int, width: float, resolution: int) -> FirstStage:
    return first_stage_spec(kind, channels, channel_mult, layers_per_block, latent_channels, codebook_size,
                            width, resolution).build()


def unet_spec(channels: int, channel_mult: Sequence[int], layers_per_block: int, attention_levels: Sequence[int],
              head_channels: int, latent_channels: int, latent_size: int, width: float) -> UNetSpec:
    """LDM's UNetModel (model_channels x channel_mult, attention at the given levels = downsampling
    factors 2^level, num_head_channels) at ``width`` x its sizes."""
    block = widths(channels, channel_mult, width)
    bad = [l for l in attention_levels if not 0 <= l < len(block)]
    if bad:
        raise ValueError(f"midms: unet_attention_levels {list(bad)} outside 0..{len(block) - 1}")
    b = base_width(channels, width)
    return UNetSpec(in_channels=latent_channels, out_channels=latent_channels, model_channels=b,
                    channel_mult=tuple(channel_mult), num_res_blocks=layers_per_block,
                    attention_resolutions=tuple(2 ** l for l in attention_levels),
                    num_head_channels=min(head_channels, block[0]), image_size=latent_size,
                    norm_num_groups=group_count(block))


def build_unet(channels: int, channel_mult: Sequence[int], layers_per_block: int, attention_levels: Sequence[int],
               head_channels: int, latent_channels: int, latent_size: int, width: float) -> UNet2DModel:
    return unet_spec(channels, channel_mult, layers_per_block, attention_levels, head_channels, latent_channels,
                     latent_size, width).build()


def sampling_scheduler(config: dict, timestep_spacing: str, set_alpha_to_one: bool) -> DDIMScheduler:
    """A DDIM scheduler with the model's noise schedule and this method's sampling choices."""
    if timestep_spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(f"midms: timestep_spacing must be leading, trailing or linspace, got {timestep_spacing!r}")
    return DDIMScheduler.from_config(dict(config), timestep_spacing=timestep_spacing,
                                     set_alpha_to_one=set_alpha_to_one, clip_sample=False)


def resolve_ldm_path(spec: Union[None, str, Dict[str, str]], dataset: str) -> Optional[str]:
    """The pretrained-LDM directory for ``dataset``: a path for every dataset, or a mapping from
    dataset name (``"*"`` = any other) to path. None: train from scratch."""
    if spec is None or isinstance(spec, str):
        return spec or None
    return spec.get(dataset, spec.get("*"))


def _weights_hash(folder: Path) -> str:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return f"sha256:{file_sha256(folder / name)}"
    raise PretrainedLDMError(f"midms: no weights file ({' or '.join(WEIGHT_FILES)}) in {folder}")


def _expand(path: Union[str, os.PathLike]) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def ldm_spec(config: Union[str, os.PathLike, Mapping[str, Any]]) -> LDMSpec:
    """An LDM config: a known one by name (``ldm_convert.LDM_CONFIGS``: celebahq-ldm-vq-4,
    lsun_churches-ldm-kl-8), the path of an LDM ``config.yaml``, or a parsed config."""
    if isinstance(config, Mapping):
        return LDMSpec.from_config(config)
    if str(config) in LDM_CONFIGS:
        return LDMSpec.from_config(LDM_CONFIGS[str(config)])
    path = _expand(config)
    if not path.is_file():
        raise PretrainedLDMError(f"midms: LDM config {str(config)!r} is neither a known config "
                                 f"({', '.join(sorted(LDM_CONFIGS))}) nor a file ({path} does not exist)")
    return LDMSpec.from_config(yaml.safe_load(path.read_text()))


def ldm_parts(spec: LDMSpec, timestep_spacing: str, set_alpha_to_one: bool, need_unet: bool = True,
              checkpoint: Optional[Mapping[str, torch.Tensor]] = None,
              provenance: Optional[Dict[str, str]] = None) -> LatentDiffusionParts:
    """The diffusers parts of an LDM config, with LDM's noise schedule. With ``checkpoint`` (an LDM
    state dict in LDM's layout, or MIDMs' with ``diff_model.``) they carry its converted weights;
    without, they are freshly initialised. The latent scale is LDM's ``scale_factor`` (the
    checkpoint's buffer when it has one; None = to be measured when the config asks for
    scale_by_std and no checkpoint gives it)."""
    scheduler = ldm_scheduler(ldm_schedule(spec.params), timestep_spacing=timestep_spacing,
                              set_alpha_to_one=set_alpha_to_one)
    scale: Optional[float] = float(spec.params.get("scale_factor", 1.0))
    if checkpoint is None:
        ae, unet = spec.first_stage.build(), spec.unet.build() if need_unet else None
        if spec.params.get("scale_by_std"):
            scale = None
    else:
        converted = convert_ldm_state_dict(checkpoint, spec, need_unet=need_unet)
        ae = spec.first_stage.assign(converted.first_stage)
        unet = spec.unet.assign(converted.unet) if need_unet else None
        if converted.scale_factor is not None:
            scale = converted.scale_factor
    return LatentDiffusionParts(first_stage=ae, unet=unet, scheduler=scheduler, latent_scale=scale,
                                provenance=dict(provenance or {}), pretrained=checkpoint is not None)


def load_pretrained_ldm(path: str, timestep_spacing: str, set_alpha_to_one: bool,
                        need_unet: bool = True) -> LatentDiffusionParts:
    """Load ``path``: an LDM in CompVis' layout (``config.yaml`` + ``model.ckpt``) or in diffusers
    format. Errors name the path."""
    root = _expand(path)
    hint = ("an LDM directory: CompVis' layout (config.yaml + model.ckpt, as MIDMs' weights/<dataset>/pretrained/) "
            "or diffusers format (model_index.json plus subfolders 'vqvae' (VQModel) or 'vae' (AutoencoderKL), "
            "'unet' (UNet2DModel) and 'scheduler', e.g. a local copy of CompVis/ldm-celebahq-256)")
    if not root.is_dir():
        unset = " (an environment variable in it is not set)" if "$" in str(root) else ""
        raise PretrainedLDMError(f"midms: pretrained_ldm directory {path!r} (resolved to {root}{unset}) does not "
                                 f"exist; expected {hint}. Unset pretrained_ldm to train the LDM from scratch.")
    probing = probing_weights()  # the sweep preflight: the files exist, the networks build; nothing read
    if all((root / name).is_file() for name in LDM_FILES):
        config, ckpt = (root / name for name in LDM_FILES)
        if probing:
            parts = ldm_parts(ldm_spec(config), timestep_spacing, set_alpha_to_one, need_unet=need_unet)
            return dataclasses.replace(parts, pretrained=True)
        return ldm_parts(ldm_spec(config), timestep_spacing, set_alpha_to_one, need_unet=need_unet,
                         checkpoint=load_official_file(ckpt),
                         provenance={"ldm.checkpoint": f"sha256:{file_sha256(ckpt)}"})
    if not (root / "model_index.json").is_file():
        raise PretrainedLDMError(f"midms: {root} has neither model_index.json nor {' + '.join(LDM_FILES)}; "
                                 f"expected {hint}")
    index = json.loads((root / "model_index.json").read_text())
    kw = dict(local_files_only=True)

    def load(cls, subfolder: str):
        if probing:  # the architecture from its config, no weights read
            return cls.from_config(cls.load_config(root, subfolder=subfolder, **kw))
        return cls.from_pretrained(root, subfolder=subfolder, **kw)

    if "vqvae" in index:
        ae_name, ae = "vqvae", load(VQModel, "vqvae")
        scale = 1.0  # LDM's VQ models are used unscaled (LDMPipeline decodes the raw latent)
    elif "vae" in index:
        ae_name, ae = "vae", load(AutoencoderKL, "vae")
        scale = float(ae.config.scaling_factor)  # LDM's scale_factor (MIDMs itself skips it: quirk)
    else:
        raise PretrainedLDMError(f"midms: {root}/model_index.json names neither 'vqvae' nor 'vae'; expected {hint}")
    for part in ("unet", "scheduler"):
        if part not in index:
            raise PretrainedLDMError(f"midms: {root}/model_index.json has no '{part}'; expected {hint}")
    unet = load(UNet2DModel, "unet") if need_unet else None
    base = DDIMScheduler.load_config(root, subfolder="scheduler", **kw)
    provenance = {} if probing else {f"ldm.{ae_name}": _weights_hash(root / ae_name)}
    if need_unet and not probing:
        provenance["ldm.unet"] = _weights_hash(root / "unet")
    return LatentDiffusionParts(first_stage=ae, unet=unet, latent_scale=scale, provenance=provenance,
                                scheduler=sampling_scheduler(base, timestep_spacing, set_alpha_to_one),
                                pretrained=True)
