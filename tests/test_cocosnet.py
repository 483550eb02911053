"""CoCosNet v1 (methods/cocosnet): correspondence maths, loss switches, gradients, training, shapes.

Small and CPU-only: resolution 32 (64 where the embedded training scale matters), width 0.125,
one thread, seeded random-init VGG (``allow_untrained``; nothing is downloaded or faked).
"""
from __future__ import annotations

import math
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

import methods  # noqa: F401  (registers the methods)
from datasets.base import DatasetSpec
from datasets.embedded import EmbeddedDataset
from methods.base import BackboneSettings, MethodContext
from methods.cocosnet.augment import distort, random_grids, recrop_grids
from methods.cocosnet.correspondence import match_scores
from methods.cocosnet.model import CoCosNetMethod, CoCosNetOptions
from methods.common.correspondence import soft_warp, soft_weights
from methods.common.weights import MissingWeightsError
from methods.registry import METHODS

torch.set_num_threads(1)

UNTRAINED = BackboneSettings(allow_untrained=True, download=False)
# Every loss switch, the key it returns, and the networks its gradient must / must not reach.
SWITCHES = {
    "lambda_feat_vgg": ("G_feat", ["netG", "netCorr.theta"], []),
    "lambda_perc": ("G_perc", ["netG", "netCorr.theta"], []),
    "lambda_context": ("G_context", ["netG", "netCorr.theta"], []),
    "lambda_gan": ("G_gan", ["netG", "netCorr.theta"], []),
    "lambda_gan_feat": ("G_gan_feat", ["netG", "netCorr.theta"], []),
    # Correspondence-only terms: the translation network must get nothing from them.
    "lambda_domain": ("G_domain", ["netCorr.adaptor_seg", "netCorr.adaptor_img"], ["netG", "netCorr.theta"]),
    "lambda_cycle": ("G_reg", ["netCorr.theta", "netCorr.adaptor_img"], ["netG"]),
    "lambda_mask": ("G_mask", ["netCorr.theta", "netCorr.adaptor_seg"], ["netG"]),
    "lambda_warp_self": ("G_warp_self", ["netCorr.theta"], ["netG"]),
}
ALL_ON = dict(lambda_cycle=1.0, lambda_mask=100.0, lambda_warp_self=100.0, maskmix=True)


@pytest.fixture(scope="module")
def data32():
    ds = EmbeddedDataset(DatasetSpec(name="embedded", variant="mask"), "train", 32)
    return ds, torch.utils.data.default_collate([ds[i] for i in range(2)])


@pytest.fixture(scope="module")
def data64():
    ds = EmbeddedDataset(DatasetSpec(name="embedded", variant="mask"), "train", 64)
    return ds, [torch.utils.data.default_collate([ds[4 * k + i] for i in range(4)]) for k in range(2)]


def build(ds, resolution: int, seed: int = 0, **opts) -> CoCosNetMethod:
    ctx = MethodContext(data=ds.info, resolution=resolution, width=0.125, backbones=UNTRAINED, seed=seed,
                        beta2=0.9, total_steps=10)
    torch.manual_seed(seed)
    # At 32x32 the official D (padding 1) has room for one scale only: its second scale would reach
    # its last instance norm at 1x1 (the method refuses that; test_official_discriminator... checks).
    defaults = dict(num_d=1) if resolution < 64 else {}
    return CoCosNetMethod(CoCosNetOptions(**dict(defaults, **opts)), ctx)


def only(switch: str) -> Dict[str, float]:
    """Options with every loss off except ``switch`` (at a nonzero weight)."""
    opts = {name: 0.0 for name in SWITCHES}
    opts[switch] = ALL_ON.get(switch, 1.0)
    return opts


def grad_norm(model, prefix: str) -> float:
    total = 0.0
    for name, p in model.named_parameters():
        if name.startswith(prefix + ".") and p.grad is not None:
            total += float(p.grad.abs().sum())
    return total


# ---- correspondence maths -------------------------------------------------------------------
def test_soft_warp_with_one_hot_weights_is_a_gather():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2, 3, 5, 6, generator=g)
    idx = torch.randint(0, 30, (2, 12), generator=g)  # 12 target positions, each picks a source one
    weights = F.one_hot(idx, 30).float()
    expected = torch.gather(src.flatten(2), 2, idx[:, None, :].expand(2, 3, 12))
    assert torch.equal(soft_warp(weights, src), expected)
    assert soft_warp(weights, src, (3, 4)).shape == (2, 3, 3, 4)
    # Scores that are one-hot cosines (1 vs 0) through the alpha = 100 softmax: the same gather, up
    # to exp(-100) leakage.
    warped = soft_warp(soft_weights(weights, alpha=100.0), src)
    assert torch.allclose(warped, expected, atol=1e-6)
    # A softer alpha visibly averages: the soft warp is not a gather any more.
    assert not torch.allclose(soft_warp(soft_weights(weights, alpha=1.0), src), expected, atol=1e-2)
    with pytest.raises(ValueError):
        soft_warp(weights[:, :, :29], src)


@pytest.mark.parametrize("centre", ["channel", "spatial"])
def test_correspondence_recovers_a_known_permutation(centre):
    g = torch.Generator().manual_seed(1)
    b, c, h, w = 2, 32, 8, 8
    n = h * w
    cond_feat = torch.randn(b, c, h, w, generator=g)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])  # exemplar pos v <- cond pos perm[v]
    gather = lambda t: torch.gather(t.flatten(2), 2, perm[:, None, :].expand(b, t.shape[1], n))  # noqa: E731
    ex_feat = gather(cond_feat).view(b, c, h, w)
    scores = match_scores(cond_feat, ex_feat, kernel=1, centre=centre)
    assert scores.shape == (b, n, n)
    inverse = torch.argsort(perm, dim=1)  # cond pos u is at exemplar pos inverse[u]
    assert torch.equal(scores.argmax(-1), inverse)
    assert torch.allclose(scores.max(-1).values, torch.ones(b, n), atol=1e-5)
    # Warping the exemplar image (laid out like the exemplar features) undoes the permutation.
    image = torch.rand(b, 3, h, w, generator=g)
    ex_image = gather(image).view(b, 3, h, w)
    warped = soft_warp(soft_weights(scores, 100.0), ex_image, (h, w))
    assert torch.allclose(warped, image, atol=1e-4)
    # ... and the cycle (softmax over condition positions, Eq. 12) brings it back to the exemplar.
    back = soft_warp(soft_weights(scores.transpose(1, 2), 100.0), warped, (h, w))
    assert torch.allclose(back, ex_image, atol=1e-4)


# ---- loss switches ----------------------------------------------------------------------------
@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_loss_switch_off_removes_the_term(switch, data32):
    ds, batch = data32
    key = SWITCHES[switch][0]
    model = build(ds, 32, **dict(ALL_ON, **{switch: 0.0}))
    out = model.train_step(batch, 0)
    assert key not in out
    others = {k for s, (k, _, _) in SWITCHES.items() if s != switch}
    assert others <= set(out), f"missing {others - set(out)}"
    assert all(math.isfinite(v) for v in out.values())


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_loss_switch_alone_reaches_exactly_its_networks(switch, data32):
    ds, batch = data32
    key, reaches, spares = SWITCHES[switch]
    model = build(ds, 32, **dict(only(switch), maskmix=True, self_ref_probability=1.0))
    losses, _ = model.generator_losses(model._pseudo_pairs(batch))
    assert set(losses) == {key}
    losses[key].backward()
    for prefix in reaches:
        assert grad_norm(model, prefix) > 0, f"{key} gives no gradient to {prefix}"
    for prefix in spares:
        assert grad_norm(model, prefix) == 0, f"{key} reaches {prefix}"


def test_switched_off_terms_are_not_computed(data32):
    ds, batch = data32
    calls = []
    for lam in (0.0, 10.0):
        model = build(ds, 32, lambda_domain=lam, lambda_cycle=0.0)
        n = [0]
        model.netCorr.adaptor_img.register_forward_hook(lambda *a, n=n: n.__setitem__(0, n[0] + 1))
        _, out = model.generator_losses(model._pseudo_pairs(batch))
        calls.append(n[0])
        assert "warp_cycle" not in out  # L_reg off: no backward softmax, no cycle warp
    assert calls == [1, 2]  # L_domain runs the image adaptor on the photo as well
    # With every VGG term off the VGG is never built (and not in the provenance).
    model = build(ds, 32, lambda_feat_vgg=0.0, lambda_perc=0.0, lambda_context=0.0)
    assert model.vgg is None and not model.provenance
    # The Caffe VGG is the default; one build covers torchvision's (slower: it also initialises
    # its 120M-parameter classifier).
    assert set(build(ds, 32, vgg="torchvision").provenance) == {"vgg19_torchvision"}


def test_gradients_reach_every_trainable_parameter(data32):
    ds, batch = data32
    model = build(ds, 32, **ALL_ON, self_ref_probability=0.5)
    # The attention gain starts at 0 (official), which zeroes the gradient of the attention convs
    # until the first update moves it; give it the value one step would.
    with torch.no_grad():
        for attn in [model.netG.attn] + [net.attn for net in model.netD.nets]:
            attn.gamma.fill_(1e-2)
    pseudo = model._pseudo_pairs(batch)
    assert 0 < float(pseudo["self_ref"].sum()) < 2, "want one pseudo pair and one real exemplar"
    losses, out = model.generator_losses(pseudo)
    assert {"G_feat", "G_perc", "G_context", "G_domain", "G_reg", "G_mask", "G_warp_self", "G_gan",
            "G_gan_feat"} <= set(losses)
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters()
               if not n.startswith("netD.") and (p.grad is None or float(p.grad.abs().sum()) == 0)]
    assert not missing, f"no generator-side gradient: {missing}"
    model.zero_grad(set_to_none=True)
    # The logit bias's hinge gradient is (share of fakes above -1) - (share of reals below 1): exactly
    # 0 while every logit is inside the margins, as at init. Shift the logits so they are not.
    with torch.no_grad():
        for net in model.netD.nets:
            net.layers[-1][0].bias.fill_(1.5)
    pred_fake, pred_real = model._discriminate(pseudo["cond"], out["fake"].detach(), pseudo["image"])
    from methods.common.losses import hinge_d_loss
    hinge_d_loss(pred_real, pred_fake).backward()
    missing = [n for n, p in model.netD.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]
    assert not missing, f"no discriminator gradient: {missing}"


# ---- training and generation ------------------------------------------------------------------
def test_train_steps_on_embedded_64(data64):
    ds, batches = data64
    model = build(ds, 64, maskmix=True, lambda_cycle=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step, batch in enumerate(batches):
        out = model.train_step(batch, step)
        assert all(math.isfinite(v) for v in out.values()), out
        assert {"G_total", "D_total", "G_feat", "G_perc", "G_context", "G_domain", "G_reg"} <= set(out)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("netCorr.") for n in moved) and any(n.startswith("netG.") for n in moved)
    assert any(n.startswith("netD.") for n in moved)


def test_checkpoint_round_trip_continues_identically(data32):
    ds, batch = data32
    a = build(ds, 32, seed=3)
    a.train_step(batch, 0)
    state = a.training_state()
    b = build(ds, 32, seed=4)
    b.load_training_state(state)
    ra, rb = a.train_step(batch, 1), b.train_step(batch, 1)
    assert ra == rb


@pytest.mark.parametrize("res,opts,level", [(64, {}, "16"), (32, {"warp_down": 2}, "16"), (32, {"warp_patch": True}, "32"),
                                            (32, {"warp_bilinear": True, "adaptor_kernel": 4, "maskmix": True}, "8")])
def test_generate_shapes(res, opts, level, data32, data64):
    ds, batch = data64[0], data64[1][0]
    if res == 32:
        ds, batch = data32
    model = build(ds, res, **opts)
    batch = {k: batch[k] for k in ("cond", "exemplar", "exemplar_cond")}  # no photo at test time
    out = model.generate(batch)
    b = batch["cond"].shape[0]
    assert out.output.shape == (b, 3, res, res)
    assert float(out.output.abs().max()) <= 1.0
    assert list(out.warps) == [level]
    warp = out.warps[level]
    assert warp.shape == (b, 3, int(level), int(level))
    assert float(warp.min()) >= -1.0 - 1e-5 and float(warp.max()) <= 1.0 + 1e-5  # convex mixes of pixels


def test_pseudo_pair_distortion_keeps_condition_and_photo_aligned(data32):
    ds, batch = data32
    g = torch.Generator().manual_seed(0)
    ident = random_grids(2, 32, g, crop_min=1.0, elastic=0.0, flip=False)
    assert torch.allclose(distort(ident, batch["image"], "bilinear"), batch["image"], atol=1e-5)
    grid = random_grids(2, 32, g, crop_min=0.8, elastic=0.05)
    cond = distort(grid, batch["cond"], "nearest")
    assert torch.equal(cond.sum(1), torch.ones(2, 32, 32))  # still one-hot
    # Each pixel's class in the distorted condition matches the colour family of the distorted photo
    # where it came from: the same grid moved both, so the label maps agree exactly.
    lab = distort(grid, batch["label"][:, None].float(), "nearest")[:, 0].long()
    assert torch.equal(cond.argmax(1), lab)


def test_recrop_is_the_official_crop_and_flip(data32):
    ds, batch = data32
    g = torch.Generator().manual_seed(0)
    ident = recrop_grids(2, 32, g, scale=1.0, flip=False)  # load size = crop size, no flip: the photo itself
    assert torch.allclose(distort(ident, batch["image"], "bilinear"), batch["image"], atol=1e-5)
    # 256/286 at 32 px: resized to 36, a 32 crop at an integer offset 0..4, so each output pixel
    # centre sits on the 36-pixel grid of the resized photo.
    grid = recrop_grids(64, 32, g, scale=256 / 286, flip=False)
    x_load = (grid[..., 0] + 1) / 2 * 36 - 0.5  # the sampled position in resized-photo pixels
    offset = x_load[:, 0, 0]
    assert torch.allclose(x_load, x_load.round(), atol=1e-4) and set(offset.round().tolist()) <= set(range(5))
    assert len(set(offset.round().tolist())) > 2  # offsets are drawn, not fixed
    flipped = recrop_grids(200, 32, g, scale=1.0, flip=True)
    share = float((flipped[:, 0, 0, 0] > 0).float().mean())  # mirrored rows start at the right edge
    assert 0.3 < share < 0.7


def test_self_reference_samples_and_video_like_pairs(data32):
    ds, batch = data32
    model = build(ds, 32, self_ref_probability=1.0, pseudo_flip=False, recrop_scale=1.0)
    pseudo = model._pseudo_pairs(batch)  # scale 1, no flip: the self-reference is the photo itself
    assert torch.equal(pseudo["self_ref"], torch.ones(2))
    assert torch.allclose(pseudo["exemplar"], batch["image"], atol=1e-5)
    assert torch.equal(pseudo["exemplar_cond"], batch["cond"])
    model = build(ds, 32, self_ref_probability=1.0, pseudo_pair="exemplar")  # --video_like: keep the pair
    pseudo = model._pseudo_pairs(batch)
    assert torch.equal(pseudo["exemplar"], batch["exemplar"]) and torch.equal(pseudo["self_ref"], torch.ones(2))


def test_official_discriminator_init_and_optimiser(data32):
    ds, batch = data32
    model = build(ds, 32)
    # Padding 1 and the attention block on model3's input: 32 -> 16 -> 8 -> 4 -> 3 -> 2 logits.
    pred_fake, _ = model._discriminate(batch["cond"], batch["image"], batch["image"])
    assert [tuple(f.shape[-2:]) for f in pred_fake[0]] == [(16, 16), (8, 8), (4, 4), (3, 3), (2, 2)]
    assert all(net.attn is not None for net in model.netD.nets) and model.netG.attn is not None
    # GPU-path init: xavier(0.02) in plain convs, torch's default (kaiming-uniform) in spectral-norm ones.
    plain = model.netG.conv_img.weight.detach()
    sn = model.netG.up_3.conv_0.weight_orig.detach()
    fan_in = sn[0].numel()
    assert float(plain.std()) < 0.02 and float(model.netG.conv_img.bias.detach().abs().max()) == 0.0
    assert float(sn.abs().max()) <= (1 / fan_in) ** 0.5 + 1e-6 and float(sn.std()) > 0.5 * (1 / (3 * fan_in)) ** 0.5
    cpu = build(ds, 32, init_sn_keep_default=False)  # the official CPU path writes xavier into them too
    assert float(cpu.netG.up_3.conv_0.weight_orig.detach().std()) < 0.3 * float(sn.std())
    # Official Adam with TTUR: G + Corr 1e-4 (eps 1e-3), D 4e-4, betas (0, 0.9).
    g, d = model.opt_g.param_groups[0], model.opt_d.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"]) == (1e-4, (0.0, 0.9), 1e-3) and (d["lr"], d["betas"], d["eps"]) == (4e-4, (0.0, 0.9), 1e-8)
    assert model.resolved["lr_g"] == 1e-4 and model.resolved["lr_d"] == 4e-4
    with pytest.raises(ValueError, match="coarsest scale shrinks to 1x1"):
        build(ds, 32, num_d=2)  # 32 -> 16 -> 8 -> 4 -> 2 -> 1: the official D cannot run there either


def test_evaluation_only_builds_no_training_networks(data32):
    ds, batch = data32
    ctx = MethodContext(data=ds.info, resolution=32, width=0.125, backbones=BackboneSettings(download=False),
                        training=False)
    model = CoCosNetMethod(CoCosNetOptions(), ctx)  # no VGG file needed: no losses are built
    assert model.netD is None and model.vgg is None and model.optimizers() == {} and not model.provenance
    assert set(k.split(".")[0] for k in model.state_dict()) == {"netCorr", "netG"}
    out = model.generate({k: batch[k] for k in ("cond", "exemplar", "exemplar_cond")})
    assert out.output.shape == (2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="evaluation only"):
        model.train_step(batch, 0)


def test_options_and_weights_errors(data32, tmp_path, monkeypatch):
    ds, _ = data32
    assert METHODS.get("cocosnet") is CoCosNetMethod and CoCosNetMethod.has_warp
    for bad in ({"norm": "layer"}, {"perc_layer": "relu3_2"}, {"match_kernel": 2}, {"warp_down": 8},
                {"pseudo_pair": "mirror"}, {"d_padding": 3}):
        with pytest.raises(ValueError):
            build(ds, 32, **bad)
    # The official Caffe VGG is never downloaded or faked: without the file and without
    # allow_untrained, construction fails and names the file.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("BENCH_WEIGHTS_DIR", raising=False)
    ctx = MethodContext(data=ds.info, resolution=32, width=0.125,
                        backbones=BackboneSettings(weights_dir=str(tmp_path), download=False))
    with pytest.raises(MissingWeightsError, match="vgg19_conv.pth"):
        CoCosNetMethod(CoCosNetOptions(num_d=1), ctx)  # the Caffe VGG is the default
    assert build(ds, 32).provenance == {"vgg19_caffe": "untrained(seed=0)"}


def test_lr_schedule_is_the_official_linear_decay(data32):
    ds, _ = data32
    model = build(ds, 32)  # total_steps 10, decay over the second half
    assert [round(model.lr_factor(s), 3) for s in (0, 4, 5, 6, 9, 10)] == [1.0, 1.0, 1.0, 0.8, 0.2, 0.0]
    model = build(ds, 32, lr_decay_start=1.0)
    assert model.lr_factor(9) == 1.0
