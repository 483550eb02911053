"""CoCosNet v2: PatchMatch correctness, soft warp, ablation switches, gradients, training, generate."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from datasets.base import DatasetSpec  # noqa: E402
from datasets.embedded import EmbeddedDataset  # noqa: E402
from methods.base import BackboneSettings, MethodContext  # noqa: E402
from methods.cocosnet_v2 import patchmatch as pm  # noqa: E402
from methods.cocosnet_v2.model import CoCosNetV2Method, CoCosNetV2Options, pseudo_exemplar, weighted_l1  # noqa: E402
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


def best_positions(res: pm.LevelResult) -> torch.Tensor:
    """(B, 2, H, W) best candidate of a level result."""
    b, k, _, h, w = res.pos.shape
    idx = res.scores.argmax(dim=1, keepdim=True).unsqueeze(2).expand(b, 1, 2, h, w)
    return torch.gather(res.pos, 1, idx)[:, 0]


def hit_rate(pos: torch.Tensor, true: torch.Tensor) -> float:
    return float(((pos.round() - true).abs().sum(dim=1) == 0).float().mean())


def shift_truth(size: int, shift) -> torch.Tensor:
    g = pm.pixel_grid(1, size, size, "cpu")[:, 0]
    return torch.stack([(g[:, 0] - shift[0]) % size, (g[:, 1] - shift[1]) % size], dim=1)


def make_batch(variant: str, resolution: int, n: int = 2):
    ds = EmbeddedDataset(DatasetSpec(name="embedded", variant=variant), "train", resolution)
    samples = [ds[i] for i in range(n)]
    return ds.info, {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def make_method(info, resolution: int, **opts) -> CoCosNetV2Method:
    torch.manual_seed(0)
    ctx = MethodContext(data=info, resolution=resolution, width=0.125, backbones=UNTRAINED)
    return CoCosNetV2Method(CoCosNetV2Options(**opts), ctx)


# ---------------------------------------------------------------------------------------------
# PatchMatch correctness
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("refinement", ["propagation", "propagation+gru"])
def test_hierarchy_recovers_known_shift(refinement):
    torch.manual_seed(1)
    size, shift = 32, (8, -4)  # multiples of 4, so every level sees an exact shift
    fy_full = torch.randn(1, 16, size, size)
    fx_full = torch.roll(fy_full, shifts=shift, dims=(2, 3))  # fx(p) = fy(p - shift)
    sizes = (8, 16, 32)
    net = pm.HierarchicalPatchMatch(16, refinement=refinement, iterations=5)
    res = net(pyramid(fx_full, sizes), pyramid(fy_full, sizes), torch.rand(1, 3, size, size))
    for r in res:
        assert hit_rate(best_positions(r), shift_truth(r.size, (shift[0] * r.size // size,
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
    net = pm.HierarchicalPatchMatch(16, refinement="propagation+gru", iterations=5)
    res = net(pyramid(fx_full, sizes), pyramid(fy_full, sizes), torch.rand(1, 3, size, size))
    assert hit_rate(best_positions(res[-1]), true) >= 0.95


def corrupted_init(size: int, shift, frac: float, k: int, seed: int):
    """All K candidates at the truth, except a random ``frac`` of pixels whose K candidates are
    all wrong (random positions far from the truth)."""
    g = torch.Generator().manual_seed(seed)
    true = shift_truth(size, shift)
    init = true.unsqueeze(1).repeat(1, k, 1, 1, 1)
    bad = torch.rand(1, 1, 1, size, size, generator=g) < frac
    wrong = (true.unsqueeze(1) + torch.randint(5, size - 5, (1, k, 2, size, size), generator=g)) % size
    return torch.where(bad, wrong, init), true, float(bad.float().mean())


def test_propagation_repairs_corrupted_field_and_gru_only_does_not():
    torch.manual_seed(3)
    size, shift = 32, (5, 9)
    fy = pm.normalize_pono_c(torch.randn(1, 16, size, size))
    fx = torch.roll(fy, shifts=shift, dims=(2, 3))
    init, true, bad = corrupted_init(size, shift, 0.3, 16, seed=0)
    assert hit_rate(init[:, 0], true) < 0.8  # the start really is broken
    img = torch.rand(1, 3, size, size)
    prop = pm.HierarchicalPatchMatch(16, refinement="propagation", iterations=5)
    assert hit_rate(best_positions(prop.patchmatch_level(fx, fy, img, init)), true) >= 0.95
    gru_only = pm.HierarchicalPatchMatch(16, refinement="gru", iterations=5)
    from methods.cocosnet_v2.model import official_init
    official_init(gru_only, 0.02)
    # without propagation nothing brings the neighbours' good offsets to the broken pixels
    assert hit_rate(best_positions(gru_only.patchmatch_level(fx, fy, img, init)), true) <= 1 - bad / 2


def test_init_candidates_official_window():
    best = torch.tensor([[[[3.0]], [[5.0]]]])  # (1, 2, 1, 1): coarse pixel (0, 0) -> (3, 5)
    cand = pm.init_candidates(best, (2, 2), window=4, dilation=2, centering=1)
    assert cand.shape == (1, 16, 2, 2, 2)
    for dr in (0, 1):
        for dc in (0, 1):
            got = {(int(r), int(c)) for r, c in cand[0, :, :, dr, dc].tolist()}
            # fine offset 2*o + d at fine pixel p: position 2*best + delta(p) + d, d in {-2,0,2,4}
            want = {(6 + dr + a, 10 + dc + b) for a in (-2, 0, 2, 4) for b in (-2, 0, 2, 4)}
            want = {(min(max(r, 0), 1), min(max(c, 0), 1)) for r, c in want}  # clamped to 2x2
            assert got == want


def test_truncate_to_index_reproduces_official_wrap():
    pos = torch.tensor([3.7, 5.2]).view(1, 1, 2, 1, 1)
    # official: idx = long(3.7 * 10 + 5.2) = 42 -> row 4, col 2 (the fraction wraps into columns)
    out = pm.truncate_to_index(pos, 10, 10)
    assert out.view(-1).tolist() == [4.0, 2.0]


# ---------------------------------------------------------------------------------------------
# Soft warp (Eq. 8)
# ---------------------------------------------------------------------------------------------
def test_soft_warp_one_hot_equals_hard_gather():
    torch.manual_seed(4)
    b, k, h, w = 2, 5, 6, 7
    image = torch.randn(b, 3, h, w)
    pos = torch.stack([torch.randint(0, h, (b, k, h, w)), torch.randint(0, w, (b, k, h, w))], dim=2).float()
    chosen = torch.randint(0, k, (b, h, w))
    weights = F.one_hot(chosen, k).permute(0, 3, 1, 2).float()
    out = pm.soft_warp(image, pos, weights)
    for bi in range(b):
        for y in range(h):
            for x in range(w):
                r, c = pos[bi, chosen[bi, y, x], :, y, x].long().tolist()
                assert torch.allclose(out[bi, :, y, x], image[bi, :, r, c], atol=1e-6)


def test_soft_warp_averages_candidates_with_softmax_weights():
    torch.manual_seed(5)
    image = torch.randn(1, 3, 4, 4)
    pos = torch.tensor([[0.0, 0.0], [3.0, 2.0]]).view(1, 2, 2, 1, 1).expand(1, 2, 2, 4, 4)
    scores = torch.tensor([0.2, 0.5]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    wts = F.softmax(scores / 0.1, dim=1)
    out = pm.soft_warp(image, pos, wts)
    expect = wts[0, 0, 0, 0] * image[0, :, 0, 0] + wts[0, 1, 0, 0] * image[0, :, 3, 2]
    assert torch.allclose(out[0, :, 2, 1], expect, atol=1e-6)


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


def test_invalid_levels_rejected():
    info, _ = make_batch("mask", 32)
    for bad in [(8, 2), (4, 8), (3,), (16,)]:  # gap, wrong order, not a power of 2, below 4x4
        with pytest.raises(ValueError):
            make_method(info, 32, levels=bad)
    with pytest.raises(ValueError):
        make_method(info, 32, refinement="random_search")


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
    m = make_method(info, 32, lambda_map=1.0, real_reference_probability=0.5, iterations=2)
    grads, _ = grads_after_step(m, batch)
    assert len(grads) == sum(1 for _ in m.parameters())
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0]
    assert missing == []
    assert any(n.startswith("pm.refiner.cell.convz") for n in grads)  # the GRU is among them


def test_official_nograd_gives_the_gru_no_gradient():
    info, batch = make_batch("mask", 32)
    m = make_method(info, 32, refine_grad="official_nograd", iterations=2)
    grads, _ = grads_after_step(m, batch)
    refiner = {n: g for n, g in grads.items() if n.startswith("pm.refiner.")}
    assert refiner and all(g is None or g.abs().sum() == 0 for g in refiner.values())
    others = [n for n, g in grads.items() if not n.startswith("pm.refiner.") and (g is None or g.abs().sum() == 0)]
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
        net = pm.HierarchicalPatchMatch(8, iterations=3, hidden=8, motion_ch=40, grad_checkpoint=ckpt)
        fxs = [f.clone().requires_grad_() for f in fxs0]
        fys = [f.clone().requires_grad_() for f in fys0]
        torch.manual_seed(8)  # same propagation orders
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
                "G_contextual", "D_total"):
        assert key in losses


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
    assert torch.allclose(weighted_l1(x, y, w), torch.tensor(1.0), atol=1e-4)
    # official util.weighted_l1_loss: mean(|x - y| * w) = the weighted mean / batch size
    official = ((x - y).abs() * w.view(-1, 1, 1, 1)).mean()
    assert torch.allclose(weighted_l1(x, y, w, official=True), official, atol=1e-6)


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
    feats, ref = m._vgg(x), m.vgg(x)
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
