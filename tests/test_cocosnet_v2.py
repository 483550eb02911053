"""CoCosNet v2: PatchMatch correctness and the official code's details (unclamped propagation,
softmax-over-3K evaluation, index truncation, GRU shapes and state), soft warp, ablation switches,
gradients, training, generate, official defaults (init, optimiser, D padding, PONO eps)."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from datasets.base import DatasetSpec  # noqa: E402
from datasets.embedded import EmbeddedDataset  # noqa: E402
from methods.base import BackboneSettings, MethodContext  # noqa: E402
from methods.cocosnet_v2 import patchmatch as pm  # noqa: E402
from methods.cocosnet_v2.model import (OFFICIAL_OPTIM, CoCosNetV2Method, CoCosNetV2Options,  # noqa: E402
                                       pseudo_exemplar, weighted_l1)
from methods.common.init import official_init  # noqa: E402
from methods.common.spade_blocks import PositionalNorm2d  # noqa: E402
from methods.common.vgg_caffe import OFFICIAL_NAMES, VGG19Features  # noqa: E402
from methods.common.weights import MissingWeightsError  # noqa: E402
from methods.registry import METHODS  # noqa: E402

UNTRAINED = BackboneSettings(allow_untrained=True, download=False)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def pyramid(f: torch.Tensor, sizes):
    """Normalised features at each size (average pooling keeps an exact shift exact when the
    shift is a multiple of the pooling factor)."""
    full = f.shape[-1]
    return [pm.normalize_pono_c(F.avg_pool2d(f, full // s) if s < full else f) for s in sizes]


def first_positions(res: pm.LevelResult) -> torch.Tensor:
    """(B, 2, H, W) (row, col) of each pixel's first (best) candidate."""
    idx = res.inds[:, 0]
    w = idx.shape[-1]
    return torch.stack([torch.div(idx, w, rounding_mode="floor"), idx % w], dim=1).float()


def hit_rate(pos: torch.Tensor, true: torch.Tensor) -> float:
    return float(((pos.round() - true).abs().sum(dim=1) == 0).float().mean())


def shift_truth(size: int, shift) -> torch.Tensor:
    g = pm.pixel_grid(size, size, "cpu", torch.float32)[:, :, 0]
    return torch.stack([(g[:, 0] - shift[0]) % size, (g[:, 1] - shift[1]) % size], dim=1)


def still_gru(net: pm.HierarchicalPatchMatch) -> pm.HierarchicalPatchMatch:
    """Official init, then a zero offset head: the GRU runs but leaves integer offsets as they are
    (an untrained GRU's fractional updates would be truncated into neighbouring indices)."""
    official_init(net, "xavier", 0.02)
    if net.refiner is not None:
        torch.nn.init.zeros_(net.refiner.flow_head.conv2.weight)
        torch.nn.init.zeros_(net.refiner.flow_head.conv2.bias)
    return net


def make_batch(variant: str, resolution: int, n: int = 2):
    ds = EmbeddedDataset(DatasetSpec(name="embedded", variant=variant), "train", resolution)
    samples = [ds[i] for i in range(n)]
    return ds.info, {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def make_method(info, resolution: int, training: bool = True, width: float = 0.125, **opts) -> CoCosNetV2Method:
    if resolution < 64:  # the official padding-1 PatchGAN's second scale needs >= 64^2 (1x1 before IN below)
        opts.setdefault("num_d", 1)
    torch.manual_seed(0)
    random.seed(0)
    ctx = MethodContext(data=info, resolution=resolution, width=width, backbones=UNTRAINED, training=training)
    return CoCosNetV2Method(CoCosNetV2Options(**opts), ctx)


# ---------------------------------------------------------------------------------------------
# PatchMatch correctness
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("refinement", ["propagation", "propagation+gru"])
@pytest.mark.parametrize("refine_grad", ["official_nograd", "differentiable"])
def test_hierarchy_recovers_known_shift(refinement, refine_grad):
    torch.manual_seed(1)
    size, shift = 32, (8, -4)  # multiples of 4, so every level sees an exact shift
    fy_full = torch.randn(1, 16, size, size)
    fx_full = torch.roll(fy_full, shifts=shift, dims=(2, 3))  # fx(p) = fy(p - shift)
    sizes = (8, 16, 32)
    net = still_gru(pm.HierarchicalPatchMatch(16, refinement=refinement, refine_grad=refine_grad, iterations=5))
    net.order_source = random.Random(0).random
    res = net(pyramid(fx_full, sizes), pyramid(fy_full, sizes), torch.rand(1, 3, size, size))
    for r in res:
        assert hit_rate(first_positions(r), shift_truth(r.size, (shift[0] * r.size // size,
                                                                  shift[1] * r.size // size))) >= 0.95


def test_hierarchy_recovers_block_permutation():
    torch.manual_seed(2)
    size, block = 32, 8
    fy_full = torch.randn(1, 16, size, size)
    nb = size // block
    perm = torch.randperm(nb * nb)
    fx_full = torch.empty_like(fy_full)
    true = torch.empty(1, 2, size, size)
    for dst, src in enumerate(perm.tolist()):
        dr, dc, sr, sc = dst // nb, dst % nb, src // nb, src % nb
        fx_full[..., dr * block:(dr + 1) * block, dc * block:(dc + 1) * block] = \
            fy_full[..., sr * block:(sr + 1) * block, sc * block:(sc + 1) * block]
        rr, cc = torch.meshgrid(torch.arange(block), torch.arange(block), indexing="ij")
        true[0, 0, dr * block:(dr + 1) * block, dc * block:(dc + 1) * block] = sr * block + rr
        true[0, 1, dr * block:(dr + 1) * block, dc * block:(dc + 1) * block] = sc * block + cc
    sizes = (8, 16, 32)
    net = still_gru(pm.HierarchicalPatchMatch(16, refinement="propagation+gru", iterations=5))
    net.order_source = random.Random(0).random
    res = net(pyramid(fx_full, sizes), pyramid(fy_full, sizes), torch.rand(1, 3, size, size))
    assert hit_rate(first_positions(res[-1]), true) >= 0.95


def corrupted_offsets(size: int, shift, frac: float, k: int, seed: int):
    """All K candidates at the truth, except a random ``frac`` of pixels whose K candidates are
    all wrong (random positions far from the truth); as offsets (1, 2, K, H, W)."""
    g = torch.Generator().manual_seed(seed)
    true = shift_truth(size, shift)
    init = true.unsqueeze(2).repeat(1, 1, k, 1, 1)
    bad = torch.rand(1, 1, 1, size, size, generator=g) < frac
    wrong = (true.unsqueeze(2) + torch.randint(5, size - 5, (1, 2, k, size, size), generator=g)) % size
    pos = torch.where(bad, wrong, init)
    return pos - pm.pixel_grid(size, size, "cpu", torch.float32), true, float(bad.float().mean())


def test_propagation_repairs_corrupted_field_and_gru_only_does_not():
    torch.manual_seed(3)
    size, shift = 32, (5, 9)
    fy = pm.normalize_pono_c(torch.randn(1, 16, size, size))
    fx = torch.roll(fy, shifts=shift, dims=(2, 3))
    init, true, bad = corrupted_offsets(size, shift, 0.3, 16, seed=0)
    first = lambda off: (off[:, :, 0] + pm.pixel_grid(size, size, "cpu", torch.float32)[:, :, 0])  # noqa: E731
    assert hit_rate(first(init), true) < 0.8  # the start really is broken
    img = torch.rand(1, 3, size, size)
    prop = pm.HierarchicalPatchMatch(16, refinement="propagation", iterations=5)
    prop.order_source = random.Random(0).random
    assert hit_rate(first_positions(prop.patchmatch_level(fx, fy, img, init)), true) >= 0.95
    gru_only = still_gru(pm.HierarchicalPatchMatch(16, refinement="gru", iterations=5))
    # without propagation nothing brings the neighbours' good offsets to the broken pixels
    assert hit_rate(first_positions(gru_only.patchmatch_level(fx, fy, img, init)), true) <= 1 - bad / 2


def test_initial_offsets_official_window_not_clamped():
    seed = torch.tensor([[[3, 0], [0, 0]]])  # (1, 2, 2): coarse pixel (0, 0) matches (1, 1), offset (1, 1)
    off = pm.initial_offsets(seed, window=4, dilation=2, centering=1, dtype=torch.float64)
    assert off.shape == (1, 2, 16, 4, 4)
    d = [-2, 0, 2, 4]
    want = {(2 + a, 2 + b) for a in d for b in d}  # 2 o + d, some beyond the 4x4 map: not clamped here
    for r in (0, 1):
        for c in (0, 1):  # nearest x2: the four fine pixels of coarse (0, 0) share its offsets
            got = {(int(x), int(y)) for x, y in zip(off[0, 0, :, r, c].tolist(), off[0, 1, :, r, c].tolist())}
            assert got == want
    # rows vary slowest (official dx = arange(window) repeated along the second axis)
    assert off[0, 0, :4, 0, 0].tolist() == [0.0] * 4 and off[0, 1, :4, 0, 0].tolist() == [0.0, 2.0, 4.0, 6.0]


def test_propagation_uses_unclamped_neighbour_offsets():
    """Official: a neighbour's raw offset is applied at the pixel and only then clamped. Clamping
    the neighbour's position first would give another candidate (0.9-1.8 % of official best
    matches at 128/256 differ that way)."""
    off = torch.zeros(1, 2, 1, 1, 4)
    off[0, 1, 0, 0, 1] = 5.0  # pixel (0, 1) points 5 columns right (col 6, clamped to 3 when read)
    cand = pm.propagate(off, "horizontal")  # (1, 2, 3, 1, 4): (left, own, right) neighbour offsets
    idx = pm.official_indices(cand)
    assert idx[0, 2, 0, 0] == 3  # pixel 0 takes its right neighbour's +5: col 0 + 5 -> clamped 3
    clamp_first = 3 - 1 + 0  # (neighbour's clamped position 3) - neighbour 1 + pixel 0
    assert clamp_first != int(idx[0, 2, 0, 0])
    assert cand[0, 1, 0, 0, 0] == 0 and idx[0, 0, 0, 0] == 0  # beyond the border: offset 0


def test_official_indices_truncate_with_row_leak():
    off = torch.tensor([3.7, 5.2]).view(1, 2, 1, 1, 1) - torch.zeros(1, 2, 1, 1, 1)
    # at pixel (0, 0) of a 10x10 map: long(3.7 * 10 + 5.2) = 42 -> row 4, col 2 (the fraction leaks)
    big = torch.zeros(1, 2, 1, 10, 10)
    big[..., 0, 0] = off[..., 0, 0]
    idx = pm.official_indices(big)
    assert int(idx[0, 0, 0, 0]) == 42
    assert pm.index_offsets(idx, torch.float32)[0, :, 0, 0, 0].tolist() == [4.0, 2.0]


def test_evaluate_softmax_over_all_candidates_keeps_best_k():
    torch.manual_seed(4)
    fx = pm.normalize_pono_c(torch.randn(1, 8, 6, 6, dtype=torch.float64))
    fy = pm.normalize_pono_c(torch.randn(1, 8, 6, 6, dtype=torch.float64))
    net = pm.HierarchicalPatchMatch(8, k_window=2, refinement="propagation", temperature=0.05)
    cand = torch.randint(-3, 4, (1, 2, 12, 6, 6)).double()
    reader = pm.IndexedReader(fx, fy, 0.05)
    kept, score = net._evaluate(reader, cand)
    idx = pm.official_indices(cand)  # (1, 12, 6, 6)
    dots = torch.einsum("bchw,bckhw->bkhw", fx, fy.flatten(2)[:, :, idx[0]].view(1, 8, 12, 6, 6))
    prob = F.softmax(dots / 0.05, dim=1)
    top, which = prob.topk(4, dim=1)
    assert torch.allclose(score, top)  # softmax over all 12, top 4 (not a softmax over the kept 4)
    assert torch.equal(pm.official_indices(kept), torch.gather(idx, 1, which))
    assert float(score.sum(dim=1).max()) < 1.0


# ---------------------------------------------------------------------------------------------
# Soft warp (Eq. 8)
# ---------------------------------------------------------------------------------------------
def test_indexed_warp_one_hot_equals_hard_gather_and_bilinear_agrees_at_integers():
    torch.manual_seed(5)
    b, k, h, w = 2, 5, 6, 7
    image = torch.randn(b, 3, h, w)
    feat = torch.randn(b, 4, h, w)
    idx = torch.randint(0, h * w, (b, k, h, w))
    chosen = torch.randint(0, k, (b, h, w))
    weights = F.one_hot(chosen, k).float().flatten(1, 2)  # (B, HW, K)
    reader = pm.IndexedReader(feat, feat, 1.0)
    out = reader.warp(image, reader.flat(idx), weights)
    for bi in range(b):
        for y in range(h):
            for x in range(w):
                i = int(idx[bi, chosen[bi, y, x], y, x])
                assert torch.allclose(out[bi, :, y, x], image[bi, :, i // w, i % w], atol=1e-6)
    pos = torch.stack([torch.div(idx, w, rounding_mode="floor"), idx % w], dim=1).float()
    bil = pm.BilinearReader(feat, feat, 1.0).warp(image, pos, weights)
    assert torch.allclose(bil, out, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Ablation switches, checked by instrumentation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("refinement,expect", [
    ("propagation", {"propagate": True, "gru": False, "conv": False}),
    ("gru", {"propagate": False, "gru": True, "conv": False}),
    ("propagation+conv", {"propagate": True, "gru": False, "conv": True}),
    ("propagation+gru", {"propagate": True, "gru": True, "conv": False}),
])
def test_refinement_switch_changes_what_runs(monkeypatch, refinement, expect):
    calls = {"propagate": 0, "gru": 0, "conv": 0}

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(pm, "propagate", spy("propagate", pm.propagate))
    monkeypatch.setattr(pm.SepConvGRU, "forward", spy("gru", pm.SepConvGRU.forward))
    monkeypatch.setattr(pm.ConvBlock, "forward", spy("conv", pm.ConvBlock.forward))
    info, batch = make_batch("mask", 32)
    m = make_method(info, 32, refinement=refinement, iterations=2)
    m.generate(batch)
    assert {k: v > 0 for k, v in calls.items()} == expect
    if expect["gru"] or expect["conv"]:  # once per iteration per PatchMatch level (3 at 32^2)
        assert calls["gru"] + calls["conv"] == 2 * 3


@pytest.mark.parametrize("levels", [(8,), (8, 4), (8, 4, 2), (8, 4, 2, 1)])
def test_levels_switch_changes_levels_matched(monkeypatch, levels):
    seen = []
    orig = pm.HierarchicalPatchMatch.patchmatch_level

    def spy(self, fx, *a, **k):
        seen.append(fx.shape[-1])
        return orig(self, fx, *a, **k)

    monkeypatch.setattr(pm.HierarchicalPatchMatch, "patchmatch_level", spy)
    info, batch = make_batch("mask", 64)
    m = make_method(info, 64, levels=levels, iterations=1)
    out = m.generate(batch)
    sizes = [64 // f for f in levels]
    assert seen == sizes[1:]  # the coarsest is dense, every finer level runs PatchMatch
    assert m.pm.stats["dense"] == 1
    assert list(out.warps) == [str(s) for s in sizes]


def test_invalid_options_rejected():
    info, _ = make_batch("mask", 32)
    for bad in [(8, 2), (4, 8), (3,), (16,)]:  # gap, wrong order, not a power of 2, below 4x4
        with pytest.raises(ValueError):
            make_method(info, 32, levels=bad)
    for opt, value in (("refinement", "random_search"), ("refine_grad", "sometimes"), ("gru_score", "l2"),
                       ("gru_hidden_init", "ones"), ("self_ref_reduction", "sum")):
        with pytest.raises(ValueError, match=opt):
            make_method(info, 32, **{opt: value})


def test_propagation_order_comes_from_the_order_source():
    """One draw per iteration and level with propagation (python's random by default, like the
    official ``random.random()``); < 0.5: horizontal first."""
    info, batch = make_batch("mask", 32)
    m = make_method(info, 32, iterations=2)
    draws = iter([0.1, 0.9, 0.2, 0.8, 0.3, 0.7])
    m.pm.order_source = lambda: next(draws)
    m.generate(batch)
    assert next(draws, None) is None  # 2 iterations x 3 PatchMatch levels


# ---------------------------------------------------------------------------------------------
# Official defaults
# ---------------------------------------------------------------------------------------------
def test_official_widths_gru_shapes_and_hidden_state():
    """At width 1: the released ConvGRU shapes (96 input channels = 32 hidden + 64 motion, offsets
    [16 rows, 16 cols]); h_0 is initial_layer(f^x, f^y), not 0."""
    net = pm.HierarchicalPatchMatch(32)
    ref = net.refiner
    assert ref.cell.convz1.weight.shape == (32, 96, 1, 5)
    assert ref.encoder.convf1.weight.shape == (64, 32, 7, 7) and ref.encoder.convc1.weight.shape == (64, 16, 1, 1)
    assert ref.flow_head.conv2.weight.shape == (32, 64, 3, 3)
    fx = pm.normalize_pono_c(torch.randn(1, 32, 8, 8))
    h0, feats = ref.start(fx, fx)
    assert torch.equal(h0, feats) and feats.abs().sum() > 0
    paper = pm.HierarchicalPatchMatch(32, hidden_init="zero").refiner
    assert paper.cell.convz1.weight.shape[1] == 128 and paper.start(fx, fx)[0].abs().sum() == 0


def test_official_defaults_of_the_method():
    o = CoCosNetV2Options()
    assert (o.refine_grad, o.gru_score, o.gru_hidden_init, o.self_ref_reduction) == (
        "official_nograd", "softmax", "features", "official")
    info, _ = make_batch("mask", 64)
    m = make_method(info, 64)
    # PONO with eps 1e-8 in every positional norm (encoders and generator)
    eps = {mod.eps for mod in m.modules() if isinstance(mod, PositionalNorm2d)}
    assert eps == {1e-8}
    # discriminator: padding 1 (logit maps 6x6 and 2x2 at 64^2), no attention
    x = torch.randn(1, info.cond_channels + 3, 64, 64)
    assert [s[-1].shape[-1] for s in m.netD(x)] == [6, 2]
    # encoder convs before an instance norm carry no bias (official get_nonspade_norm_layer)
    assert m.enc_a.layer1[0].bias is None
    # official init: xavier(0.02) on plain convs; spectral-norm convs keep torch's default
    assert float(m.theta[0].weight.detach().std()) < 0.05 and float(m.enc_a.layer1[0].weight_orig.detach().std()) > 0.05


def test_official_optimiser_and_sweep_override():
    info, _ = make_batch("mask", 32)
    m = make_method(info, 32, iterations=1)
    g, d = m.optimizers()["g"], m.optimizers()["d"]
    assert g.defaults["lr"] == 5e-5 and d.defaults["lr"] == 2e-4
    assert g.defaults["betas"] == (0.0, 0.9) == d.defaults["betas"] and g.defaults["eps"] == 1e-3
    assert m.resolved == {**OFFICIAL_OPTIM, "adam_eps_g": 1e-3}
    ctx = MethodContext(data=info, resolution=32, width=0.125, backbones=UNTRAINED, lr_g=1e-4, beta2=0.999)
    m2 = CoCosNetV2Method(CoCosNetV2Options(iterations=1), ctx)
    assert m2.opt_g.defaults["lr"] == 1e-4 and m2.opt_g.defaults["betas"] == (0.0, 0.999)
    assert m2.resolved["lr_d"] == 2e-4


def test_evaluation_only_builds_no_training_networks():
    info, batch = make_batch("mask", 32)
    m = make_method(info, 32, training=False, iterations=1, lambda_map=1.0)
    assert m.optimizers() == {} and m.vgg is None and m.netD is None and m.netR is None
    assert not any(k.startswith(("netD.", "netR.")) for k in m.state_dict())
    assert m.generate(batch).output.shape == (2, 3, 32, 32)
    # a full checkpoint (the release has latest_net_D.pth) loads; its discriminator is not used
    trained = make_method(info, 32, iterations=1)
    loaded = m.load_pretrained({k: v for k, v in trained.state_dict().items()})
    assert loaded.pop("netD") == "not built" and set(loaded.values()) == {"loaded"}


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------
def grads_after_step(m: CoCosNetV2Method, batch):
    """Gradients of every parameter at the moment each optimiser steps."""
    grads = {}
    for name, opt in m.optimizers().items():
        orig = opt.step

        def step(*a, _orig=orig, _prefix=name, **k):
            for n, p in m.named_parameters():
                if (n.startswith("netD.")) == (_prefix == "d"):
                    grads[n] = None if p.grad is None else p.grad.detach().clone()
            return _orig(*a, **k)

        opt.step = step
    losses = m.train_step(batch, 0)
    return grads, losses


def test_gradients_reach_every_parameter_differentiable():
    info, batch = make_batch("mask", 32)
    # every loss on (incl. L_map and its R network); half the samples use the dataset exemplar
    m = make_method(info, 32, lambda_map=1.0, real_reference_probability=0.5, iterations=2,
                    refine_grad="differentiable")
    grads, _ = grads_after_step(m, batch)
    assert len(grads) == sum(1 for _ in m.parameters())
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0]
    # At the official init every logit is ~0, inside both hinge margins: the D logit bias's
    # gradient, frac(fake > -1) - frac(real < 1), is exactly 0.
    assert [n for n in missing if not n.endswith(".layers.4.0.bias")] == []
    assert any(n.startswith("pm.refiner.cell.convz") for n in grads)  # the GRU is among them


def test_official_nograd_gives_the_gru_no_gradient():
    info, batch = make_batch("mask", 32)
    m = make_method(info, 32, iterations=2)  # the default: the official code's gradients
    grads, _ = grads_after_step(m, batch)
    refiner = {n: g for n, g in grads.items() if n.startswith("pm.refiner.")}
    assert refiner and all(g is None or g.abs().sum() == 0 for g in refiner.values())
    others = [n for n, g in grads.items() if not n.startswith("pm.refiner.") and (g is None or g.abs().sum() == 0)
              and not n.endswith(".layers.4.0.bias")]  # exactly 0 at init (see above)
    assert others == []  # the features still learn through the matching scores


def test_grad_checkpoint_gives_identical_values_and_gradients():
    torch.manual_seed(6)
    sizes = (4, 8, 16)
    fxs0 = [pm.normalize_pono_c(torch.randn(2, 8, s, s)) for s in sizes]
    fys0 = [pm.normalize_pono_c(torch.randn(2, 8, s, s)) for s in sizes]
    img = torch.rand(2, 3, 16, 16)
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(7)
        net = pm.HierarchicalPatchMatch(8, iterations=3, hidden=8, motion_ch=40, grad_checkpoint=ckpt,
                                        refine_grad="differentiable", gru_score="cosine")
        net.order_source = random.Random(8).random  # same propagation orders
        fxs = [f.clone().requires_grad_() for f in fxs0]
        fys = [f.clone().requires_grad_() for f in fys0]
        res = net(fxs, fys, img)
        (sum((r.warp * torch.linspace(-1, 1, r.warp.numel()).view_as(r.warp)).sum() for r in res)).backward()
        runs.append(([r.warp.detach() for r in res], [f.grad for f in fxs + fys],
                     {n: p.grad for n, p in net.named_parameters()}))
    (w0, g0, p0), (w1, g1, p1) = runs
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(w0, w1))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g0, g1))
    assert p0.keys() == p1.keys() and all(p0[n] is not None and torch.allclose(p0[n], p1[n], atol=1e-5)
                                          for n in p0)


# ---------------------------------------------------------------------------------------------
# Training and generation
# ---------------------------------------------------------------------------------------------
def test_registered():
    assert METHODS.get("cocosnet_v2") is CoCosNetV2Method


def test_train_steps_on_embedded_give_finite_losses():
    info, batch = make_batch("keypoint", 32, n=2)
    m = make_method(info, 32, iterations=2)
    for step in range(3):
        losses = m.train_step(batch, step)
        assert losses and all(math.isfinite(v) for v in losses.values()), losses
    for key in ("G_align", "G_corr", "G_warp_cycle", "G_gan", "G_gan_feat", "G_fm", "G_perc",
                "G_contextual", "D_fake", "D_real", "D_total"):
        assert key in losses


@pytest.mark.parametrize("opts", [{"refine_grad": "differentiable", "gru_hidden_init": "zero", "gru_score": "cosine"},
                                  {"refinement": "propagation+conv"}, {"refinement": "gru"}])
def test_paper_and_ablation_variants_train(opts):
    info, batch = make_batch("mask", 32)
    m = make_method(info, 32, iterations=1, **opts)
    losses = m.train_step(batch, 0)
    assert all(math.isfinite(v) for v in losses.values()), losses


def test_loss_switches_remove_terms():
    info, batch = make_batch("mask", 32)
    m = make_method(info, 32, iterations=1, lambda_corr=0.0, lambda_warp_cycle=0.0, lambda_perc=0.0,
                    lambda_vgg=0.0, lambda_gan=0.0, lambda_align=10.0)
    assert m.vgg is None and m.netD is None and m.netR is None
    losses = m.train_step(batch, 0)
    assert set(k for k in losses if k.startswith("G_") and k != "G_total") == {"G_align"}


def test_generate_returns_output_and_level_warps():
    info, batch = make_batch("edge", 64)
    m = make_method(info, 64, iterations=1)
    out = m.generate(batch)
    assert out.output.shape == (2, 3, 64, 64)
    assert float(out.output.abs().max()) <= 1.0
    assert list(out.warps) == ["8", "16", "32", "64"]
    for key, w in out.warps.items():
        assert w.shape == (2, 3, int(key), int(key))
        assert float(w.abs().max()) <= 1.0


def test_self_reference_weighting():
    x, y = torch.zeros(4, 3, 2, 2), torch.ones(4, 3, 2, 2)
    y[1] = 3.0  # sample 1 is not a self-reference: its error must not count
    self_ref = torch.tensor([1.0, 0.0, 1.0, 1.0])
    w = self_ref / (self_ref.sum() + 1e-5)
    assert torch.allclose(weighted_l1(x, y, w, official=False), torch.tensor(1.0), atol=1e-4)
    # official util.weighted_l1_loss (the default): mean(|x - y| * w) = the weighted mean / batch size
    official = ((x - y).abs() * w.view(-1, 1, 1, 1)).mean()
    assert torch.equal(weighted_l1(x, y, w), official)


def test_pseudo_exemplar_is_identity_without_distortion():
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    cond = torch.rand(2, 4, 16, 16)
    p_img, p_cond = pseudo_exemplar(img, cond, flip=False, crop=0.0, jitter=0.0)
    assert torch.allclose(p_img, img, atol=1e-5) and torch.allclose(p_cond, cond, atol=1e-5)
    p_img, _ = pseudo_exemplar(img, cond, flip=True, crop=0.2, jitter=0.05)
    assert p_img.shape == img.shape and not torch.allclose(p_img, img, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The VGG of the losses (methods/common/vgg_caffe.py; its loader is tested in test_vgg_caffe.py)
# ---------------------------------------------------------------------------------------------
def test_loss_vgg_is_the_shared_caffe_vgg_under_official_names(offline_weights, tmp_path, monkeypatch):
    info, _ = make_batch("mask", 32)
    m = make_method(info, 32, iterations=1)
    assert isinstance(m.vgg, VGG19Features) and m.vgg.backbone == "caffe"  # official default
    assert m.provenance["vgg19_loss"] == "untrained(seed=0)"
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    feats, ref = m._vgg(x, "x"), m.vgg(x)
    assert list(feats) == ["r12", "r22", "r32", "r42", "r52"]
    assert all(torch.equal(feats[k], ref[OFFICIAL_NAMES[k]]) for k in feats)
    assert not any(k.startswith("vgg.") for k in m.state_dict())  # frozen VGG stays out of checkpoints
    # vgg: caffe is never downloaded or faked: without the file and without allow_untrained,
    # construction fails and names the file.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv("BENCH_WEIGHTS_DIR", raising=False)
    ctx = MethodContext(data=info, resolution=32, width=0.125,
                        backbones=BackboneSettings(weights_dir=str(tmp_path), download=True))
    with pytest.raises(MissingWeightsError, match="vgg19_conv.pth"):
        CoCosNetV2Method(CoCosNetV2Options(iterations=1), ctx)
