"""The five real datasets loaded from the real fixture samples (../shared/fixtures/real) through the
registry: shapes, channel counts, label ranges, exemplar lists that resolve to the named files,
recorded params. Skipped, with the reason, when the fixtures are absent.

Layouts the fixtures do not have (DeepFashion-HD padding, Pose-Transfer CSV, ADE side by side,
LSUN in the MIDMs layout) are built in tmp_path from fixture files (copied or converted there,
never into the repository).
"""
from __future__ import annotations


import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets  # noqa: F401  (registers the datasets)
from datasets.base import DatasetSpec
from datasets.registry import DATASETS

R = 64


# real_fixtures: the session fixture in conftest.py (skips with a reason when the folder is absent)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "prep-cache"))


def load(name, root, split="test", **kw):
    options = kw.pop("options", {})
    spec = DatasetSpec(name=name, root=str(root), options=options, **kw)
    return DATASETS.get(name)(spec, split, resolution=R)


def check_sample(ds, s):
    """Shapes, ranges and keys every sample of every dataset must satisfy."""
    info = ds.info
    assert s["cond"].shape == (info.cond_channels, R, R) and s["cond"].dtype == torch.float32
    assert s["exemplar_cond"].shape == (info.cond_channels, R, R)
    for k in ("cond_vis", "exemplar", "image"):
        assert s[k].shape == (3, R, R), k
        assert -1.0 <= float(s[k].min()) and float(s[k].max()) <= 1.0, k
        assert float(s[k].max() - s[k].min()) > 0.1, f"{k} is flat"
    assert 0.0 <= float(s["cond"].min()) and float(s["cond"].max()) <= 1.0
    assert ("target" in s) == info.has_target and ("corr" in s) == info.has_corr
    if info.num_classes:
        for k in ("label", "exemplar_label"):
            assert s[k].shape == (R, R) and s[k].dtype == torch.int64
            assert 0 <= int(s[k].min()) and int(s[k].max()) < info.num_classes
        assert torch.equal(s["cond"].argmax(0), s["label"]) or info.name == "celebahq"


def photo_of(ds, path: Path) -> torch.Tensor:
    img = Image.open(path).convert("RGB").resize((R, R), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) * 2 - 1


# ---- DeepFashion ----------------------------------------------------------------------------
def test_deepfashion_inshop_ref_list_resolves(real_fixtures):
    root = real_fixtures / "deepfashion" / "DeepFashion"
    ds = load("deepfashion", root)
    assert len(ds) == 4 and ds.info.cond_channels == 20 and ds.info.num_classes is None
    pairs = [line.split(",") for line in (real_fixtures / "deepfashion/data/deepfashion_ref_test.txt").read_text().split()]
    p = ds.info.params
    assert p["split_source"].endswith("val.txt") and p["listed"] == 4 and p["size"] == 4 and p["exemplars"] == "ref_list"
    assert p["variant"] == "inshop" and p["exemplar_list"].endswith("deepfashion_ref_test.txt")
    for i, (query, ref) in enumerate(pairs):
        s = ds[i]
        check_sample(ds, s)
        assert ds.records[i].key == query.replace("\\", "/")
        expected = photo_of(ds, root / ref.replace("\\", "/"))
        assert torch.allclose(s["exemplar"], expected, atol=1e-5), f"exemplar of {query} is not {ref}"
        skeleton = s["cond"][:3].sum(0) > 0
        assert 0.02 < skeleton.float().mean() < 0.5  # a drawn body, not empty, not everything
        # every present limb has a zero-distance region inside its stroke
        assert (s["cond"][3:].amin(dim=(1, 2)) == 0).sum() >= 10


def test_deepfashion_keypoint_csv_matches_openpose(real_fixtures, tmp_path):
    """The Pose-Transfer CSV route gives the same pose maps as the OpenPose files it was written from."""
    root = real_fixtures / "deepfashion" / "DeepFashion"
    ref = load("deepfashion", root, options={"eval_exemplars": "random"})
    rows = ["name:keypoints_y:keypoints_x"]
    from datasets.deepfashion import flat_name

    for rec in ref.records:
        kp = ref.keypoints(rec)
        ys = [-1 if np.isnan(v) else int(v) for v in kp[:, 1]]
        xs = [-1 if np.isnan(v) else int(v) for v in kp[:, 0]]
        rows.append(f"{flat_name(rec.key)}: {json.dumps(ys)}: {json.dumps(xs)}")
    csv = tmp_path / "fasion-annotation-test.csv"
    csv.write_text("\n".join(rows) + "\n")
    ds = load("deepfashion", root, options={"eval_exemplars": "random", "keypoints_csv": str(csv)})
    assert ds.info.params["keypoints_csv"] == str(csv)
    for i in range(len(ds)):
        assert torch.equal(ds[i]["cond"], ref[i]["cond"])


def test_deepfashion_pose_transfer_layout_pads_crops_back(real_fixtures, tmp_path):
    """176-wide Pose-Transfer crops + CSV: padded back to 256 the pose map equals the In-shop one."""
    from datasets.deepfashion import flat_name

    src = real_fixtures / "deepfashion" / "DeepFashion"
    ref = load("deepfashion", src, options={"eval_exemplars": "random"})
    (tmp_path / "test").mkdir()
    rows = ["name:keypoints_y:keypoints_x"]
    for rec in ref.records:
        name = flat_name(rec.key)
        Image.open(rec.image).crop((40, 0, 216, 256)).save(tmp_path / "test" / name)
        kp = ref.keypoints(rec)
        ys = [-1 if np.isnan(v) else int(v) for v in kp[:, 1]]
        xs = [-1 if np.isnan(v) else int(v) - 40 for v in kp[:, 0]]
        rows.append(f"{name}: {json.dumps(ys)}: {json.dumps(xs)}")
    (tmp_path / "fasion-resize-annotation-test.csv").write_text("\n".join(rows) + "\n")
    ds = load("deepfashion", tmp_path, options={"eval_exemplars": "random"})
    assert ds.layout == "pose_transfer" and len(ds) == 4
    for i in range(len(ds)):
        s = ds[i]
        check_sample(ds, s)
        assert torch.equal(s["cond"], ref[i]["cond"])
        assert torch.allclose(s["image"][:, :, :4], torch.ones(3, R, 4), atol=0.02)  # white padding


def test_deepfashion_self_pair_gives_target(real_fixtures, tmp_path):
    root = real_fixtures / "deepfashion" / "DeepFashion"
    lines = (real_fixtures / "deepfashion/data/deepfashion_ref_test.txt").read_text().split()
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    ds = load("deepfashion", root, options={"eval_exemplars": "self_pair", "self_pair_list": str(pairs)})
    assert ds.info.has_target and ds.info.params["exemplar_list"] == str(pairs)
    s = ds[0]
    check_sample(ds, s)
    assert torch.equal(s["target"], s["image"])


def test_deepfashion_hd_pads_with_232_and_scales_canvas(real_fixtures, tmp_path):
    """HD: a 75x110 photo is padded to 110x110 with 232 (v2 preprocess) and poses live on a 1024 canvas."""
    (tmp_path / "img/WOMEN/Dresses/id_1").mkdir(parents=True)
    (tmp_path / "pose/WOMEN/Dresses/id_1").mkdir(parents=True)
    Image.fromarray(np.full((110, 75, 3), 20, np.uint8)).save(tmp_path / "img/WOMEN/Dresses/id_1/01_1_front.jpg", quality=95)
    shutil.copy(real_fixtures / "deepfashion/DeepFashion/pose/WOMEN/Dresses/id_00000244/02_1_front_candidate.txt",
                tmp_path / "pose/WOMEN/Dresses/id_1/01_1_front_candidate.txt")
    shutil.copy(real_fixtures / "deepfashion/DeepFashion/pose/WOMEN/Dresses/id_00000244/02_1_front_subset.txt",
                tmp_path / "pose/WOMEN/Dresses/id_1/01_1_front_subset.txt")
    (tmp_path / "val.txt").write_text("img\\WOMEN\\Dresses\\id_1\\01_1_front.jpg\n")
    ds = load("deepfashion", tmp_path, variant="hd", options={"eval_exemplars": "random"})
    assert ds.info.params["pad_value"] == 232 and "1024px canvas" in ds.info.params["condition"]
    s = ds[0]
    left = (s["image"][:, :, :8] + 1) * 127.5
    assert torch.allclose(left, torch.full_like(left, 232.0), atol=1.5)
    # the 256-frame keypoints on a 1024 canvas occupy the top-left quarter only
    skeleton = s["cond"][:3].sum(0) > 0
    assert skeleton[: R // 4 + 2, : R // 4 + 2].any() and not skeleton[R // 2:, R // 2:].any()


# ---- MetFaces -------------------------------------------------------------------------------
def test_metfaces_canny_named_and_random_exemplars(real_fixtures):
    root = real_fixtures / "metfaces"
    opts = {"image_dir": "images_teaser_crops", "eval_fraction": 0.34}
    train = load("metfaces", root, split="train", options=opts)
    test = load("metfaces", root, split="test", options=opts)
    assert len(train) == 2 and len(test) == 1
    assert {r.key for r in train.records}.isdisjoint({r.key for r in test.records})
    p = train.info.params
    assert p["edge_method"] == "canny" and p["condition"].startswith("canny(sigma=2.0") and "not the paper's HED" in p["condition"]
    assert "split_seed=0" in p["split_source"] and p["exemplars"] == "random"
    s = train[0]
    check_sample(train, s)
    assert train.info.cond_channels == 1 and set(s["cond"].unique().tolist()) <= {0.0, 1.0}
    assert 0.01 < float(s["cond"].mean()) < 0.3
    assert torch.equal(s["exemplar"], train[1]["image"])  # the other face of the split
    again = load("metfaces", root, split="train", options=opts)
    assert [r.key for r in again.records] == [r.key for r in train.records]  # split is fixed


def test_metfaces_hed_without_weights_is_a_clear_error(real_fixtures, tmp_path, monkeypatch):
    from methods.common.weights import MissingWeightsError

    monkeypatch.setenv("BENCH_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingWeightsError, match="network-bsds500.pytorch"):
        load("metfaces", real_fixtures / "metfaces", variant="hed",
             options={"image_dir": "images_teaser_crops", "weights_dir": str(tmp_path)})


# ---- CelebA-HQ ------------------------------------------------------------------------------
CELEBA = "celebahq/CelebAMask-HQ"


def test_celebahq_edge_15_channels_skips_faces_without_parts(real_fixtures):
    root = real_fixtures / CELEBA
    ds = load("celebahq", root, skip_bad=True)
    assert ds.info.cond_channels == 15 and len(ds) == 4
    assert len(ds.skipped) == 4
    for file, reason in ds.skipped:
        assert file.endswith("_skin.png") and "no skin part mask" in reason and "val.txt line" in reason
    p = ds.info.params
    assert p["listed"] == 8 and p["size"] == 4 and p["skipped"].startswith("4: ") and p["edge_method"] == "canny"
    refs = dict(line.split(",") for line in (real_fixtures / "celebahq/data/celebahq_ref_test.txt").read_text().split())
    for i in range(len(ds)):
        s = ds[i]
        check_sample(ds, s)
        c = s["cond"]
        assert torch.all(c[0] >= c[14])  # channel 0 = boundaries + canny, channel 14 = boundaries
        assert (c[1] == 0).any() and (c[1] > 0).any()  # skin boundary distance map
        want = photo_of(ds, root / "CelebA-HQ-img" / refs[ds.records[i].key])
        assert torch.allclose(s["exemplar"], want, atol=1e-5)


def test_celebahq_mask_19_classes_from_merged_and_parts(real_fixtures):
    ds = load("celebahq", real_fixtures / CELEBA, variant="mask")
    assert len(ds) == 8 and ds.info.num_classes == 19
    assert ds.info.params["mask_sources"] == "merged=4, parts=4"
    for i in (0, 7):
        s = ds[i]
        check_sample(ds, s)
        labels = set(s["label"].unique().tolist())
        assert {0, 1, 2, 5, 6} <= labels  # background, skin, hair, both eyes
        assert torch.all(s["cond"].sum(0) >= 1)


def test_celebahq_mask_from_other_repo_merged_maps_remapped(real_fixtures, tmp_path):
    """Fewshot-SMIS merged maps are in CelebAMask-HQ's class order; they come out in CoCosNet's."""
    ids = tmp_path / "ids.txt"
    ids.write_text("0\n1\n10\n")
    ds = load("celebahq", real_fixtures / CELEBA, variant="mask",
              options={"eval_list": str(ids), "merged_labels": str(real_fixtures / "celebahq/derived/combined_label_19class"),
                       "eval_exemplars": "random"})
    raw = np.asarray(Image.open(real_fixtures / "celebahq/derived/combined_label_19class/0.png").resize((R, R), Image.NEAREST))
    s = ds[0]
    check_sample(ds, s)
    lab = s["label"].numpy()
    assert (lab[raw == 13] == 2).all()  # official 13 = hair -> CoCosNet 2
    assert (lab[raw == 1] == 1).all()  # skin stays 1
    assert (lab[raw == 4] == 5).all()  # official 4 = l_eye -> CoCosNet 5


def test_celebahq_canny_plus_landmarks_variant(real_fixtures, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("9995\n9996\n28002\n")
    lm = real_fixtures / "celebahq/derived/landmarks_from_label_maps.json"
    ds = load("celebahq", real_fixtures / CELEBA, variant="edge_landmarks",
              options={"eval_list": str(ids), "landmarks": str(lm), "eval_exemplars": "random"})
    assert ds.info.cond_channels == 1 and ds.info.params["edge_method"] == "canny+landmarks"
    s = ds[0]
    check_sample(ds, s)
    pts = json.loads(lm.read_text())["landmarks"]["9995"]
    x, y = pts["34"][:2]  # nose tip, on the lower-nose polyline
    cx, cy = int(x * R / 1024), int(y * R / 1024)
    assert s["cond"][0, cy - 2:cy + 3, cx - 2:cx + 3].max() == 1.0


def test_celebahq_landmarks_variant_without_files_names_what_is_missing(real_fixtures):
    with pytest.raises(FileNotFoundError, match="landmarks.json"):
        load("celebahq", real_fixtures / CELEBA, variant="edge_landmarks")


# ---- ADE20K ---------------------------------------------------------------------------------
ADE = "ade20k/ADEChallengeData2016"


def test_ade20k_eval_ref_list_resolves_to_training_images(real_fixtures):
    root = real_fixtures / ADE
    ds = load("ade20k", root, skip_bad=True)
    assert len(ds) == 6 and ds.info.params["listed"] == 39 and len(ds.skipped) == 33
    assert all("has no entry in the ref list" in r for _, r in ds.skipped)
    pairs = dict(l.split(",") for l in (real_fixtures / "ade20k/data/ade20k_ref_test.txt").read_text().split())
    for i in range(len(ds)):
        s = ds[i]
        check_sample(ds, s)
        assert ds.info.cond_channels == 151 and ds.info.num_classes == 151
        want = photo_of(ds, root / "images/training" / pairs[ds.records[i].key])
        assert torch.allclose(s["exemplar"], want, atol=1e-5)


def test_ade20k_train_pseudo_exemplars_and_labels(real_fixtures):
    ds = load("ade20k", real_fixtures / ADE, split="train")
    assert len(ds) == 6 and ds.info.has_target and ds.info.has_corr
    raw = np.asarray(Image.open(ds.records[0].files["label"]))
    s = ds[0]
    check_sample(ds, s)
    assert torch.equal(s["target"], s["image"])
    assert set(s["label"].unique().tolist()) <= set(np.unique(raw).tolist())
    assert int(s["label"].max()) <= 150


def test_ade20k_side_by_side_layout_and_outdoor_subset(real_fixtures, tmp_path):
    src = real_fixtures / ADE
    for folder, stems in (("training", ["ADE_train_00004996", "ADE_train_00007201"]),
                          ("validation", ["ADE_val_00001232", "ADE_val_00001517", "ADE_val_00000001"])):
        (tmp_path / folder).mkdir()
        for stem in stems:
            shutil.copy(src / "images" / folder / f"{stem}.jpg", tmp_path / folder)
            shutil.copy(src / "annotations" / folder / f"{stem}.png", tmp_path / folder)
    ds = load("ade20k", tmp_path, options={"eval_exemplars": "random"})
    assert ds.layout == "side_by_side" and len(ds) == 3
    check_sample(ds, ds[0])
    subset = tmp_path / "outdoor.txt"
    subset.write_text("ADE_val_00001517.jpg\nADE_train_00004996.jpg\nADE_val_00000001\n")
    out = load("ade20k", tmp_path, variant="outdoor", options={"eval_exemplars": "random", "subset_list": str(subset)})
    assert [r.key for r in out.records] == ["ADE_val_00000001.jpg", "ADE_val_00001517.jpg"]
    assert out.info.params["subset_names"] == 3 and out.info.variant == "outdoor"
    with pytest.raises(FileNotFoundError, match="subset_list"):
        load("ade20k", tmp_path, variant="outdoor", options={"eval_exemplars": "random"})


# ---- LSUN-Churches --------------------------------------------------------------------------
def test_lsun_church_fewshot_layout(real_fixtures):
    root = real_fixtures / "lsun_church" / "fewshot_smis"
    train = load("lsun_church", root, split="train")
    test = load("lsun_church", root, split="test", options={"eval_exemplars": "random"})
    assert train.layout == "fewshot" and len(train) == 5 and len(test) == 3
    for ds in (train, test):
        s = ds[0]
        check_sample(ds, s)
        assert ds.info.cond_channels == 151
        assert int(s["label"].max()) < 150  # predicted 0..149 classes, no don't-care pixels here


def test_lsun_church_midms_layout_with_ref_list(real_fixtures, tmp_path):
    """MIDMs layout (<key>.jpg + <key>.png): the fixture photos converted, line 116 of MIDMs' list resolved."""
    src = real_fixtures / "lsun_church"
    line = (src / "data/lsun_church_ref_test.txt").read_text().splitlines()[115]
    query, ex1, _ = [Path(n).stem for n in line.split(",")]
    val = tmp_path / "validation"
    val.mkdir()
    labels = sorted((src / "fewshot_smis/train/labels").iterdir())
    for stem, lab in ((query, labels[0]), (ex1, labels[1])):
        Image.open(src / "lsun_val_images_mganprior" / f"{stem}.png").convert("RGB").save(val / f"{stem}.jpg", quality=95)
        arr = np.asarray(Image.open(lab)).copy()
        arr[:4] = 255  # a band of don't-care pixels
        Image.fromarray(arr).save(val / f"{stem}.png")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/lsun_church_ref_test.txt").write_text(line + "\n")
    ds = load("lsun_church", tmp_path, skip_bad=True)  # the exemplar is a validation image without a line of its own
    assert ds.layout == "midms" and [r.key for r in ds.records] == [f"{query}.jpg"]
    assert [Path(f).name for f, _ in ds.skipped] == [f"{ex1}.jpg"] and "no entry in the ref list" in ds.skipped[0][1]
    s = ds[0]
    check_sample(ds, s)
    assert (s["label"][0] == 150).all() and s["cond"][150, 0].eq(1).all()  # 255 -> don't care (150)
    want = photo_of(ds, val / f"{ex1}.jpg")
    assert torch.allclose(s["exemplar"], want, atol=1e-5)


# ---- all of them: batches at resolution 64 with few samples --------------------------------
@pytest.mark.parametrize("name,sub,kw", [
    ("deepfashion", "deepfashion/DeepFashion", {"options": {"train_list": "val.txt"}}),
    ("metfaces", "metfaces", {"options": {"image_dir": "images_teaser_crops"}}),
    ("celebahq", CELEBA, {"variant": "mask", "options": {"train_list": "val.txt"}}),
    ("ade20k", ADE, {"options": {"eval_exemplars": "random"}}),
    ("lsun_church", "lsun_church/fewshot_smis", {"options": {"eval_exemplars": "random"}}),
])
def test_small_batches_collate(real_fixtures, name, sub, kw):
    """What a harness smoke run does: max_samples small, a DataLoader batch per split."""
    for split in ("train", "test"):
        ds = load(name, real_fixtures / sub, split=split, max_samples=2, **kw)
        assert len(ds) <= 2 and ds.info.params["max_samples"] == 2
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
        assert batch["cond"].shape[1:] == (ds.info.cond_channels, R, R)
        assert batch["image"].shape[0] == len(ds)
