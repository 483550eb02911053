"""Official per-dataset recipes: valid keys and options, applied by the paper sweeps, and the
networks they configure train."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

import datasets  # noqa: F401  (registers datasets)
import methods  # noqa: F401  (registers methods)
from bench.config import _Where
from bench.sweep import _typed_options, expand, load_sweep
from datasets.base import DatasetSpec
from datasets.embedded import EmbeddedDataset
from datasets.registry import DATASETS
from methods.base import BackboneSettings, MethodContext
from methods.registry import METHODS

REPO = Path(__file__).resolve().parents[1]


def test_every_official_recipe_names_a_dataset_and_builds_options():
    checked = 0
    for name in METHODS.names():
        cls = METHODS.get(name)
        for key, overrides in cls.recipes.items():
            dname, _, variant = key.partition("-")
            dcls = DATASETS.get(dname)  # raises on an unknown dataset
            assert not variant or variant in dcls.variants, f"{name} recipe {key!r}: no variant {variant!r}"
            # dotted dataset.options.<key> entries set the trial's dataset options: real fields of its Options
            dataset_keys = {k: v for k, v in overrides.items() if k.startswith("dataset.options.")}
            for k in dataset_keys:
                assert k.split(".", 2)[2] in {f.name for f in dataclasses.fields(dcls.Options)}, (name, key, k)
            method_keys = {k: v for k, v in overrides.items() if k not in dataset_keys}
            opts = _typed_options(cls.Options, method_keys, [f"{name}.recipes", key], _Where("<recipes>"), name)
            for k, v in method_keys.items():  # every key is a real option and lands with its value
                got = getattr(opts, k)
                assert list(got) == list(v) if isinstance(v, list) else got == v, (name, key, k)
            checked += 1
    assert {"cocosnet", "midms"} <= {n for n in METHODS.names() if METHODS.get(n).recipes} and checked >= 5


def test_main_comparison_trials_get_the_official_commands():
    trials = {t.name: t for t in expand(load_sweep(REPO / "sweeps" / "main_comparison.yaml"))}
    fashion = trials["cocosnet/default/deepfashion-hd/s0"]
    assert fashion.recipe == "official:deepfashion"
    assert fashion.method_options["warp_patch"] and fashion.method_options["lambda_warp_self"] == 100.0
    assert fashion.method_options["perc_layer"] == "relu4_2" and fashion.method_options["adaptor_kernel"] == 4
    ade = trials["cocosnet/default/ade20k-full/s0"]
    assert ade.method_options["maskmix"] and ade.method_options["lambda_mask"] == 100.0
    assert ade.method_options["warp_patch"] is False
    defaults = dataclasses.asdict(METHODS.get("cocosnet").Options())
    metfaces = trials["cocosnet/default/metfaces-canny/s0"]  # no official command: the defaults
    assert metfaces.recipe == "" and metfaces.method_options == defaults
    assert all(t.recipe == "" for n, t in trials.items() if n.startswith("spade/"))


def _ctx(info, resolution):
    return MethodContext(data=info, resolution=resolution, width=0.125, seed=0, total_steps=4, beta2=0.9,
                         backbones=BackboneSettings(allow_untrained=True, download=False))


def _batch(variant, resolution, n=2):
    ds = EmbeddedDataset(DatasetSpec(name="embedded", variant=variant), "train", resolution)
    return ds.info, torch.utils.data.default_collate([ds[i] for i in range(n)])


def test_cocosnet_recipes_train():
    """Each official CoCosNet recipe (warp patches + warp-self, mask + cycle losses, ...) builds
    and takes a training step with finite losses, the recipe's own loss terms among them."""
    from methods.cocosnet.model import CoCosNetMethod, CoCosNetOptions
    from methods.cocosnet.recipes import RECIPES

    for key, variant, expect in (("deepfashion", "keypoint", "G_warp_self"), ("celebahq-mask", "mask", "G_mask"),
                                 ("celebahq-edge", "edge", "G_reg")):
        info, batch = _batch(variant, 32)
        torch.manual_seed(0)
        method_options = {k: v for k, v in RECIPES[key].items() if not k.startswith("dataset.options.")}
        # num_d 1: at 32x32 the official D (padding 1) has room for one scale only
        m = CoCosNetMethod(CoCosNetOptions(**dict(method_options, vgg="caffe", num_d=1)), _ctx(info, 32))
        losses = m.train_step(batch, 0)
        assert expect in losses and all(math.isfinite(v) for v in losses.values()), (key, losses)
        out = m.generate(batch)
        assert out.output.shape == batch["image"].shape and torch.isfinite(out.output).all()


def test_midms_lsun_recipe_trains():
    """The LSUN-Churches recipe (kl-f8 first stage, 5-level UNet, r52 perceptual) builds and runs
    both training phases and sampling at 128^2 (latent 16^2: the deepest UNet level is 1x1)."""
    from methods.midms.model import MIDMsMethod, MIDMsOptions
    from methods.midms.recipes import RECIPES

    info, batch = _batch("mask", 128)
    torch.manual_seed(0)
    m = MIDMsMethod(MIDMsOptions(**RECIPES["lsun_church"]), _ctx(info, 128))
    first, joint = m.train_step(batch, 0), m.train_step(batch, 3)  # first-stage phase, then matching + diffusion
    assert "ae_kl" in first and {"L_perc", "L_diff"} <= set(joint)
    assert all(math.isfinite(v) for v in {**first, **joint}.values())
    out = m.generate(batch)
    assert out.output.shape == batch["image"].shape and torch.isfinite(out.output).all()
