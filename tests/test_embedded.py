"""The embedded dataset: deterministic, exact ground truth, a valid correspondence, every variant."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datasets import DATASETS
from datasets.base import REQUIRED_KEYS, DatasetSpec


def make(variant="mask", split="train", res=64, **options):
    return DATASETS.get("embedded")(DatasetSpec(name="embedded", variant=variant, options=options), split, res)


@pytest.mark.parametrize("variant,channels", [("mask", 6), ("edge", 1), ("keypoint", 3)])
def test_shapes_and_ranges(variant, channels):
    ds = make(variant)
    s = ds[3]
    assert set(REQUIRED_KEYS) <= set(s) and ds.info.cond_channels == channels
    assert s["cond"].shape == (channels, 64, 64) and s["exemplar_cond"].shape == (channels, 64, 64)
    for k in ("cond_vis", "exemplar", "image", "target"):
        assert s[k].shape == (3, 64, 64) and s[k].min() >= -1 and s[k].max() <= 1, k
    assert s["label"].dtype == torch.int64 and 0 <= s["label"].min() and s["label"].max() < ds.num_classes
    if variant == "mask":  # one-hot: exactly one class per pixel, and it is the label
        assert torch.equal(s["cond"].argmax(0), s["label"]) and torch.all(s["cond"].sum(0) == 1)


def test_deterministic_and_splits_differ():
    a, b = make()[5], make()[5]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(make(split="test")[5]["image"], a["image"])
    assert not torch.equal(make(data_seed=1)[5]["image"], a["image"])


@pytest.mark.parametrize("variant", ["mask", "keypoint"])
def test_target_is_condition_layout_in_exemplar_appearance(variant):
    # Textures live in image coordinates, so wherever both scenes have the same class at the same
    # pixel, the ground truth must equal the exemplar exactly; elsewhere it follows A's layout.
    ds = make(variant)
    for i in range(8):
        s = ds[i]
        same = s["label"] == s["exemplar_label"]
        assert same.any()
        assert torch.allclose(s["target"][:, same], s["exemplar"][:, same], atol=1e-6)
        assert not torch.allclose(s["target"], s["image"])  # another appearance than A's own photo
        # the exemplar holds exactly the condition's classes, in another layout
        assert set(s["label"].unique().tolist()) == set(s["exemplar_label"].unique().tolist())


def test_true_correspondence_maps_to_the_same_class_and_warps_towards_the_target():
    ds = make("mask")
    better = 0
    for i in range(8):
        s = ds[i]
        grid = s["corr"].permute(1, 2, 0)[None]
        warped_label = F.grid_sample(s["exemplar_label"][None, None].float(), grid, mode="nearest",
                                     align_corners=False)[0, 0].long()
        assert torch.equal(warped_label, s["label"])
        warped = F.grid_sample(s["exemplar"][None], grid, mode="nearest", align_corners=False)[0]
        better += (warped - s["target"]).abs().mean() < (s["exemplar"] - s["target"]).abs().mean()
    assert better == 8


def test_resolution_is_configuration_and_bad_options_are_named():
    assert make(res=128)[0]["image"].shape == (3, 128, 128)
    with pytest.raises(ValueError, match="unknown key 'num_clases'.*did you mean 'num_classes'"):
        make(num_clases=4)
    with pytest.raises(ValueError, match="unknown variant 'edges'"):
        make("edges")
    assert len(make(split="test")) == 64 and len(DATASETS.get("embedded")(
        DatasetSpec(name="embedded", max_samples=10), "train", 64)) == 10
