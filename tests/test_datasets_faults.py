"""Tiny on-disk layouts with deliberate faults: every error names the file (and the list line), and
``skip_bad`` skips the sample and records it instead. No real data needed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets  # noqa: F401
from datasets._io import BadSampleError, DatasetError, MissingRootError
from datasets.base import DatasetSpec
from datasets.registry import DATASETS

R = 32


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_CACHE", str(tmp_path / "cache"))


def load(name, root, split="test", **kw):
    options = kw.pop("options", {})
    return DATASETS.get(name)(DatasetSpec(name=name, root=str(root), options=options, **kw), split, resolution=R)


def rgb(path: Path, size=(24, 24), value=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) if value is None else np.full((size[1], size[0], 3), value, np.uint8)
    Image.fromarray(arr).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)
    return path


def label(path: Path, size=(24, 24), values=(0, 1, 2)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.resize(np.asarray(values, np.uint8), size[0] * size[1]).reshape(size[1], size[0])
    Image.fromarray(arr, mode="L").save(path)
    return path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


# ---- ADE20K ---------------------------------------------------------------------------------
def ade_layout(root: Path, n: int = 3) -> Path:
    for split, tag in (("training", "train"), ("validation", "val")):
        for i in range(1, n + 1):
            rgb(root / "images" / split / f"ADE_{tag}_{i:08d}.jpg")
            label(root / "annotations" / split / f"ADE_{tag}_{i:08d}.png", values=(0, 5, 150))
    (root / "data").mkdir()
    (root / "data/ade20k_ref_test.txt").write_text(
        "".join(f"ADE_val_{i:08d}.jpg,ADE_train_{i:08d}.jpg\n" for i in range(1, n + 1)))
    return root


def test_missing_root_names_it(tmp_path):
    for name in ("deepfashion", "metfaces", "celebahq", "ade20k", "lsun_church"):
        with pytest.raises(MissingRootError, match=str(tmp_path / "nope")):
            load(name, tmp_path / "nope")
    with pytest.raises(MissingRootError, match="needs a root folder"):
        DATASETS.get("ade20k")(DatasetSpec(name="ade20k"), "test", resolution=R)


def test_root_without_a_known_layout(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(MissingRootError, match="has no ADE20K layout"):
        load("ade20k", tmp_path)


def test_ade_good_layout_loads(tmp_path):
    ds = load("ade20k", ade_layout(tmp_path))
    assert len(ds) == 3 and not ds.skipped
    assert int(ds[0]["label"].max()) == 150 and ds[0]["cond"].shape == (151, R, R)


def test_label_out_of_range_names_file(tmp_path):
    root = ade_layout(tmp_path)
    bad = label(root / "annotations/validation/ADE_val_00000002.png", values=(0, 151, 200))
    with pytest.raises(BadSampleError, match=r"ADE_val_00000002\.png: label value\(s\) \[151, 200\] out of range"):
        load("ade20k", root, options={"validate": "full"})
    ds = load("ade20k", root, skip_bad=True)
    assert [Path(f).name for f, _ in ds.skipped] == [bad.name] and len(ds) == 2
    assert ds.info.params["skipped"].startswith("1: ADE_val_00000002.png: label value")
    # header-only validation finds it when the sample is read
    lazy = load("ade20k", root)
    with pytest.raises(BadSampleError, match="out of range"):
        lazy[1]


def test_size_mismatch_names_both_files(tmp_path):
    root = ade_layout(tmp_path)
    label(root / "annotations/validation/ADE_val_00000003.png", size=(12, 24))
    with pytest.raises(BadSampleError, match=r"ADE_val_00000003\.png: size 12x24 does not match its image .*ADE_val_00000003\.jpg"):
        load("ade20k", root)


def test_corrupt_and_fake_images(tmp_path):
    root = ade_layout(tmp_path)
    truncate(root / "images/validation/ADE_val_00000001.jpg")
    (root / "images/validation/ADE_val_00000002.jpg").write_text("not an image")
    with pytest.raises(BadSampleError, match=r"ADE_val_00000001\.jpg: corrupt or truncated image"):
        load("ade20k", root, options={"validate": "full"})
    ds = load("ade20k", root, skip_bad=True)
    reasons = dict((Path(f).name, r) for f, r in ds.skipped)
    assert "corrupt or truncated" in reasons["ADE_val_00000001.jpg"]
    assert "not a readable image" in reasons["ADE_val_00000002.jpg"]
    assert len(ds) == 1


def test_missing_label_file(tmp_path):
    root = ade_layout(tmp_path)
    (root / "annotations/validation/ADE_val_00000002.png").unlink()
    with pytest.raises(BadSampleError, match=r"ADE_val_00000002\.png: file not found"):
        load("ade20k", root)


def test_ref_list_exemplar_absent_names_list_line(tmp_path):
    root = ade_layout(tmp_path)
    (root / "data/ade20k_ref_test.txt").write_text(
        "ADE_val_00000001.jpg,ADE_train_00000001.jpg\nADE_val_00000002.jpg,ADE_train_00000099.jpg\n")
    with pytest.raises(BadSampleError, match=r"ADE_train_00000099\.jpg: exemplar not found.*\[exemplar of ADE_val_00000002\.jpg\].*ade20k_ref_test\.txt line 2"):
        load("ade20k", root)
    ds = load("ade20k", root, skip_bad=True)
    assert len(ds) == 1  # val 2: bad exemplar; val 3: no entry
    assert any("line 2" in r for _, r in ds.skipped) and any("no entry" in r for _, r in ds.skipped)


def test_malformed_ref_list_line(tmp_path):
    root = ade_layout(tmp_path)
    (root / "data/ade20k_ref_test.txt").write_text("ADE_val_00000001.jpg,ADE_train_00000001.jpg\n\nonly_a_key.jpg\n")
    with pytest.raises(DatasetError, match=r"ade20k_ref_test\.txt line 3: expected 'key,exemplar"):
        load("ade20k", root)


def test_absent_ref_list_suggests_the_options(tmp_path):
    root = ade_layout(tmp_path)
    (root / "data/ade20k_ref_test.txt").unlink()
    with pytest.raises(MissingRootError, match=r"'ade20k_ref_test\.txt' not found.*eval_ref_list.*eval_exemplars: random"):
        load("ade20k", root)


def test_no_usable_samples_is_an_error(tmp_path):
    root = ade_layout(tmp_path, n=1)
    truncate(root / "images/validation/ADE_val_00000001.jpg")
    with pytest.raises(DatasetError, match="has no usable samples"):
        load("ade20k", root, skip_bad=True)


def test_unknown_option_split_and_policy(tmp_path):
    root = ade_layout(tmp_path)
    with pytest.raises(ValueError, match="did you mean 'eval_exemplars'"):
        load("ade20k", root, options={"eval_exemplar": "random"})
    with pytest.raises(ValueError, match="unknown split"):
        load("ade20k", root, split="validation")
    with pytest.raises(ValueError, match="self_pair"):
        load("ade20k", root, options={"eval_exemplars": "self_pair"})


# ---- LSUN -----------------------------------------------------------------------------------
def test_lsun_dontcare_and_range(tmp_path):
    val = tmp_path / "validation"
    rgb(val / "aaa.jpg")
    label(val / "aaa.png", values=(0, 149, 255))
    rgb(val / "bbb.jpg")
    label(val / "bbb.png", values=(0, 150))
    ds = load("lsun_church", tmp_path, skip_bad=True, options={"eval_exemplars": "random"})
    assert [r.key for r in ds.records] == ["aaa.jpg"]
    assert "label value(s) [150] out of range (allowed 0..149, 255)" in ds.skipped[0][1]
    assert set(ds[0]["label"].unique().tolist()) == {0, 149, 150}


# ---- DeepFashion ----------------------------------------------------------------------------
CAND = "\n".join(f"{10 + 2 * i} {5 + 3 * i} 0.9 {i}" for i in range(18))
SUB = " ".join(str(i) for i in range(18)) + " 30.0 18"


def fashion_layout(root: Path, names=("01_1_front", "02_2_side")) -> Path:
    lines = []
    for n in names:
        rgb(root / f"img/WOMEN/Dresses/id_00000001/{n}.jpg", size=(64, 64))
        (root / "pose/WOMEN/Dresses/id_00000001").mkdir(parents=True, exist_ok=True)
        (root / f"pose/WOMEN/Dresses/id_00000001/{n}_candidate.txt").write_text(CAND)
        (root / f"pose/WOMEN/Dresses/id_00000001/{n}_subset.txt").write_text(SUB)
        lines.append(f"img\\WOMEN\\Dresses\\id_00000001\\{n}.jpg")
    (root / "val.txt").write_text("\r\n".join(lines) + "\r\n")
    return root


def test_deepfashion_listed_image_absent_names_list_line(tmp_path):
    root = fashion_layout(tmp_path)
    with open(root / "val.txt", "a") as fh:
        fh.write("img\\WOMEN\\Dresses\\id_00000001\\03_4_full.jpg\r\n")
    with pytest.raises(BadSampleError, match=r"03_4_full\.jpg: file not found \(listed in .*val\.txt line 3\)"):
        load("deepfashion", root, options={"eval_exemplars": "random"})


def test_deepfashion_pose_file_faults(tmp_path):
    root = fashion_layout(tmp_path, names=("01_1_front", "02_2_side", "03_3_back", "04_1_front"))
    pose = root / "pose/WOMEN/Dresses/id_00000001"
    (pose / "01_1_front_subset.txt").unlink()
    (pose / "02_2_side_subset.txt").write_text(" ".join(["40"] + [str(i) for i in range(1, 18)]) + " 30.0 18")
    (pose / "03_3_back_candidate.txt").write_text("1 2 oops 0\n")
    ds = load("deepfashion", root, skip_bad=True, options={"eval_exemplars": "random"})
    reasons = {Path(f).name: r for f, r in ds.skipped}
    assert reasons["01_1_front_subset.txt"].startswith("pose file not found") and "val.txt line 1" in reasons["01_1_front_subset.txt"]
    assert "refers to candidate 40" in reasons["02_2_side_subset.txt"]
    assert "cannot parse as numbers" in reasons["03_3_back_candidate.txt"]
    assert [r.key for r in ds.records] == ["img/WOMEN/Dresses/id_00000001/04_1_front.jpg"]


def test_deepfashion_no_person_and_self_pair(tmp_path):
    root = fashion_layout(tmp_path)
    (root / "pairs.txt").write_text("img\\WOMEN\\Dresses\\id_00000001\\01_1_front.jpg,img\\WOMEN\\Dresses\\id_00000001\\02_2_side.jpg\n")
    ds = load("deepfashion", root, skip_bad=True, options={"eval_exemplars": "self_pair", "self_pair_list": "pairs.txt"})
    assert len(ds) == 1 and "no entry in the self-pair list" in ds.skipped[0][1]
    s = ds[0]
    assert torch.equal(s["target"], s["image"]) and not torch.equal(s["exemplar"], s["image"])
    (root / "pose/WOMEN/Dresses/id_00000001/01_1_front_subset.txt").write_text("")
    with pytest.raises(BadSampleError, match="no person detected"):
        load("deepfashion", root, options={"eval_exemplars": "random"})


def test_deepfashion_bad_csv(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "fasion-resize-annotation-test.csv").write_text("name:keypoints_y:keypoints_x\nx.jpg: [1, 2]: [3, 4]\n")
    with pytest.raises(DatasetError, match=r"line 2: expected 18 y and 18 x values"):
        load("deepfashion", tmp_path, options={"eval_exemplars": "random"})


# ---- CelebA-HQ ------------------------------------------------------------------------------
def celeba_layout(root: Path) -> Path:
    for idx in (1, 2):
        rgb(root / f"CelebA-HQ-img/{idx}.jpg", size=(64, 64))
        for part in ("skin", "hair", "l_eye"):
            arr = np.zeros((32, 32, 3), np.uint8)
            arr[8:24, 8:24] = 255 if part == "skin" else 0
            arr[2:8] = 255 if part == "hair" else 0
            arr[12:14, 10:14] = 255 if part == "l_eye" else 0
            p = root / f"CelebAMask-HQ-mask-anno/0/{idx:05d}_{part}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(p)
    (root / "val.txt").write_text("1\n2\n")
    return root


def test_celebahq_list_faults(tmp_path):
    root = celeba_layout(tmp_path)
    ds = load("celebahq", root, options={"eval_exemplars": "random"})
    assert len(ds) == 2 and ds[0]["cond"].shape == (15, R, R)
    (root / "val.txt").write_text("1\nphoto_two\n")
    with pytest.raises(DatasetError, match=r"val\.txt line 2: expected a CelebA-HQ image id, got 'photo_two'"):
        load("celebahq", root, options={"eval_exemplars": "random"})
    (root / "val.txt").write_text("1\n2\n")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "CelebAMask-HQ-mask-anno/0/00002_hair.png")
    with pytest.raises(BadSampleError, match=r"00002_hair\.png: part mask size 16x16 differs"):
        load("celebahq", root, options={"eval_exemplars": "random"})
    with pytest.raises(MissingRootError, match=r"train id list 'train\.txt' not found.*train_list"):
        load("celebahq", root, split="train")


def test_celebahq_mask_label_out_of_range(tmp_path):
    root = celeba_layout(tmp_path)
    label(root / "CelebAMask-HQ-mask-anno/all_parts_except_glasses/00001.png", size=(32, 32), values=(0, 19))
    with pytest.raises(BadSampleError, match=r"00001\.png: label value\(s\) \[19\] out of range \(allowed 0\.\.18\)"):
        load("celebahq", root, variant="mask", options={"eval_exemplars": "random", "validate": "full"})


# ---- MetFaces -------------------------------------------------------------------------------
def test_metfaces_too_few_and_corrupt(tmp_path):
    rgb(tmp_path / "images/1-00.png")
    with pytest.raises(DatasetError, match="holds 1 image"):
        load("metfaces", tmp_path)
    rgb(tmp_path / "images/2-00.png")
    rgb(tmp_path / "images/3-00.png")
    truncate(tmp_path / "images/2-00.png")
    (tmp_path / "train.txt").write_text("1-00.png\n2-00.png\n")
    ds = load("metfaces", tmp_path, split="train", skip_bad=True, options={"train_list": "train.txt"})
    assert [r.key for r in ds.records] == ["1-00.png"]
    assert ds.skipped[0][0].endswith("2-00.png") and "corrupt or truncated" in ds.skipped[0][1]
    assert "train.txt line 2" in ds.skipped[0][1]


# ---- train ref lists: easy / hard entries ---------------------------------------------------
def test_train_ref_list_easy_and_hard_entries(tmp_path):
    """CoCosNet: ADE-style lists give easy = first, hard = last; DeepFashion's easy = last, hard = random."""
    root = ade_layout(tmp_path / "ade")
    (root / "data/ade20k_ref.txt").write_text(
        "".join(f"ADE_train_{i:08d}.jpg,ADE_train_{i % 3 + 1:08d}.jpg,ADE_train_{(i + 1) % 3 + 1:08d}.jpg\n"
                for i in range(1, 4)))
    for p, pick in ((0.0, 1), (1.0, 2)):
        ds = load("ade20k", root, split="train", options={"train_exemplars": "ref_list", "hard_reference_probability": p})
        for i in range(3):
            j = [(i + 1) % 3 + 1, (i + 2) % 3 + 1][pick - 1] - 1  # 1-based names in the line
            want = torch.from_numpy(ds.photo(ds.records[j]).transpose(2, 0, 1)) * 2 - 1
            assert torch.equal(ds[i]["exemplar"], want), (p, i)
        assert ds.info.params["hard_reference_probability"] == p and not ds.info.has_target
    froot = fashion_layout(tmp_path / "df", names=("01_1_front", "02_2_side", "03_3_back"))
    keys = [f"img\\WOMEN\\Dresses\\id_00000001\\{n}.jpg" for n in ("01_1_front", "02_2_side", "03_3_back")]
    (froot / "train.txt").write_text("\n".join(keys) + "\n")
    (froot / "deepfashion_ref.txt").write_text(f"{keys[0]},{keys[1]},{keys[2]}\n{keys[1]},{keys[0]}\n{keys[2]},{keys[0]}\n")
    ds = load("deepfashion", froot, split="train", options={"train_exemplars": "ref_list", "hard_reference_probability": 0.0})
    last = torch.from_numpy(ds.photo(ds.records[2]).transpose(2, 0, 1)) * 2 - 1
    assert torch.equal(ds[0]["exemplar"], last)  # the line's last entry


def test_colour_label_map_is_rejected(tmp_path):
    root = ade_layout(tmp_path)
    arr = np.zeros((24, 24, 3), np.uint8)
    arr[..., 0] = 120  # a colour-coded map: its colours are not class indices
    Image.fromarray(arr).save(root / "annotations/validation/ADE_val_00000001.png")
    with pytest.raises(BadSampleError, match=r"ADE_val_00000001\.png: label map is colour \(RGB\)"):
        load("ade20k", root, options={"validate": "full"})
