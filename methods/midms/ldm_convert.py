"""Latent-diffusion (CompVis LDM) configs and checkpoints -> diffusers models.

MIDMs fine-tunes an LDM (``weights/celeba/pretrained/config.yaml`` + ``model.ckpt``: the
celebahq-ldm-vq-4 model) and saves it inside its own checkpoint under ``diff_model.``. This module
reads the ``model.params`` of such a config (``yaml.safe_load`` of an LDM ``config.yaml``) into a
``UNetSpec`` and a ``FirstStageSpec``, builds the matching diffusers ``UNet2DModel`` and
``VQModel`` / ``AutoencoderKL``, and converts LDM's checkpoint layout (``model.diffusion_model.*``,
``first_stage_model.*``, optionally behind ``diff_model.``) into their state dicts -- and back.

The mapping is written from our side: every key of the diffusers model names the LDM key (and the
slice of it) it comes from, so the expected LDM keys and shapes follow from the model itself and one
``ConversionError`` lists every missing, unexpected or mis-shaped key. Everything is reshape,
index and cat, so it works on meta tensors.

Layout traps handled here:
- LDM's UNet attention (``AttentionBlock``) holds one ``qkv`` conv1d of shape (3C, C, 1), split per
  head as [heads, (q, k, v), ch] (``QKVAttentionLegacy``; ``use_new_attention_order`` splits as
  [(q, k, v), heads, ch]) and a ``proj_out`` conv1d; diffusers has Linear ``to_q/to_k/to_v/to_out.0``.
- The first stage's mid-block ``AttnBlock`` uses 1x1 conv2d ``q/k/v/proj_out``: diffusers' Linear.
- LDM's decoder lists its levels bottom-up (``up.0`` is the full-resolution one); diffusers'
  ``up_blocks`` run in execution order.
- Configs that fix ``num_heads`` (LSUN-Churches: 8 heads at every width) cannot be said in a
  ``UNet2DModel`` config, which fixes the head *width*; ``UNetSpec.build`` sets the head count of
  every attention layer after construction (``attention_heads``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from diffusers import AutoencoderKL, UNet2DModel, VQModel
from torch import nn

from methods.common.convert import ConversionError, check_state_dict, format_key_problems

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
MIDMS_PREFIX = "diff_model."  # MIDMs' checkpoint holds the LatentDiffusion as `diff_model`

# LatentDiffusion.register_schedule buffers: computed from the config, not weights (schedule.py
# recomputes them exactly).
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar")

FirstStage = Union[VQModel, AutoencoderKL]


# ---- where each of our keys comes from ------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """The LDM tensor one of our parameters is taken from: ``key``, optionally one third of a fused
    qkv projection (``qkv`` = 0/1/2 for q/k/v, split over ``heads`` in LDM's order), with
    ``trailing`` singleton dims (conv1d / 1x1 conv2d weights stored where we have a Linear)."""

    key: str
    qkv: Optional[int] = None
    heads: int = 1
    legacy_order: bool = True  # QKVAttentionLegacy: [heads, (q,k,v), ch]; else [(q,k,v), heads, ch]
    trailing: int = 0

    def ldm_shape(self, ours: Tuple[int, ...]) -> Tuple[int, ...]:
        shape = tuple(ours) + (1,) * self.trailing
        return (3 * shape[0],) + shape[1:] if self.qkv is not None else shape

    def take(self, t: torch.Tensor, ours: Tuple[int, ...]) -> torch.Tensor:
        if self.qkv is not None:
            c = t.shape[0] // 3
            if self.legacy_order:
                t = t.reshape(self.heads, 3, c // self.heads, *t.shape[1:])[:, self.qkv]
            else:
                t = t.reshape(3, c, *t.shape[1:])[self.qkv]
        return t.reshape(ours)


def _gather(sources: List[Tuple[Source, torch.Tensor]]) -> torch.Tensor:
    """The LDM tensor from our tensors that share one ``Source.key`` (inverse of ``Source.take``)."""
    if len(sources) == 1 and sources[0][0].qkv is None:
        src, t = sources[0]
        return t.reshape(t.shape + (1,) * src.trailing)
    parts = sorted(sources, key=lambda st: st[0].qkv)
    src = parts[0][0]
    if [s.qkv for s, _ in parts] != [0, 1, 2]:
        raise ConversionError(f"{src.key}: q, k and v are needed to rebuild the fused qkv tensor")
    ts = [t.reshape(t.shape + (1,) * s.trailing) for s, t in parts]
    if src.legacy_order:
        c = ts[0].shape[0]
        ts = [t.reshape(src.heads, 1, c // src.heads, *t.shape[1:]) for t in ts]
        return torch.cat(ts, dim=1).reshape(3 * c, *ts[0].shape[3:])
    return torch.cat(ts, dim=0)


class _Layout:
    """What both specs share: our key -> LDM source, conversion in both directions, the check."""

    what = "LDM"
    prefix = ""

    def source(self, key: str) -> Source:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def meta_model(self) -> nn.Module:
        with torch.device("meta"):
            return self.build()

    def sources(self, our_shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, Source]:
        return {k: self.source(k) for k in our_shapes}

    def expected_ldm_shapes(self, our_shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
        """LDM key (without prefix) -> shape, for the model whose state-dict shapes are given."""
        out: Dict[str, Tuple[int, ...]] = {}
        for k, src in self.sources(our_shapes).items():
            out[src.key] = src.ldm_shape(tuple(our_shapes[k]))
        return out

    def convert(self, ldm: Mapping[str, torch.Tensor], our_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
                outer_prefix: str = "") -> Dict[str, torch.Tensor]:
        """Our state dict from LDM tensors (keys without the LDM prefix). ``our_shapes`` defaults to
        the model this spec builds (made on the meta device). Raises one ``ConversionError`` listing
        every missing, unexpected and mis-shaped key, named as in the checkpoint
        (``outer_prefix`` + ``self.prefix`` + key)."""
        if our_shapes is None:
            our_shapes = {k: tuple(v.shape) for k, v in self.meta_model().state_dict().items()}
        expected = self.expected_ldm_shapes(our_shapes)
        named = outer_prefix + self.prefix
        check_state_dict({named + k: s for k, s in expected.items()}, {named + k: v for k, v in ldm.items()},
                         f"{self.what}{' behind ' + outer_prefix if outer_prefix else ''}")
        return {k: src.take(ldm[src.key], tuple(our_shapes[k])) for k, src in self.sources(our_shapes).items()}

    def assign(self, ours: Mapping[str, torch.Tensor]) -> nn.Module:
        """Our model carrying ``ours`` (our keys, e.g. ``convert``'s result): built on the meta device
        and the tensors assigned (no random init of hundreds of millions of parameters only to
        overwrite them)."""
        model = self.meta_model()
        model.load_state_dict(ours, assign=True)  # strict: every parameter and persistent buffer
        left = [n for n, t in model.named_buffers() if t.is_meta and n not in ours]
        if left:
            raise ConversionError(f"{self.what}: buffers outside the state dict stay unset: {left}")
        return model

    def load(self, ldm: Mapping[str, torch.Tensor]) -> nn.Module:
        """Our model carrying the converted LDM weights (keys without the LDM prefix)."""
        return self.assign(self.convert(ldm))

    def to_ldm(self, ours: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """LDM tensors (keys without prefix) from our state dict: the inverse of ``convert``."""
        groups: Dict[str, List[Tuple[Source, torch.Tensor]]] = {}
        for k, t in ours.items():
            src = self.source(k)
            groups.setdefault(src.key, []).append((src, t))
        return {key: _gather(parts) for key, parts in groups.items()}


def _unknown(what: str, key: str) -> ConversionError:
    return ConversionError(f"{what}: our key {key!r} has no LDM counterpart (a model this spec does not describe)")


def _rename(mapping: Mapping[str, str], rest: str) -> Optional[str]:
    """``rest`` (``<module>.<param>``) with its module renamed by ``mapping`` (longest match)."""
    for ours in sorted(mapping, key=len, reverse=True):
        if rest.startswith(ours + "."):
            return mapping[ours] + rest[len(ours):]
    return None


# ---- the UNet ---------------------------------------------------------------------------------------
# diffusers ResnetBlock2D -> LDM ResBlock (openaimodel): in_layers = [norm, SiLU, conv],
# emb_layers = [SiLU, linear], out_layers = [norm, SiLU, dropout, conv].
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNSUPPORTED_UNET = {  # LDM UNetModel options a UNet2DModel cannot express
    "use_spatial_transformer": (False, "cross-attention transformers (conditional LDMs) are not supported"),
    "context_dim": (None, "cross-attention conditioning is not supported"),
    "num_classes": (None, "class-conditional LDMs are not supported"),
    "n_embed": (None, "codebook-id prediction heads are not supported"),
    "dims": (2, "only 2-D UNets are supported"),
    "conv_resample": (True, "only learned (conv) resampling is supported"),
}


@dataclass(frozen=True)
class UNetSpec(_Layout):
    """LDM's ``openaimodel.UNetModel`` configuration (the ``unet_config.params`` of an LDM config)."""

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: Tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: Tuple[int, ...]  # downsampling factors (1, 2, 4, ...) with attention
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dropout: float = 0.0
    image_size: Optional[int] = None
    norm_num_groups: int = 32  # LDM's GroupNorm32; smaller only for our scaled-down from-scratch UNets

    what = "LDM UNet (model.diffusion_model.*)"
    prefix = UNET_PREFIX

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "UNetSpec":
        p = dict(params)
        bad = [f"{k}={p[k]!r}: {why}" for k, (ok, why) in _UNSUPPORTED_UNET.items() if k in p and p[k] != ok]
        if bad:
            raise ConversionError("LDM UNet config: " + "; ".join(bad))
        if p.get("num_heads", -1) == -1 and p.get("num_head_channels", -1) == -1:
            raise ConversionError("LDM UNet config: either num_heads or num_head_channels must be set")
        spec = cls(in_channels=int(p["in_channels"]), out_channels=int(p["out_channels"]),
                   model_channels=int(p["model_channels"]), channel_mult=tuple(int(m) for m in p.get("channel_mult", (1, 2, 4, 8))),
                   num_res_blocks=int(p["num_res_blocks"]),
                   attention_resolutions=tuple(sorted(int(r) for r in p["attention_resolutions"])),
                   num_heads=int(p.get("num_heads", -1)), num_head_channels=int(p.get("num_head_channels", -1)),
                   num_heads_upsample=int(p.get("num_heads_upsample", -1)),
                   use_scale_shift_norm=bool(p.get("use_scale_shift_norm", False)),
                   resblock_updown=bool(p.get("resblock_updown", False)),
                   use_new_attention_order=bool(p.get("use_new_attention_order", False)),
                   dropout=float(p.get("dropout", 0.0)), image_size=p.get("image_size"))
        widths = [spec.model_channels * m for m in spec.channel_mult]
        if spec.num_head_channels != -1 and any(w % spec.num_head_channels for w in widths):
            raise ConversionError(f"LDM UNet config: widths {widths} not divisible by num_head_channels "
                                  f"{spec.num_head_channels}")
        return spec

    # -- structure ----------------------------------------------------------------------------
    @property
    def widths(self) -> Tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    def has_attention(self, level: int) -> bool:
        """LDM puts attention at level ``level`` when its downsampling factor 2^level is listed."""
        return 2 ** level in self.attention_resolutions

    def heads(self, channels: int, up: bool = False) -> int:
        """Heads of an LDM AttentionBlock of ``channels`` (``num_head_channels`` wins; the output
        blocks use ``num_heads_upsample``, which defaults to ``num_heads``)."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels
        if up and self.num_heads_upsample != -1:
            return self.num_heads_upsample
        return self.num_heads

    def diffusers_config(self) -> Dict[str, Any]:
        n = len(self.channel_mult)
        if self.resblock_updown:
            plain_down, plain_up, resample = "ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D", "resnet"
        else:
            plain_down, plain_up, resample = "DownBlock2D", "UpBlock2D", "conv"
        down = tuple("AttnDownBlock2D" if self.has_attention(l) else plain_down for l in range(n))
        up = tuple("AttnUpBlock2D" if self.has_attention(l) else plain_up for l in reversed(range(n)))
        return dict(sample_size=self.image_size, in_channels=self.in_channels, out_channels=self.out_channels,
                    # LDM's timestep_embedding: [cos, sin] of t * 10000^(-i/half) (diffusers: flip, shift 0)
                    time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
                    down_block_types=down, up_block_types=up, block_out_channels=self.widths,
                    layers_per_block=self.num_res_blocks, downsample_padding=1, downsample_type=resample,
                    upsample_type=resample, dropout=self.dropout, act_fn="silu",
                    # a fixed head width is a UNet2DModel config; a fixed head count is set in build()
                    attention_head_dim=self.num_head_channels if self.num_head_channels != -1 else None,
                    norm_num_groups=self.norm_num_groups, norm_eps=1e-5,
                    # LDM's mid-block attention always normalises its input; diffusers drops that
                    # GroupNorm under scale_shift unless told the groups
                    attn_norm_num_groups=self.norm_num_groups,
                    resnet_time_scale_shift="scale_shift" if self.use_scale_shift_norm else "default",
                    add_attention=True)

    def build(self) -> UNet2DModel:
        unet = UNet2DModel(**self.diffusers_config())
        if self.num_head_channels == -1:
            for name, attn in self.attention_heads(unet).items():
                _set_heads(attn, self.heads(attn.to_q.in_features, up=name.startswith("up_blocks")))
        return unet

    @staticmethod
    def attention_heads(unet: UNet2DModel) -> Dict[str, nn.Module]:
        """Every attention layer of ``unet`` by module name."""
        return {name: m for name, m in unet.named_modules() if re.fullmatch(r".*\.attentions\.\d+", name)}

    # -- keys -----------------------------------------------------------------------------------
    def _input_block(self, level: int, j: int) -> int:
        return 1 + level * (self.num_res_blocks + 1) + j

    def source(self, key: str) -> Source:
        top = _rename(_TOP, key)
        if top is not None:
            return Source(top)
        n = len(self.channel_mult)
        r = self.num_res_blocks
        m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
        if m:
            side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if side == "down_blocks":
                level = i
                block = f"input_blocks.{self._input_block(level, r if kind == 'downsamplers' else j)}"
            else:
                level = n - 1 - i  # up_blocks run from the lowest resolution up
                block = f"output_blocks.{i * (r + 1) + (r if kind == 'upsamplers' else j)}"
            if kind == "resnets":
                return self._resnet(f"{block}.0", rest, key)
            if kind == "attentions":
                return self._attention(f"{block}.1", rest, self.widths[level], side == "up_blocks", key)
            # the resampler: its own input block (Downsample / ResBlock(down=True)), or the last layer
            # of an output block (after the ResBlock and its attention, if any)
            index = 0 if kind == "downsamplers" else 1 + int(self.has_attention(level))
            if self.resblock_updown:
                return self._resnet(f"{block}.{index}", rest, key)
            if rest.startswith("conv."):
                return Source(f"{block}.{index}.{'op' if kind == 'downsamplers' else 'conv'}.{rest[5:]}")
            raise _unknown(self.what, key)
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            if m[1] == "resnets":
                return self._resnet(f"middle_block.{2 * int(m[2])}", m[3], key)
            return self._attention("middle_block.1", m[3], self.widths[-1], False, key)
        raise _unknown(self.what, key)

    def _resnet(self, block: str, rest: str, key: str) -> Source:
        renamed = _rename(_UNET_RESNET, rest)
        if renamed is None:
            raise _unknown(self.what, key)
        return Source(f"{block}.{renamed}")

    def _attention(self, block: str, rest: str, width: int, up: bool, key: str) -> Source:
        module, _, param = rest.rpartition(".")
        if module == "group_norm":
            return Source(f"{block}.norm.{param}")
        if module == "to_out.0":
            return Source(f"{block}.proj_out.{param}", trailing=int(param == "weight"))
        if module in ("to_q", "to_k", "to_v"):
            return Source(f"{block}.qkv.{param}", qkv=("to_q", "to_k", "to_v").index(module),
                          heads=self.heads(width, up), legacy_order=not self.use_new_attention_order,
                          trailing=int(param == "weight"))
        raise _unknown(self.what, key)

    def block_modules(self, unet: UNet2DModel) -> Dict[str, nn.Module]:
        """LDM's block names (``time_embed``, ``input_blocks.N``, ``middle_block``,
        ``output_blocks.N``) -> the module of ours whose output is that block's output (hook it)."""
        r = self.num_res_blocks
        out: Dict[str, nn.Module] = {"time_embed": unet.time_embedding, "input_blocks.0": unet.conv_in,
                                     "middle_block": unet.mid_block}
        for level, block in enumerate(unet.down_blocks):
            attn = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                out[f"input_blocks.{self._input_block(level, j)}"] = attn[j] if attn else resnet
            if block.downsamplers:
                out[f"input_blocks.{self._input_block(level, r)}"] = block.downsamplers[0]
        for i, block in enumerate(unet.up_blocks):
            attn = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                out[f"output_blocks.{i * (r + 1) + j}"] = attn[j] if attn else resnet
            if block.upsamplers:
                out[f"output_blocks.{i * (r + 1) + r}"] = block.upsamplers[0]
        return out


def _set_heads(attn: nn.Module, heads: int) -> None:
    """Give a diffusers ``Attention`` ``heads`` heads over its (unchanged) projections."""
    inner = attn.to_q.out_features
    if inner % heads:
        raise ConversionError(f"attention width {inner} is not divisible by {heads} heads")
    attn.heads = attn.sliceable_head_dim = heads
    attn.scale = (inner // heads) ** -0.5


# ---- the first stage --------------------------------------------------------------------------------
_AE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_AE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_AE_TOP = {"encoder.conv_in": "encoder.conv_in", "encoder.conv_norm_out": "encoder.norm_out",
           "encoder.conv_out": "encoder.conv_out", "decoder.conv_in": "decoder.conv_in",
           "decoder.conv_norm_out": "decoder.norm_out", "decoder.conv_out": "decoder.conv_out",
           "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv", "quantize.embedding": "quantize.embedding"}
FIRST_STAGE_KINDS = {"VQModelInterface": "vq", "VQModel": "vq", "AutoencoderKL": "kl"}


@dataclass(frozen=True)
class FirstStageSpec(_Layout):
    """LDM's first stage (``first_stage_config``): a VQ (``VQModelInterface``) or KL
    (``AutoencoderKL``) autoencoder with the taming-style ``Encoder``/``Decoder`` of ``ddconfig``."""

    kind: str  # "vq" | "kl"
    in_channels: int
    out_channels: int
    ch: int
    ch_mult: Tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    n_embed: Optional[int] = None  # VQ codebook size
    resolution: Optional[int] = None
    norm_num_groups: int = 32  # LDM's Normalize; smaller only for our scaled-down from-scratch stages

    what = "LDM first stage (first_stage_model.*)"
    prefix = FIRST_STAGE_PREFIX

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FirstStageSpec":
        """From an LDM ``first_stage_config`` (``target`` + ``params``)."""
        target = str(config.get("target", ""))
        kind = FIRST_STAGE_KINDS.get(target.rsplit(".", 1)[-1])
        if kind is None:
            raise ConversionError(f"LDM first stage {target!r}: expected one of {sorted(FIRST_STAGE_KINDS)}")
        p = dict(config.get("params") or {})
        dd = dict(p.get("ddconfig") or {})
        problems = []
        if dd.get("attn_resolutions"):
            problems.append(f"attn_resolutions {dd['attn_resolutions']}: per-level attention is not supported")
        if dd.get("attn_type", "vanilla") != "vanilla":
            problems.append(f"attn_type {dd['attn_type']!r}: only 'vanilla' attention is supported")
        if not dd.get("resamp_with_conv", True) or dd.get("give_pre_end") or dd.get("tanh_out"):
            problems.append("resamp_with_conv False / give_pre_end / tanh_out are not supported")
        if bool(dd.get("double_z", kind == "kl")) != (kind == "kl"):
            problems.append(f"double_z {dd.get('double_z')} does not fit a {kind.upper()} autoencoder")
        if kind == "vq" and (p.get("remap") or p.get("sane_index_shape")):
            problems.append("VQ index remapping is not supported")
        if kind == "kl" and int(p["embed_dim"]) != int(dd["z_channels"]):
            problems.append(f"embed_dim {p['embed_dim']} != z_channels {dd['z_channels']}: diffusers' AutoencoderKL "
                            f"needs them equal")
        if problems:
            raise ConversionError(f"LDM first stage {target}: " + "; ".join(problems))
        return cls(kind=kind, in_channels=int(dd.get("in_channels", 3)), out_channels=int(dd.get("out_ch", 3)),
                   ch=int(dd["ch"]), ch_mult=tuple(int(m) for m in dd["ch_mult"]),
                   num_res_blocks=int(dd["num_res_blocks"]), z_channels=int(dd["z_channels"]),
                   embed_dim=int(p["embed_dim"]), n_embed=int(p["n_embed"]) if kind == "vq" else None,
                   resolution=dd.get("resolution"))

    @property
    def widths(self) -> Tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def diffusers_config(self) -> Dict[str, Any]:
        n = len(self.ch_mult)
        common = dict(in_channels=self.in_channels, out_channels=self.out_channels,
                      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                      block_out_channels=self.widths, layers_per_block=self.num_res_blocks, act_fn="silu",
                      latent_channels=self.z_channels, norm_num_groups=self.norm_num_groups,
                      mid_block_add_attention=True,
                      # LDM's latent scale (scale_factor / scale_by_std) is the LatentDiffusion's, not
                      # the autoencoder's: convert_ldm_state_dict returns it separately
                      scaling_factor=1.0)
        if self.resolution:
            common["sample_size"] = int(self.resolution)
        if self.kind == "vq":
            return dict(common, num_vq_embeddings=self.n_embed, vq_embed_dim=self.embed_dim)
        return common

    def build(self) -> FirstStage:
        return (VQModel if self.kind == "vq" else AutoencoderKL)(**self.diffusers_config())

    def source(self, key: str) -> Source:
        top = _rename(_AE_TOP, key)
        if top is not None:
            return Source(top)
        n = len(self.ch_mult)
        m = re.fullmatch(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
        if m:
            part, i, kind, j, rest = m[1], int(m[3]), m[4], int(m[5]), m[6]
            level = i if part == "encoder" else n - 1 - i  # LDM's decoder lists levels bottom-up
            base = f"{part}.{'down' if part == 'encoder' else 'up'}.{level}"
            if kind == "resnets":
                renamed = _rename(_AE_RESNET, rest)
                if renamed is not None:
                    return Source(f"{base}.block.{j}.{renamed}")
            elif rest.startswith("conv."):
                return Source(f"{base}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}")
            raise _unknown(self.what, key)
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            part, kind, j, rest = m[1], m[2], int(m[3]), m[4]
            if kind == "resnets":
                renamed = _rename(_AE_RESNET, rest)
                if renamed is not None:
                    return Source(f"{part}.mid.block_{j + 1}.{renamed}")
            else:
                renamed = _rename(_AE_ATTENTION, rest)
                if renamed is not None:
                    return Source(f"{part}.mid.attn_1.{renamed}",
                                  trailing=2 if rest.endswith("weight") and not rest.startswith("group_norm") else 0)
            raise _unknown(self.what, key)
        raise _unknown(self.what, key)

    def module(self, ae: FirstStage, ldm_name: str) -> nn.Module:
        """Our module for an LDM module name: ``encoder.down.<level>.block.<j>``,
        ``decoder.up.<level>.block.<j>`` (negative j counts from the end, as in Python),
        ``<encoder|decoder>.mid.block_1|attn_1|block_2``."""
        n = len(self.ch_mult)
        m = re.fullmatch(r"(encoder)\.down\.(\d+)\.block\.(-?\d+)|(decoder)\.up\.(\d+)\.block\.(-?\d+)", ldm_name)
        if m:
            if m[1]:
                return ae.encoder.down_blocks[int(m[2])].resnets[int(m[3])]
            return ae.decoder.up_blocks[n - 1 - int(m[5])].resnets[int(m[6])]
        m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|attn_1|block_2)", ldm_name)
        if m:
            mid = getattr(ae, m[1]).mid_block
            return {"block_1": mid.resnets[0], "attn_1": mid.attentions[0], "block_2": mid.resnets[1]}[m[2]]
        raise KeyError(f"{ldm_name!r}: not an LDM first-stage module name this mapping knows")


# ---- a whole LatentDiffusion config and checkpoint -------------------------------------------------
@dataclass(frozen=True)
class LDMSpec:
    """An LDM ``LatentDiffusion`` config: its UNet, its first stage and its noise schedule params."""

    unet: UNetSpec
    first_stage: FirstStageSpec
    params: Mapping[str, Any] = field(default_factory=dict)  # the model.params (schedule: timesteps, linear_*, ...)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LDMSpec":
        """From a parsed LDM ``config.yaml`` (``{"model": {...}}``), its ``model`` entry
        (``{"target", "params"}``) or the ``model.params`` themselves."""
        p = config
        if "model" in p:
            p = p["model"]
        if "params" in p and "unet_config" not in p:
            p = p["params"]
        if "unet_config" not in p or "first_stage_config" not in p:
            raise ConversionError("LDM config: expected model.params with unet_config and first_stage_config, got "
                                  f"keys {sorted(p)}")
        cond = p.get("cond_stage_config", "__is_unconditional__")
        if cond != "__is_unconditional__" or p.get("conditioning_key"):
            raise ConversionError(f"LDM config: conditional LDMs (cond_stage_config {cond!r}) are not supported")
        return cls(unet=UNetSpec.from_params(p["unet_config"].get("params") or {}),
                   first_stage=FirstStageSpec.from_config(p["first_stage_config"]), params=dict(p))


# The model.params of the LDM configs MIDMs builds on (CompVis/latent-diffusion configs/latent-diffusion/;
# MIDMs' weights/celeba/pretrained/config.yaml is celebahq-ldm-vq-4 with MIDMs' module paths).
# Only what shapes the networks and the schedule is kept (no data, logging or checkpoint paths).
LDM_CONFIGS: Dict[str, Dict[str, Any]] = {
    "celebahq-ldm-vq-4": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 64, "channels": 3,
        "cond_stage_config": "__is_unconditional__",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
            "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4],
            "num_head_channels": 32}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": 3, "n_embed": 8192, "ddconfig": {
                "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
    },
    "lsun_churches-ldm-kl-8": {
        "linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "image_size": 32, "channels": 4,
        "scale_by_std": True, "cond_stage_config": "__is_unconditional__",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 192,
            "attention_resolutions": [1, 2, 4, 8], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4, 4],
            "num_heads": 8, "use_scale_shift_norm": True, "resblock_updown": True}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "ddconfig": {
                "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
    },
}


# The LDM each MIDMs benchmark (its --benchmark option) builds on: CelebA-HQ edge is the released
# model (weights/celeba/pretrained/config.yaml); LSUN-Churches per the paper (LDM's churches model);
# no DeepFashion LDM is referenced anywhere.
BENCHMARK_LDM = {"celebahqedge": "celebahq-ldm-vq-4", "lsun_church": "lsun_churches-ldm-kl-8"}


def ldm_config_for_benchmark(benchmark: str) -> Dict[str, Any]:
    if benchmark not in BENCHMARK_LDM:
        raise ConversionError(f"no known LDM config for MIDMs benchmark {benchmark!r} (known: {sorted(BENCHMARK_LDM)}); "
                              f"give the checkpoint's config.yaml")
    return LDM_CONFIGS[BENCHMARK_LDM[benchmark]]


def ldm_config_for(manifest: Mapping[str, Any]) -> Dict[str, Any]:
    """The known LDM config (``LDM_CONFIGS``) whose UNet and/or first stage have exactly the keys
    and shapes of ``manifest`` (official key -> [shape, dtype], or key -> tensor; LDM's layout,
    with or without MIDMs' ``diff_model.``). A checkpoint carries no head counts, so the config
    cannot be read off the weights alone."""
    shapes = {k: tuple(v.shape if torch.is_tensor(v) else v[0]) for k, v in manifest.items()}
    outer = MIDMS_PREFIX if any(k.startswith(MIDMS_PREFIX) for k in shapes) else ""
    tried = []
    for name, config in LDM_CONFIGS.items():
        spec = LDMSpec.from_config(config)
        parts = [part for part in (spec.unet, spec.first_stage)
                 if any(k.startswith(outer + part.prefix) for k in shapes)]
        if not parts:
            raise ConversionError(f"no LDM UNet ({UNET_PREFIX}*) or first-stage ({FIRST_STAGE_PREFIX}*) keys given")
        fits = True
        for part in parts:
            ours = {k: tuple(v.shape) for k, v in part.meta_model().state_dict().items()}
            want = {outer + part.prefix + k: s for k, s in part.expected_ldm_shapes(ours).items()}
            got = {k: s for k, s in shapes.items() if k.startswith(outer + part.prefix)}
            fits = fits and want == got
        if fits:
            return config
        tried.append(name)
    raise ConversionError(f"the LDM weights fit none of the known LDM configs ({', '.join(tried)}); "
                          f"give the checkpoint's config.yaml")


@dataclass
class LDMConverted:
    unet: Dict[str, torch.Tensor]  # keys of UNetSpec.build()'s state dict
    first_stage: Dict[str, torch.Tensor]  # keys of FirstStageSpec.build()'s state dict
    scale_factor: Optional[float]  # LDM's latent scale buffer (scale_by_std), when the checkpoint has one
    consumed: List[str]  # every checkpoint key used or deliberately dropped (with the prefix)
    dropped: Dict[str, str]  # key or prefix* -> why it is not used


def detect_prefix(keys: Iterable[str]) -> str:
    """``diff_model.`` for MIDMs' checkpoint (its LatentDiffusion attribute), "" for LDM's own."""
    keys = list(keys)
    if any(k.startswith(MIDMS_PREFIX + UNET_PREFIX) for k in keys):
        return MIDMS_PREFIX
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return ""
    raise ConversionError(f"no LDM UNet keys ({UNET_PREFIX}* or {MIDMS_PREFIX}{UNET_PREFIX}*) in the checkpoint")


def convert_ldm_state_dict(state: Mapping[str, torch.Tensor], spec: LDMSpec, prefix: Optional[str] = None,
                           need_unet: bool = True) -> LDMConverted:
    """The UNet and first-stage state dicts of ours from an LDM checkpoint (``model.diffusion_model.*``,
    ``first_stage_model.*``) or MIDMs' (the same behind ``diff_model.``; ``prefix`` None = detect).

    Only keys under ``prefix`` are looked at (MIDMs' checkpoint has its matching networks and a
    second copy, ``diffusion_sampler.model.*``, beside them: the caller handles those). Under it,
    the schedule buffers (recomputed by ``schedule.py``) and the EMA copy (``model_ema.*``: neither
    MIDMs' forward nor its training loop uses it) are dropped; any other key is an error."""
    if prefix is None:
        prefix = detect_prefix(state)
    mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    dropped = {prefix + "model_ema.*": "LDM's EMA copy of the UNet (LitEma): MIDMs runs and fine-tunes the "
                                       "non-EMA weights and never updates or swaps in the EMA"}
    consumed = [prefix + k for k in mine if k.startswith("model_ema.")]
    for name in SCHEDULE_BUFFERS:
        if name in mine:
            dropped[prefix + name] = "noise-schedule buffer computed from the config (schedule.py recomputes it)"
            consumed.append(prefix + name)
    scale_factor = None
    if "scale_factor" in mine:
        scale_factor = float(mine["scale_factor"]) if mine["scale_factor"].device.type != "meta" else None
        consumed.append(prefix + "scale_factor")
    unet_keys = {k[len(UNET_PREFIX):]: v for k, v in mine.items() if k.startswith(UNET_PREFIX)}
    ae_keys = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in mine.items() if k.startswith(FIRST_STAGE_PREFIX)}
    unknown = [prefix + k for k in mine if prefix + k not in consumed and not k.startswith((UNET_PREFIX, FIRST_STAGE_PREFIX))]
    errors = [format_key_problems(f"LDM checkpoint{' behind ' + prefix if prefix else ''}", [], unknown, [])] if unknown else []
    converted: Dict[str, Dict[str, torch.Tensor]] = {"unet": {}, "first_stage": {}}
    for name, part, keys in (("unet", spec.unet, unet_keys), ("first_stage", spec.first_stage, ae_keys)):
        if name == "unet" and not need_unet and not keys:
            continue
        try:
            converted[name] = part.convert(keys, outer_prefix=prefix)
        except ConversionError as exc:
            errors.append(str(exc))
    if errors:
        raise ConversionError("\n".join(errors))
    unet, first_stage = converted["unet"], converted["first_stage"]
    consumed += [prefix + UNET_PREFIX + k for k in unet_keys] + [prefix + FIRST_STAGE_PREFIX + k for k in ae_keys]
    return LDMConverted(unet=unet, first_stage=first_stage, scale_factor=scale_factor, consumed=consumed,
                        dropped=dropped)


__all__ = ["BENCHMARK_LDM", "FIRST_STAGE_PREFIX", "FirstStageSpec", "LDM_CONFIGS", "LDMConverted", "LDMSpec", "ldm_config_for", "ldm_config_for_benchmark", "MIDMS_PREFIX", "SCHEDULE_BUFFERS",
           "Source", "UNET_PREFIX", "UNetSpec", "convert_ldm_state_dict", "detect_prefix"]
