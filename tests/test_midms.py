"""MIDMs: the official sampler steps and timesteps, confidence mask, losses, ablation switches,
gradients, training phases, optimiser, pretrained-LDM loading and the first-stage cache.

Small and CPU-only (32x32 embedded data, width 0.125); random-init VGG for the VGG losses. Parity
with the official code itself is ``tests/test_parity.py`` (``bench/parity/midms.py``).
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
from methods.midms import losses as midms_losses  # noqa: E402
from methods.midms import model as midms_model  # noqa: E402
from methods.midms.components import PretrainedLDMError  # noqa: E402
from methods.midms.matching import confidence_mask, coordinate_grid  # noqa: E402
from methods.midms.model import MIDMsMethod, MIDMsOptions  # noqa: E402
from methods.midms.sampling import one_step_sample, sample_from  # noqa: E402

RES = 32


@pytest.fixture(scope="module")
def data():
    ds = EmbeddedDataset(DatasetSpec(name="embedded", variant="edge"), "train", RES)
    batch = torch.utils.data.default_collate([ds[i] for i in range(2)])
    return ds.info, batch


def make(info, total_steps=10, seed=0, init_seed=None, training=True, lr_g=1e-4, **kw) -> MIDMsMethod:
    kw.setdefault("refine_noise_level", 0.0)
    # Smaller than the paper's layout (scaled) so the whole file runs in well under a minute.
    for k, v in dict(unet_channel_mult=(1, 2), unet_attention_levels=(1,), ae_channels=64).items():
        kw.setdefault(k, v)
    torch.manual_seed(seed if init_seed is None else init_seed)
    ctx = MethodContext(data=info, resolution=RES, width=0.125, lr_g=lr_g, beta1=0.9 if lr_g else None,
                        beta2=0.999 if lr_g else None,
                        backbones=BackboneSettings(allow_untrained=True, download=False), seed=seed,
                        total_steps=total_steps, training=training)
    return MIDMsMethod(MIDMsOptions(**kw), ctx)


def count_calls(module: torch.nn.Module, log: list):
    return module.register_forward_hook(lambda mod, args, out: log.append(args))


# ---- sampler and timesteps -----------------------------------------------------------------------
def test_official_grid_positions_and_timesteps(data):
    info, _ = data
    m = make(info)
    tables = m.ddim
    assert tables.total_steps == 17 and tables.ddim_timesteps[:3].tolist() == [1, 63, 125]  # 1000 // 16 = 62: 17 entries
    expected = {0.20: ([13, 14, 15], 249, [187, 125, 63]), 0.25: ([12, 13, 14, 15], 311, [249, 187, 125, 63]),
                0.30: ([11, 12, 13, 14, 15], 373, [311, 249, 187, 125, 63])}
    for level, (positions, noised_at, steps) in expected.items():
        o = MIDMsOptions(noise_level=level)
        assert o.positions() == positions
        assert int(tables.time_range[positions[0] - 1]) == noised_at
        assert tables.time_range[positions].tolist() == steps
    o = MIDMsOptions()
    refine = m.ddim_refine
    assert o.refine_start() == 180 and int(refine.time_range[179]) == 101
    assert refine.time_range[180:].tolist() == list(range(96, 0, -5))


def test_one_step_sample_is_the_official_ddim_step(data):
    info, _ = data
    m = make(info)
    x0 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    noise = torch.randn_like(x0)
    eps = torch.randn_like(x0)
    seen = []

    def eps_fn(x, t):
        seen.append((x, t))
        return eps

    q, tables = m.schedule, m.ddim
    first = one_step_sample(eps_fn, q, tables, x0, 12, None, lambda like: noise)
    # q_sample at time_range[11] = 311, the UNet at 249 with the coefficients of index 17 - 12 - 1 = 4
    a, s = float(q.sqrt_alphas_cumprod[311]), float(q.sqrt_one_minus_alphas_cumprod[311])
    torch.testing.assert_close(seen[0][0], a * x0 + s * noise, rtol=0, atol=1e-15)
    assert seen[0][1].tolist() == [249, 249]
    a_t, a_prev = float(tables.ddim_alphas[4]), float(tables.ddim_alphas_prev[4])
    assert int(tables.ddim_timesteps[4]) == 249 and int(tables.ddim_timesteps[3]) == 187
    pred_x0 = (seen[0][0] - float(tables.ddim_sqrt_one_minus_alphas[4]) * eps) / math.sqrt(a_t)
    torch.testing.assert_close(first.pred_x0, pred_x0, rtol=0, atol=1e-14)
    torch.testing.assert_close(first.x_prev, math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * eps,
                               rtol=0, atol=1e-14)
    # The next step starts from sqrt(a_prev) * (given x0) + dir_xt and draws no noise (eta 0).
    x0_new = torch.randn_like(x0)
    one_step_sample(eps_fn, q, tables, x0_new, 13, first.carry, lambda like: pytest.fail("eta 0 drew noise"))
    torch.testing.assert_close(seen[1][0], math.sqrt(a_prev) * x0_new + math.sqrt(1 - a_prev) * eps,
                               rtol=0, atol=1e-14)


def test_refinement_draws_one_noise_per_step_and_returns_the_last_x0(data):
    info, _ = data
    m = make(info)
    draws = []

    def noise(like):
        draws.append(1)
        return torch.zeros_like(like)

    steps = []
    x0 = torch.randn(1, 3, 8, 8)
    out = sample_from(lambda x, t: torch.zeros_like(x), m.schedule, m.ddim_refine, x0, 180, noise, steps)
    assert len(draws) == 1 + 20 and [s.t for s in steps] == list(range(96, 0, -5))
    torch.testing.assert_close(out, steps[-1].pred_x0)


def test_generate_runs_the_documented_steps_from_the_noised_warp(data):
    info, batch = data
    m = make(info)
    seen = []
    h = m.unet.register_forward_pre_hook(lambda mod, args: seen.append((args[0].clone(), args[1].tolist())))
    m.eval()
    out = m.generate(batch)
    h.remove()
    assert [t[0] for _, t in seen] == [249, 187, 125, 63]
    with torch.no_grad():
        z_ref = m._latent(batch["exemplar"])
        warped = m.match(batch["cond"], batch["exemplar_cond"], z_ref).warped_ref
        start = m.schedule.q_sample(warped, 311, m._noise(batch)(warped))
    torch.testing.assert_close(seen[0][0], start)
    assert out.output.shape == (2, 3, RES, RES) and out.output.abs().max() <= 1
    # the paper's Eq. 7: noised at the timestep the first step evaluates
    paper = make(info, noise_at="first_step").eval()
    seen.clear()
    h = paper.unet.register_forward_pre_hook(lambda mod, args: seen.append((args[0].clone(), args[1].tolist())))
    paper.generate(batch)
    h.remove()
    with torch.no_grad():
        torch.testing.assert_close(seen[0][0], paper.schedule.q_sample(warped, 249, paper._noise(batch)(warped)))


def test_options_reject_bad_values():
    with pytest.raises(ValueError, match="rematch_steps"):
        MIDMsOptions(noise_level=0.2, rematch_steps=(1, 2, 3))
    with pytest.raises(ValueError, match="noise_level"):
        MIDMsOptions(noise_level=0.0)
    with pytest.raises(ValueError, match="mask_check"):
        MIDMsOptions(mask_check="both")
    with pytest.raises(ValueError, match="diff_loss"):
        MIDMsOptions(diff_loss="v")
    o = MIDMsOptions(noise_level="0.3", rematch_steps=[1, 2])  # YAML-shaped input is coerced
    assert o.noise_level == 0.3 and o.rematch_steps == (1, 2)


# ---- matching and confidence mask ----------------------------------------------------------------
def test_condition_is_resized_to_the_latent_with_nearest(data):
    info, batch = data
    m = make(info)
    cond = batch["cond"]
    torch.testing.assert_close(m._semantics(cond), cond[:, :, ::4, ::4])  # 32 -> 8: nearest picks every 4th
    assert not torch.allclose(make(info, cond_resize="area")._semantics(cond), cond[:, :, ::4, ::4])


def _corr_of(target: torch.Tensor) -> torch.Tensor:
    """One-hot correlation (1, N, N): query pixel u matches source pixel target[u]."""
    n = target.numel()
    corr = torch.zeros(1, n, n, dtype=torch.float64)
    corr[0, torch.arange(n), target.reshape(-1)] = 1.0
    return corr


def test_confidence_mask_official_fbcheck_and_paper_cycle():
    idx = torch.arange(64).reshape(8, 8)
    shift = torch.stack([idx[:, min(j + 3, 7)] for j in range(8)], 1)  # 3 columns right, clamped
    circular = torch.stack([idx[:, (j + 3) % 8] for j in range(8)], 1)  # a permutation
    hw = (8, 8)
    for check in ("fbcheck", "cycle"):  # the identity is confident either way
        assert torch.equal(confidence_mask(_corr_of(idx), hw, hw, 0.005, 0.5, check).mask, torch.ones(1, 1, 8, 8))
    # The official check samples the forward flow where the backward one belongs: a 3-pixel shift
    # keeps 25 % of the pixels (the measurement), a circular one none; the paper's cycle all.
    official = confidence_mask(_corr_of(shift), hw, hw, 0.005, 0.5)
    assert official.mask.mean() == 0.25 and confidence_mask(_corr_of(circular), hw, hw, 0.005, 0.5).mask.sum() == 0
    for target in (shift, circular):
        assert confidence_mask(_corr_of(target), hw, hw, 0.005, 0.5, "cycle").mask.mean() == 1.0
    assert coordinate_grid(2, 2).tolist() == [[-1, -1], [1, -1], [-1, 1], [1, 1]]


def test_majority_vote_keeps_cells_with_three_confident_pixels():
    idx = torch.arange(16).reshape(4, 4).clone()
    idx[:, 3] = idx[:, 0]  # column 3 also matches column 0: the cycle fails on columns 0 and 3
    corr = _corr_of(idx)[:, :, :16]
    raw = confidence_mask(corr, (4, 4), (4, 4), 0.005, 0.5, "cycle", majority_pool=False).mask
    assert torch.equal(raw, torch.tensor([0.0, 1.0, 1.0, 0.0]).repeat(4, 1).view(1, 1, 4, 4).double())
    voted = confidence_mask(corr, (4, 4), (4, 4), 0.005, 0.5, "cycle").mask
    assert voted.sum() == 0  # every 2x2 cell has 2 confident pixels of 4: not > 0.5


# ---- losses ------------------------------------------------------------------------------------------
def test_midms_contextual_loss_pools_confident_rows_over_the_batch():
    torch.manual_seed(0)
    x, y = torch.randn(2, 8, 3, 3, dtype=torch.float64), torch.randn(2, 8, 3, 3, dtype=torch.float64)
    # by hand: centre by y's per-pixel channel mean, cosine, d / (min d + 1e-3), exp((1 - d~)/0.1)
    mu = y.mean(1, keepdim=True)
    xn = torch.nn.functional.normalize((x - mu).flatten(2), dim=1)
    yn = torch.nn.functional.normalize((y - mu).flatten(2), dim=1)
    d = 1 - xn.transpose(1, 2) @ yn
    w = torch.exp((1 - d / (d.min(-1, keepdim=True)[0] + 1e-3)) / 0.1)
    best = (w / w.sum(-1, keepdim=True)).max(-1)[0]
    assert (best >= 0.3).all()
    torch.testing.assert_close(midms_losses.contextual_loss(x, y), -torch.log(best.mean()))
    ranked = best.flatten().sort()[0]
    threshold = float(ranked[4] + ranked[5]) / 2  # drops 5 rows, unevenly over the two samples
    keep = best >= threshold
    assert keep[0].sum() != keep[1].sum()
    torch.testing.assert_close(midms_losses.contextual_loss(x, y, min_affinity=threshold),
                               -torch.log(best[keep].mean()))  # pooled over the batch, not per sample
    assert midms_losses.contextual_loss(x, y, min_affinity=1.1) == 0  # no row qualifies


def test_feature_normalize_uses_the_second_official_definition():
    f = torch.zeros(1, 4, 1, 1, dtype=torch.float64)
    f[0, 0] = 1e-12
    # eps = sys.float_info.epsilon (2.2e-16), not 1e-6: a tiny vector is still normalised to ~1
    assert midms_losses.feature_normalize(f)[0, 0, 0, 0] > 0.99


def _official_total(t, joint_with_context):
    total = (10 * t["loss_domain"] + t["loss_fb"] + 0.002 * t["loss_perc"] + t["loss_feat"] + t["original_loss"]
             + t["loss_fb_iterative"])
    return total + t["loss_context"] if joint_with_context else total


@pytest.mark.parametrize("joint", [False, True])
def test_paper_terms_sum_to_the_official_loss(data, joint):
    info, batch = data
    m = make(info, ldm_from_checkpoint=True)  # a "pretrained" LDM: no prior loss in the warm-up
    torch.manual_seed(3)
    with torch.no_grad():
        terms = m.loss_terms(batch, joint, torch.randn_like)
    assert set(terms) == {"loss_domain", "loss_fb", "loss_perc", "loss_feat", "original_loss", "loss_fb_iterative",
                          "loss_context"}
    if not joint:  # official: the warm-up latent cycle is counted twice
        assert torch.equal(terms["loss_fb_iterative"], terms["loss_fb"])
    total = sum(m.weighted_losses(terms, joint, with_context=joint).values())
    torch.testing.assert_close(total, _official_total(terms, joint))


def test_warmup_cycle_once_is_an_option(data):
    info, batch = data
    m = make(info, warmup_cycle_twice=False)
    with torch.no_grad():
        terms = m.loss_terms(batch, False, torch.randn_like, needed=set())
    assert terms["loss_fb_iterative"] == 0 and terms["loss_fb"] > 0


def test_joint_losses_run_the_official_chains(data):
    """Interleaved: 4 steps for the exemplar and the ground-truth chain plus one 'original' step;
    F_Y^iter twice per re-matching (exemplar, then ground truth)."""
    info, batch = data
    m = make(info)
    unet_calls, iter_calls = [], []
    hooks = [count_calls(m.unet, unet_calls), count_calls(m.matching.f_y_iter, iter_calls)]
    with torch.no_grad():
        terms = m.loss_terms(batch, True, torch.randn_like, original_idx=2, needed=set())
    for h in hooks:
        h.remove()
    assert [int(args[1][0]) for args in unet_calls] == [249, 249, 187, 187, 125, 125, 125, 63, 63]
    assert len(iter_calls) == 4 and terms["loss_fb_iterative"] > 0
    eps = make(info, diff_loss="eps")
    unet_calls.clear()
    h = count_calls(eps.unet, unet_calls)
    with torch.no_grad():
        eps.loss_terms(batch, True, torch.randn_like, needed=set())
    h.remove()
    assert len(unet_calls) == 8 + 1  # the chains, then one eps prediction on the noised GT latent


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
    losses = m.train_step(batch, m.warmup_end + 1)  # official: the contextual loss joins one step later
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return m, losses, grads


def test_loss_switches_change_the_optimisation(data, monkeypatch):
    info, batch = data
    cx_calls = []
    real_cx = midms_losses.contextual_loss
    monkeypatch.setattr(midms_losses, "contextual_loss", lambda *a, **k: cx_calls.append(1) or real_cx(*a, **k))
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
    m.train_step(batch, m.warmup_end)
    assert m.last_trace["phase"] == "joint" and "L_style" not in m.last_trace["losses"]  # n_iter > warmup_iter
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


def test_official_optimiser_and_multistep_schedule(data):
    info, batch = data
    m = make(info, lr_g=None, total_steps=100)  # the sweep sets no optimiser values: official ones
    assert m.resolved["lr_match"] == m.resolved["lr_unet"] == 3e-6 and m.opt_match.defaults["betas"] == (0.9, 0.999)
    assert m.opt_match.defaults["weight_decay"] == 0.05 and isinstance(m.opt_match, torch.optim.AdamW)
    m._set_lr(batch_size=2, step=m.ae_steps + 5 * info.size)  # epoch 10: the first milestone
    assert m.opt_match.param_groups[0]["lr"] == pytest.approx(3e-6 * 0.3)
    m._set_lr(batch_size=2, step=m.ae_steps)
    assert m.opt_match.param_groups[0]["lr"] == pytest.approx(3e-6)


def test_evaluation_only_builds_no_optimisers_and_no_vgg(data):
    info, batch = data
    m = make(info, training=False)
    assert m.optimizers() == {} and m.vgg is None and "vgg19_loss" not in m.provenance
    m.eval()
    assert m.generate(batch).output.shape == (2, 3, RES, RES)


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
    assert float(m.latent_scale) == 1.0 and int(m.ddim.time_range[12]) == 249  # its schedule: LDM's linear 0.0015 -> 0.0195
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
