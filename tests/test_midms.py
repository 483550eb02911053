"""MIDMs on diffusers: sampler exactness, confidence mask, noise-level mapping, ablation switches,
gradients, training phases, pretrained-LDM loading and the first-stage cache.

Small and CPU-only (32x32 embedded data, width 0.125); random-init VGG for the VGG losses.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

torch.set_num_threads(1)

import methods  # noqa: E402,F401  (registers midms)
from datasets.base import DatasetSpec  # noqa: E402
from datasets.embedded import EmbeddedDataset  # noqa: E402
from methods.base import BackboneSettings, MethodContext  # noqa: E402
from methods.common.weights import file_sha256  # noqa: E402
from methods.midms import model as midms_model  # noqa: E402
from methods.midms.components import PretrainedLDMError  # noqa: E402
from methods.midms.matching import confidence_mask, coordinate_grid  # noqa: E402
from methods.midms.model import MIDMsMethod, MIDMsOptions  # noqa: E402
from methods.midms.sampling import alpha_prev, denoise_timesteps, interleaved_ddim  # noqa: E402

RES = 32


@pytest.fixture(scope="module")
def data():
    ds = EmbeddedDataset(DatasetSpec(name="embedded", variant="edge"), "train", RES)
    batch = torch.utils.data.default_collate([ds[i] for i in range(2)])
    return ds.info, batch


def make(info, total_steps=10, seed=0, init_seed=None, **kw) -> MIDMsMethod:
    kw.setdefault("refine_noise_level", 0.0)
    # Smaller than the paper's layout (scaled) so the whole file runs in well under a minute.
    for k, v in dict(unet_channel_mult=(1, 2), unet_attention_levels=(1,), ae_channels=64).items():
        kw.setdefault(k, v)
    torch.manual_seed(seed if init_seed is None else init_seed)
    ctx = MethodContext(data=info, resolution=RES, width=0.125, lr_g=1e-4, beta1=0.9, beta2=0.999,
                        backbones=BackboneSettings(allow_untrained=True, download=False), seed=seed,
                        total_steps=total_steps)
    return MIDMsMethod(MIDMsOptions(**kw), ctx)


def count_calls(module: torch.nn.Module, log: list):
    return module.register_forward_hook(lambda mod, args, out: log.append(args))


# ---- sampler -------------------------------------------------------------------------------------
def test_sampling_without_interleaving_is_diffusers_ddim_exactly(data):
    info, batch = data
    m = make(info, recurrent_matching=False)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = m._diffuse(z, z, None, None, noise).latent
        # diffusers' own DDIM, written out: the same scheduler, noised start, step() loop.
        sched = m.scheduler
        sched.set_timesteps(16)
        ts = sched.timesteps[12:]
        x = sched.add_noise(z, noise, ts[:1].repeat(2))
        for t in ts:
            x = sched.step(m.unet(x, t).sample, t, x).prev_sample
    assert torch.equal(got, x)
    # The same through the sampler with a re-matcher that is never scheduled.
    with torch.no_grad():
        again = interleaved_ddim(m.unet, sched, z, noise, denoise_timesteps(sched, 16, 0.25),
                                 rematch=lambda x0, k: (x0 + 1, None), rematch_steps=()).latent
        moved = interleaved_ddim(m.unet, sched, z, noise, denoise_timesteps(sched, 16, 0.25),
                                 rematch=lambda x0, k: (x0 + 1, None), rematch_steps=(1,)).latent
    assert torch.equal(again, x)
    assert not torch.allclose(moved, x)  # a scheduled re-match does change the trajectory


def test_alpha_prev_mirrors_scheduler_step(data):
    info, _ = data
    m = make(info)
    sched = m.scheduler
    x = torch.randn(1, 3, 8, 8)
    eps = torch.randn(1, 3, 8, 8)
    for t in denoise_timesteps(sched, 16, 0.35):
        out = sched.step(eps, t, x)
        a = alpha_prev(sched, t)
        torch.testing.assert_close(out.prev_sample, a.sqrt() * out.pred_original_sample + (1 - a).sqrt() * eps)


def test_noise_level_maps_to_documented_timestep(data):
    info, batch = data
    m = make(info)
    expected = {0.20: [187, 124, 61], 0.25: [249, 187, 124, 61], 0.30: [311, 249, 187, 124, 61],
                0.35: [374, 311, 249, 187, 124, 61]}
    for level, ts in expected.items():
        assert denoise_timesteps(m.scheduler, 16, level).tolist() == ts
    # Instrumented: the UNet's first input is the warp noised to t=249, and it sees exactly the tail.
    seen = []
    h = m.unet.register_forward_pre_hook(lambda mod, args: seen.append((args[0].clone(), int(args[1]))))
    m.eval()
    out = m.generate(batch)
    h.remove()
    assert [t for _, t in seen] == expected[0.25]
    with torch.no_grad():
        z_ref = m._latent(batch["exemplar"])
        warped = m._initial_match(batch["cond"], batch["exemplar_cond"], z_ref)[-1]
        from methods.midms.matching import soft_warp
        warped = soft_warp(z_ref, warped, m.options.tau, m.latent_hw)
        noise = torch.stack([torch.randn(warped.shape[1:], generator=g) for g in m._generators(batch)])
        start = m.scheduler.add_noise(warped, noise, torch.tensor([249, 249]))
    torch.testing.assert_close(seen[0][0], start)
    assert out.output.shape == (2, 3, RES, RES) and out.output.abs().max() <= 1


def test_options_reject_bad_values():
    with pytest.raises(ValueError, match="rematch_steps"):
        MIDMsOptions(noise_level=0.2, rematch_steps=(1, 2, 3))
    with pytest.raises(ValueError, match="noise_level"):
        MIDMsOptions(noise_level=0.0)
    o = MIDMsOptions(noise_level="0.3", rematch_steps=[1, 2])  # YAML-shaped input is coerced
    assert o.noise_level == 0.3 and o.rematch_steps == (1, 2)


# ---- confidence mask -----------------------------------------------------------------------------
def _corr_from_map(target_of, hw):
    """One-hot correlation (1, N, N): query pixel u matches source pixel target_of[u]."""
    n = hw[0] * hw[1]
    corr = torch.zeros(1, n, n)
    corr[0, torch.arange(n), torch.as_tensor(target_of)] = 1.0
    return corr


def test_confidence_mask_ones_when_forward_backward_agree():
    hw = (4, 4)
    idx = torch.arange(16).reshape(4, 4)
    flipped = idx.flip(1).reshape(-1)  # a permutation: the backward map is its inverse
    for pool in (False, True):
        mask, err = confidence_mask(_corr_from_map(flipped, hw), hw, hw, tau=0.005, gamma=0.5, majority_pool=pool)
        assert torch.equal(mask, torch.ones(1, 1, 4, 4))
        assert err.max() < 1e-5


def test_confidence_mask_zero_where_cycle_disagrees_beyond_gamma():
    hw = (4, 4)
    idx = torch.arange(16).reshape(4, 4).clone()
    idx[:, 3] = idx[:, 0]  # column 3 also matches column 0: many-to-one
    corr = _corr_from_map(idx.reshape(-1), hw)
    mask, err = confidence_mask(corr, hw, hw, tau=0.005, gamma=0.5, majority_pool=False)
    # Source column 0 maps back to the mean of query columns 0 and 3 (x = 0): both are 1 away.
    expected = torch.tensor([0.0, 1.0, 1.0, 0.0]).repeat(4, 1).view(1, 1, 4, 4)
    assert torch.equal(mask, expected)
    torch.testing.assert_close(err[0, 0, :, 0], torch.ones(4))
    loose, _ = confidence_mask(corr, hw, hw, tau=0.005, gamma=1.5, majority_pool=False)
    assert torch.equal(loose, torch.ones(1, 1, 4, 4))  # within gamma: confident again
    assert coordinate_grid(2, 2).tolist() == [[-1, -1], [1, -1], [-1, 1], [1, 1]]


# ---- ablation switches (instrumented) ------------------------------------------------------------
def _run_generate(m, batch, monkeypatch):
    masks, unet_in, iter_in = [], [], []
    real_mask = midms_model.confidence_mask
    monkeypatch.setattr(midms_model, "confidence_mask", lambda *a, **k: masks.append(1) or real_mask(*a, **k))
    hooks = []
    if m.unet is not None:
        hooks.append(count_calls(m.unet, unet_in))
    if m.matching.f_y_iter is not None:
        hooks.append(count_calls(m.matching.f_y_iter, iter_in))
    m.eval()
    out = m.generate(batch)
    for h in hooks:
        h.remove()
    return out, len(unet_in), len(iter_in), len(masks)


def test_component_switches_change_what_runs(data, monkeypatch):
    info, batch = data
    full, n_unet, n_iter, n_mask = _run_generate(make(info), batch, monkeypatch)
    assert (n_unet, n_iter, n_mask) == (4, 2, 2)
    assert "8_rematch" in full.warps and "8" in full.warps
    no_cm, n_unet, n_iter, n_mask = _run_generate(make(info, confidence_masking=False), batch, monkeypatch)
    assert (n_unet, n_iter, n_mask) == (4, 2, 0)
    assert not torch.allclose(no_cm.output, full.output)
    one_time = make(info, recurrent_matching=False)
    assert one_time.matching.f_y_iter is None
    out, n_unet, n_iter, n_mask = _run_generate(one_time, batch, monkeypatch)
    assert (n_unet, n_mask) == (4, 0) and "8_rematch" not in out.warps
    no_unet = make(info, use_diffusion=False)
    assert no_unet.unet is None and no_unet.opt_unet is None
    out, n_unet, _, n_mask = _run_generate(no_unet, batch, monkeypatch)
    assert n_mask == 0
    assert torch.equal(out.output, out.warps["8"])  # matching-then-decode: the output is the warp
    refined = make(info, refine_noise_level=0.1)
    _, n_unet, _, _ = _run_generate(refined, batch, monkeypatch)
    assert n_unet == 4 + 20  # official refinement: last 20 of 200 steps


LOSSES = {"w_dom": "L_dom", "w_cycle": "L_cycle", "w_src": "L_src", "w_perc": "L_perc", "w_style": "L_style",
          "w_diff": "L_diff"}


def _joint_grads(info, batch, **kw):
    m = make(info, **kw)
    torch.manual_seed(5)
    losses = m.train_step(batch, m.warmup_end)
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return m, losses, grads


def test_loss_switches_change_the_optimisation(data, monkeypatch):
    info, batch = data
    cx_calls = []
    real_cx = midms_model.contextual_loss
    monkeypatch.setattr(midms_model, "contextual_loss", lambda *a, **k: cx_calls.append(1) or real_cx(*a, **k))
    m, full_losses, full_grads = _joint_grads(info, batch)
    assert m.last_trace["phase"] == "joint"
    assert set(LOSSES.values()) <= set(full_losses) and len(cx_calls) == 4
    for opt, key in LOSSES.items():
        cx_calls.clear()
        _, losses, grads = _joint_grads(info, batch, **{opt: 0.0})
        assert key not in losses, opt
        assert (len(cx_calls) == 0) == (opt == "w_style"), opt
        differs = any(not torch.allclose(grads[n], full_grads[n]) for n in full_grads if n in grads)
        assert differs or set(grads) != set(full_grads), f"{opt}=0 left every gradient unchanged"


def test_gradients_reach_matching_networks_and_unet(data):
    info, batch = data
    m, losses, grads = _joint_grads(info, batch)
    for name in ("f_x", "f_y", "f_y_iter", "layer", "theta", "phi"):
        sub = [g for n, g in grads.items() if n.startswith(f"matching.{name}.")]
        assert sub and any(g.abs().sum() > 0 for g in sub), name
    assert any(n.startswith("unet.") and g.abs().sum() > 0 for n, g in grads.items())
    assert not any(n.startswith("first_stage.") for n in grads)  # frozen outside its own phase


def test_warmup_keeps_pretrained_unet_frozen_but_trains_scratch_unet(data):
    info, batch = data
    m = make(info)
    m.train_step(batch, m.ae_steps)  # warm-up, scratch: the UNet learns its prior with L_diff
    assert m.last_trace["phase"] == "warmup" and "L_diff" in m.last_trace["losses"]
    assert "L_style" not in m.last_trace["losses"]  # official: contextual loss only after warm-up
    assert any(p.grad is not None for p in m.unet.parameters())


def test_train_steps_through_all_phases_are_finite(data):
    info, batch = data
    m = make(info, total_steps=6, ae_fraction=0.34, warmup_fraction=0.5)
    phases = []
    for step in range(6):
        losses = m.train_step(batch, step)
        phases.append(m.last_trace["phase"])
        assert losses and all(math.isfinite(v) for v in losses.values()), (step, losses)
    assert phases == ["ae", "ae", "warmup", "warmup", "joint", "joint"]
    assert bool(m.ae_done) and float(m.latent_scale) > 0


def test_generate_is_batch_independent_and_checkpoint_roundtrips(data):
    info, batch = data
    m = make(info)
    m.eval()
    both = m.generate(batch).output
    single = m.generate({k: v[1:] for k, v in batch.items()}).output
    torch.testing.assert_close(both[1:], single, atol=1e-4, rtol=0)  # same noise; float order only
    state = m.training_state()
    m2 = make(info, init_seed=9)  # other initial weights, same run seed (sampling noise)
    assert not torch.equal(m2.unet.conv_in.weight, m.unet.conv_in.weight)
    m2.load_training_state(state)
    m2.eval()
    assert torch.equal(m2.generate(batch).output, both)


# ---- pretrained LDM and first-stage cache --------------------------------------------------------
def _save_tiny_ldm(root):
    from diffusers import DDIMScheduler, UNet2DModel, VQModel

    torch.manual_seed(3)
    vq = VQModel(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=3, num_vq_embeddings=64, sample_size=RES)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, attention_head_dim=32)
    sched = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False)
    vq.save_pretrained(root / "vqvae")
    unet.save_pretrained(root / "unet")
    sched.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "LDMPipeline", "vqvae": ["diffusers", "VQModel"], "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"]}))
    return vq, unet


def test_pretrained_ldm_is_loaded_with_provenance(data, tmp_path):
    info, batch = data
    vq, unet = _save_tiny_ldm(tmp_path / "ldm")
    m = make(info, pretrained_ldm={"embedded": str(tmp_path / "ldm")})
    assert m.pretrained and m.phase(0) == "warmup" and m.opt_ae is None
    sha = file_sha256(tmp_path / "ldm" / "unet" / "diffusion_pytorch_model.safetensors")
    assert m.provenance["ldm.unet"] == f"sha256:{sha}" and m.provenance["ldm.vqvae"].startswith("sha256:")
    assert torch.equal(m.unet.conv_in.weight, unet.conv_in.weight)
    assert float(m.latent_scale) == 1.0 and m.scheduler.config.timestep_spacing == "trailing"
    losses = m.train_step(batch, 0)
    assert "L_diff" not in losses  # pretrained prior: UNet frozen during the warm-up (official)
    assert all(p.grad is None for p in m.unet.parameters())
    other = make(info, pretrained_ldm={"celebahq": str(tmp_path / "ldm")})  # not this dataset: scratch
    assert not other.pretrained


def test_missing_pretrained_ldm_names_the_path(data, tmp_path):
    info, _ = data
    missing = tmp_path / "no_such_ldm"
    with pytest.raises(PretrainedLDMError, match="no_such_ldm"):
        make(info, pretrained_ldm=str(missing))


def test_first_stage_cache_is_shared_between_trials(data, tmp_path):
    info, batch = data
    a = make(info, total_steps=4, ae_fraction=0.5, ae_cache_dir=str(tmp_path))
    for step in range(2):
        assert "ae_rec" in a.train_step(batch, step)
    files = list(tmp_path.glob("midms_ae_*.pt"))
    assert len(files) == 1
    b = make(info, total_steps=4, ae_fraction=0.5, ae_cache_dir=str(tmp_path), seed=0, noise_level=0.3)
    assert b.train_step(batch, 0) == {"ae_cache_hit": 1.0}
    assert b.train_step(batch, 1) == {"ae_cache_hit": 1.0}
    for (n, pa), pb in zip(a.first_stage.state_dict().items(), b.first_stage.state_dict().values()):
        assert torch.equal(pa, pb), n
    assert b.provenance["ldm.first_stage"].startswith("cache:")


def test_cache_hit_or_miss_gives_the_same_trial(data, tmp_path):
    """The same trial trained once with its first stage trained (cache miss) and once with it loaded
    (cache hit) ends in the same state: the first stage draws from a stream of its own."""
    info, batch = data

    def run(cache_dir):
        m = make(info, total_steps=5, ae_fraction=0.4, ae_cache_dir=str(cache_dir))
        logs = [m.train_step(batch, step) for step in range(5)]
        return m, logs

    (miss, miss_logs), (hit, hit_logs) = run(tmp_path), run(tmp_path)
    assert "ae_rec" in miss_logs[0] and hit_logs[0] == {"ae_cache_hit": 1.0}
    assert miss_logs[2:] == hit_logs[2:]  # the joint phase: identical losses
    for (n, a), b in zip(miss.state_dict().items(), hit.state_dict().values()):
        assert torch.equal(a, b), n
