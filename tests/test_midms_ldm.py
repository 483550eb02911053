"""MIDMs' latent-diffusion parts: LDM configs and checkpoints -> diffusers (methods/midms/ldm_convert.py),
LDM's schedule and DDIM tables (methods/midms/schedule.py), and their parity fixtures."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from bench.parity.fixtures import Fixture, compare, parity_dir
from methods.common.convert import ConversionError, meta_state_dict
from methods.midms import schedule as sch
from methods.midms.components import build_unet, ldm_parts, ldm_spec, load_pretrained_ldm, unet_spec
from methods.midms.ldm_convert import (FIRST_STAGE_PREFIX, LDM_CONFIGS, MIDMS_PREFIX, UNET_PREFIX, FirstStageSpec,
                                       LDMSpec, UNetSpec, convert_ldm_state_dict, ldm_config_for)

PARITY = parity_dir() / "midms"
MANIFESTS = sorted((PARITY / "manifests").glob("*.json")) if PARITY.is_dir() else []
needs_parity = pytest.mark.skipif(not PARITY.is_dir(), reason=f"no MIDMs parity fixtures under {PARITY} "
                                                               f"(set BENCH_PARITY_DIR)")

TINY = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1)
TINY_UNETS = {
    "celebahq-like": dict(TINY, channel_mult=[1, 2], attention_resolutions=[2], num_head_channels=8),
    "new-order": dict(TINY, channel_mult=[1, 2], attention_resolutions=[1, 2], num_head_channels=8,
                      use_new_attention_order=True),
    "lsun-like": dict(TINY, channel_mult=[1, 2, 2], attention_resolutions=[1, 2], num_heads=4, num_heads_upsample=2,
                      use_scale_shift_norm=True, resblock_updown=True),
}
TINY_DDCONFIG = dict(double_z=False, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                     num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def tiny_first_stage(kind: str) -> dict:
    if kind == "vq":
        return {"target": "ldm.models.autoencoder.VQModelInterface",
                "params": {"embed_dim": 3, "n_embed": 64, "ddconfig": TINY_DDCONFIG}}
    return {"target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": 4, "ddconfig": dict(TINY_DDCONFIG, double_z=True, z_channels=4)}}


def seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Distinct values everywhere (diffusers zero-initialises some layers), so a mapping that swaps
    two tensors of one shape cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


# ---- conversion ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TINY_UNETS))
def test_unet_round_trip(name):
    spec = UNetSpec.from_params(TINY_UNETS[name])
    ours = seeded(spec.build()).state_dict()
    ldm = spec.to_ldm(ours)
    qkv = [k for k in ldm if k.endswith("qkv.weight")]
    assert qkv and all(ldm[k].shape[0] == 3 * ldm[k].shape[1] and ldm[k].shape[2:] == (1,) for k in qkv)
    assert "time_embed.0.weight" in ldm and "out.2.weight" in ldm and "input_blocks.0.0.weight" in ldm
    back = spec.convert(ldm)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_legacy_qkv_is_split_per_head():
    """LDM's QKVAttentionLegacy reads the fused qkv as [heads, (q, k, v), ch]."""
    spec = UNetSpec.from_params(TINY_UNETS["celebahq-like"])
    key = "input_blocks.3.1.qkv.weight"  # level 1 (width 64, 8 heads of 8)
    ours = {k: tuple(v.shape) for k, v in spec.meta_model().state_dict().items()}
    qkv = torch.arange(192 * 64, dtype=torch.float64).reshape(192, 64, 1)
    ldm = {k: torch.zeros(s) for k, s in spec.expected_ldm_shapes(ours).items()}
    ldm[key] = qkv
    converted = spec.convert(ldm, ours)
    heads = qkv.reshape(8, 3, 8, 64)
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        assert torch.equal(converted[f"down_blocks.1.attentions.0.{part}.weight"], heads[:, i].reshape(64, 64))


def test_fixed_head_count_is_set_on_every_attention():
    spec = UNetSpec.from_params(TINY_UNETS["lsun-like"])
    unet = spec.build()
    heads = {name: m.heads for name, m in spec.attention_heads(unet).items()}
    assert heads and all(h == (2 if n.startswith("up_blocks") else 4) for n, h in heads.items())


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_first_stage_round_trip(kind):
    spec = FirstStageSpec.from_config(tiny_first_stage(kind))
    ours = seeded(spec.build()).state_dict()
    ldm = spec.to_ldm(ours)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.0.block.0.conv1.weight" in ldm and "decoder.up.1.upsample.conv.weight" in ldm
    assert ("quantize.embedding.weight" in ldm) == (kind == "vq")
    # LDM's decoder counts levels bottom-up: up.0 is the full-resolution level, our last up block
    assert torch.equal(ldm["decoder.up.0.block.0.conv1.weight"], ours["decoder.up_blocks.1.resnets.0.conv1.weight"])
    back = spec.convert(ldm)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_unknown_missing_and_misshaped_keys_are_listed_in_one_error():
    spec = UNetSpec.from_params(TINY_UNETS["celebahq-like"])
    ldm = spec.to_ldm(spec.build().state_dict())
    del ldm["out.2.bias"]
    ldm["input_blocks.3.1.qkv.weight"] = torch.zeros(90, 64, 1)
    ldm["input_blocks.9.0.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as err:
        spec.convert(ldm)
    msg = str(err.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
    for key in ("model.diffusion_model.out.2.bias", "model.diffusion_model.input_blocks.3.1.qkv.weight",
                "model.diffusion_model.input_blocks.9.0.bogus.weight"):
        assert key in msg


def test_unsupported_ldm_configs_are_refused_with_the_reason():
    with pytest.raises(ConversionError, match="cross-attention"):
        UNetSpec.from_params(dict(TINY_UNETS["celebahq-like"], use_spatial_transformer=True, context_dim=8))
    with pytest.raises(ConversionError, match="per-level attention"):
        FirstStageSpec.from_config({"target": "ldm.models.autoencoder.VQModelInterface",
                                    "params": {"embed_dim": 3, "n_embed": 64,
                                               "ddconfig": dict(TINY_DDCONFIG, attn_resolutions=[16])}})
    with pytest.raises(ConversionError, match="conditional"):
        LDMSpec.from_config(dict(LDM_CONFIGS["celebahq-ldm-vq-4"], cond_stage_config={"target": "x"}))


@pytest.mark.skipif(not MANIFESTS, reason=f"no MIDMs manifests under {PARITY} (set BENCH_PARITY_DIR)")
@pytest.mark.parametrize("path", MANIFESTS, ids=[p.stem for p in MANIFESTS])
def test_full_manifest_converts_on_meta(path):
    """Every diff_model.model.diffusion_model.* / first_stage_model.* key of the released checkpoint
    layout is consumed at full width, and the result fits the diffusers models of its LDM config."""
    manifest = json.loads(path.read_text())
    spec = LDMSpec.from_config(manifest["ldm_config"])
    for config in manifest["configs"].values():
        for net in config["networks"].values():
            state = meta_state_dict(net)
            converted = convert_ldm_state_dict(state, spec)
            ldm_keys = [k for k in state if k.startswith(MIDMS_PREFIX)]
            assert sorted(converted.consumed) == sorted(ldm_keys)
            for part, ours in ((spec.unet, converted.unet), (spec.first_stage, converted.first_stage)):
                model = part.assign(ours)
                assert all(p.is_meta for p in model.parameters())
                assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
                       {k: tuple(v.shape) for k, v in ours.items()}
            assert ldm_config_for(net) == LDM_CONFIGS["celebahq-ldm-vq-4"]


def test_lsun_churches_config_on_meta():
    """LSUN-Churches' LDM (KL-f8, 8 heads at every width, scale-shift norm, resblock up/down): the
    diffusers models build, and their LDM key layout converts back (shapes only: no fixture)."""
    spec = LDMSpec.from_config({"model": {"params": LDM_CONFIGS["lsun_churches-ldm-kl-8"]}})
    assert spec.first_stage.kind == "kl" and spec.first_stage.downsampling == 8
    checkpoint = {}
    for part in (spec.unet, spec.first_stage):
        shapes = {k: tuple(v.shape) for k, v in part.meta_model().state_dict().items()}
        checkpoint.update(meta_state_dict({part.prefix + k: [list(s), "float32"]
                                           for k, s in part.expected_ldm_shapes(shapes).items()}))
    checkpoint["scale_factor"] = torch.empty((), device="meta")
    checkpoint["model_ema.decay"] = torch.empty((), device="meta")
    converted = convert_ldm_state_dict(checkpoint, spec)
    assert sorted(converted.consumed) == sorted(checkpoint)
    assert converted.unet["down_blocks.0.downsamplers.0.conv1.weight"].shape == (192, 192, 3, 3)  # ResBlock(down)
    assert converted.unet["mid_block.attentions.0.group_norm.weight"].shape == (768,)
    assert converted.first_stage["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert ldm_config_for(checkpoint) == LDM_CONFIGS["lsun_churches-ldm-kl-8"]


def test_ldm_checkpoint_directory_loads(tmp_path):
    """pretrained_ldm may name an LDM in CompVis' layout (config.yaml + model.ckpt)."""
    params = {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000,
              "unet_config": {"params": TINY_UNETS["celebahq-like"]}, "first_stage_config": tiny_first_stage("vq")}
    spec = ldm_spec({"model": {"params": params}})
    unet, ae = seeded(spec.unet.build(), 1), seeded(spec.first_stage.build(), 2)
    state = {UNET_PREFIX + k: v for k, v in spec.unet.to_ldm(unet.state_dict()).items()}
    state.update({FIRST_STAGE_PREFIX + k: v for k, v in spec.first_stage.to_ldm(ae.state_dict()).items()})
    state["betas"] = torch.zeros(1000)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                                                    "params": params}}))
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "model.ckpt")
    parts = load_pretrained_ldm(str(tmp_path), timestep_spacing="leading", set_alpha_to_one=False)
    assert parts.pretrained and parts.latent_scale == 1.0 and parts.provenance["ldm.checkpoint"].startswith("sha256:")
    for ours, want in ((parts.unet, unet), (parts.first_stage, ae)):
        got = ours.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())
    ref = sch.ldm_schedule(params).alphas_cumprod
    assert torch.equal(parts.scheduler.alphas_cumprod, ref)


def test_scratch_builders_follow_the_ldm_spec():
    """The from-scratch UNet is LDM's layout scaled: celebahq-ldm-vq-4 at width 1, 32-wide heads."""
    full = unet_spec(224, (1, 2, 3, 4), 2, (1, 2, 3), 32, 3, 64, 1.0)
    assert full == UNetSpec.from_params(LDM_CONFIGS["celebahq-ldm-vq-4"]["unet_config"]["params"])
    tiny = build_unet(224, (1, 2), 2, (1,), 32, 3, 16, 0.125)
    assert tiny.config.block_out_channels == (32, 64) and tiny.config.attention_head_dim == 32
    parts = ldm_parts(ldm_spec("celebahq-ldm-vq-4"), "leading", False, need_unet=False)
    assert parts.unet is None and not parts.pretrained and parts.first_stage.config.num_vq_embeddings == 8192


# ---- schedule ---------------------------------------------------------------------------------------
def test_ddim_grid_and_midms_timesteps():
    sched = sch.ldm_schedule(LDM_CONFIGS["celebahq-ldm-vq-4"])
    grid = sch.ddim_tables(sched.alphas_cumprod, 16, 0.0)
    assert grid.total_steps == 17 and grid.time_range[0] == 993 and grid.time_range[-1] == 1
    steps = sch.interleaved_timesteps(grid, sch.interleaved_hijack_steps(16))
    assert steps.noised_at[0] == 311 and steps.denoise_step.tolist() == [249, 187, 125, 63]
    assert all(grid.ddim_timesteps[i] == t for i, t in zip(steps.index.tolist(), steps.denoise_step.tolist()))
    final = sch.final_sampler_steps(sch.ddim_tables(sched.alphas_cumprod, 200, 1.0), 180)
    assert final.noised_at.tolist() == [101] and final.steps[0] == 96 and final.steps[-1] == 1 and len(final.steps) == 20
    assert sch.ddim_timesteps(1000, 200).shape == (200,)  # 1000 % 200 == 0: no extra entry


def test_ldm_scheduler_carries_ldm_alphas():
    sched = sch.ldm_schedule(LDM_CONFIGS["celebahq-ldm-vq-4"])
    ddim = sch.ldm_scheduler(sched, set_alpha_to_one=False)
    assert torch.equal(ddim.alphas_cumprod, sched.alphas_cumprod) and torch.equal(ddim.betas, sched.betas)
    x0, noise = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([311, 101])
    x = sched.q_sample(x0, t, noise)
    assert x.dtype == torch.float64
    assert torch.allclose(x[0], sched.sqrt_alphas_cumprod[311].double() * x0[0]
                          + sched.sqrt_one_minus_alphas_cumprod[311].double() * noise[0], rtol=0, atol=0)
    assert torch.equal(sched.q_sample(x0, 311, noise)[0], x[0])


# ---- parity -----------------------------------------------------------------------------------------
@needs_parity
@pytest.mark.parametrize("case", ["unet_eps", "vq_f4", "ddim_schedule"])
def test_parity_fixture(case):
    from bench.parity.midms_ldm import CASES

    path = PARITY / f"celebahqedge_{case}.pt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    torch.set_num_threads(2)
    fx = Fixture.load(path)
    result = compare(fx, CASES[case](fx))
    assert result.ok, result.summary()
