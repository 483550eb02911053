"""The latent-diffusion parts of MIDMs, all from diffusers: a first-stage autoencoder (``VQModel``
or ``AutoencoderKL``), a ``UNet2DModel`` and a ``DDIMScheduler``.

Either loaded from a local latent-diffusion model in diffusers format (the paper fine-tunes a
pretrained LDM, e.g. CompVis' CelebA-HQ one: ``model_index.json`` with ``vqvae``/``vae``, ``unet``,
``scheduler`` subfolders), or built at the paper's sizes scaled by the run's width and trained from
scratch. Sizes follow the LDM configs MIDMs uses (reference/methods.md 1.3).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel, VQModel

from methods.base import scaled
from methods.common.weights import file_sha256

FirstStage = Union[VQModel, AutoencoderKL]
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


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


def widths(base: int, mult: Sequence[int], width: float) -> tuple:
    """Block widths ``base * mult`` scaled by ``width``, rounded to multiples of 8 so GroupNorm and
    32-channel attention heads still divide them at small scale."""
    b = max(8, 8 * int(round(scaled(base, width) / 8)))
    return tuple(b * m for m in mult)


def build_first_stage(kind: str, channels: int, channel_mult: Sequence[int], layers_per_block: int,
                      latent_channels: int, codebook_size: int, width: float, resolution: int) -> FirstStage:
    block = widths(channels, channel_mult, width)
    common = dict(in_channels=3, out_channels=3, block_out_channels=block, layers_per_block=layers_per_block,
                  latent_channels=latent_channels, norm_num_groups=group_count(block), sample_size=resolution,
                  down_block_types=("DownEncoderBlock2D",) * len(block),
                  up_block_types=("UpDecoderBlock2D",) * len(block))
    if kind == "vq":
        return VQModel(num_vq_embeddings=codebook_size, vq_embed_dim=latent_channels, **common)
    if kind == "kl":
        return AutoencoderKL(**common)
    raise ValueError(f"midms: ae_type must be 'vq' or 'kl', got {kind!r}")


def build_unet(channels: int, channel_mult: Sequence[int], layers_per_block: int, attention_levels: Sequence[int],
               head_channels: int, latent_channels: int, latent_size: int, width: float) -> UNet2DModel:
    block = widths(channels, channel_mult, width)
    bad = [l for l in attention_levels if not 0 <= l < len(block)]
    if bad:
        raise ValueError(f"midms: unet_attention_levels {list(bad)} outside 0..{len(block) - 1}")
    down = tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(len(block)))
    up = tuple("AttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(len(block))))
    return UNet2DModel(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
                       down_block_types=down, up_block_types=up, block_out_channels=block,
                       layers_per_block=layers_per_block, attention_head_dim=min(head_channels, block[0]),
                       norm_num_groups=group_count(block))


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


def load_pretrained_ldm(path: str, timestep_spacing: str, set_alpha_to_one: bool,
                        need_unet: bool = True) -> LatentDiffusionParts:
    """Load ``path`` (a diffusers-format latent-diffusion model). Errors name the path."""
    root = Path(os.path.expandvars(os.path.expanduser(path)))
    hint = ("a diffusers-format latent-diffusion model directory: model_index.json plus subfolders "
            "'vqvae' (VQModel) or 'vae' (AutoencoderKL), 'unet' (UNet2DModel) and 'scheduler', e.g. a local copy "
            "of CompVis/ldm-celebahq-256")
    if not root.is_dir():
        unset = " (an environment variable in it is not set)" if "$" in str(root) else ""
        raise PretrainedLDMError(f"midms: pretrained_ldm directory {path!r} (resolved to {root}{unset}) does not "
                                 f"exist; expected {hint}. Unset pretrained_ldm to train the LDM from scratch.")
    if not (root / "model_index.json").is_file():
        raise PretrainedLDMError(f"midms: {root} has no model_index.json; expected {hint}")
    index = json.loads((root / "model_index.json").read_text())
    kw = dict(local_files_only=True)
    if "vqvae" in index:
        ae_name, ae = "vqvae", VQModel.from_pretrained(root, subfolder="vqvae", **kw)
        scale = 1.0  # LDM's VQ models are used unscaled (LDMPipeline decodes the raw latent)
    elif "vae" in index:
        ae_name, ae = "vae", AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
        scale = float(ae.config.scaling_factor)  # LDM's scale_factor (MIDMs itself skips it: quirk)
    else:
        raise PretrainedLDMError(f"midms: {root}/model_index.json names neither 'vqvae' nor 'vae'; expected {hint}")
    for part in ("unet", "scheduler"):
        if part not in index:
            raise PretrainedLDMError(f"midms: {root}/model_index.json has no '{part}'; expected {hint}")
    unet = UNet2DModel.from_pretrained(root, subfolder="unet", **kw) if need_unet else None
    base = DDIMScheduler.load_config(root, subfolder="scheduler", **kw)
    provenance = {f"ldm.{ae_name}": _weights_hash(root / ae_name)}
    if need_unet:
        provenance["ldm.unet"] = _weights_hash(root / "unet")
    return LatentDiffusionParts(first_stage=ae, unet=unet, latent_scale=scale, provenance=provenance,
                                scheduler=sampling_scheduler(base, timestep_spacing, set_alpha_to_one),
                                pretrained=True)
