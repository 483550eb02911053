"""Condition builders, pseudo exemplars and the preprocessing cache, on small synthetic inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import _conditions as C
from datasets._cache import PrepCache
from datasets._io import norm_key, read_list, resize_label
from datasets._pseudo import PseudoSettings, correspondence, sample_transform, sampling_grid, warp
from datasets.deepfashion import flat_name


# ---- pose -----------------------------------------------------------------------------------
def test_limb_geometry_and_distance_map():
    """A horizontal limb (10,20)-(30,20), stick width 4: an ellipse 21 long and 9 high, L1 distance outside."""
    kp = np.full((18, 2), np.nan)
    kp[1] = (10, 20)  # neck
    kp[2] = (30, 20)  # right shoulder: limb 0 = (neck, r_shoulder)
    skeleton, dists = C.draw_pose(kp, (40, 40), C.PoseStyle(4, 4))
    stroke = C.polygon_mask(C.ellipse_polygon((20, 20), (10, 4), 180), (40, 40))
    rows, cols = np.nonzero(stroke)
    assert (rows.min(), rows.max()) == (16, 24) and (cols.min(), cols.max()) == (10, 30)
    assert (dists[0][stroke] == 0).all()
    assert dists[0][14, 20] == 0 and dists[0][13, 20] == 1  # 2 and 3 px away: /3 truncates, as uint8 does
    assert dists[0][20, 35] == (35 - 30) // 3  # L1 distance to the stroke, /3, truncated
    assert dists[0][5, 20] == (16 - 5) // 3
    assert (dists[1:] == 255).all()  # absent limbs: "infinitely" far, as OpenCV + clip gives
    # colours: the keypoint circles, then the limb blended 0.4 old / 0.6 new (BGR list, shown reversed)
    assert tuple(skeleton[20, 20]) == tuple(np.rint(0.6 * np.array(C.OPENPOSE_COLOURS[0][::-1])).astype(int))
    assert tuple(skeleton[20, 10]) == tuple(np.rint(0.4 * np.array(C.OPENPOSE_COLOURS[1][::-1])
                                                    + 0.6 * np.array(C.OPENPOSE_COLOURS[0][::-1])).astype(int))
    assert skeleton[0, 0].sum() == 0


def test_ellipse_polygon_matches_opencv_vertices():
    """Known ``cv2.ellipse2Poly((20, 20), (10, 4), 90, 0, 360, 1)`` vertices: a vertical ellipse."""
    pts = C.ellipse_polygon((20, 20), (10, 4), 90)
    assert tuple(pts[0]) == (20, 30) and (20, 10) in map(tuple, pts) and (16, 20) in map(tuple, pts)
    assert pts[:, 0].min() == 16 and pts[:, 0].max() == 24 and pts[:, 1].min() == 10 and pts[:, 1].max() == 30


def test_pose_condition_resizes_skeleton_nearest():
    kp = np.full((18, 2), np.nan)
    kp[0], kp[1] = (50, 40), (50, 80)  # nose, neck: limb 12 (neck, nose)
    out = C.pose_condition(kp, (128, 128), C.PoseStyle(4, 4), 32)
    assert out.shape == (20, 32, 32) and out.dtype == np.uint8
    assert set(np.unique(out[:3])) <= set(np.unique(C.draw_pose(kp, (128, 128), C.PoseStyle(4, 4))[0]))
    assert out[3 + 12].min() == 0 and (out[3:3 + 12] == 255).all()


def test_flat_name_is_pose_transfer_naming():
    assert flat_name("img/WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg") == \
        "fashionWOMENBlouses_Shirtsid0000000102_1front.jpg"
    assert flat_name("img/MEN/Denim/id_00000265/01_7_additional.jpg") == "fashionMENDenimid0000026501_7additional.jpg"


# ---- edges ----------------------------------------------------------------------------------
def test_boundaries_mark_both_sides():
    t = np.zeros((5, 6), np.uint8)
    t[:, 3:] = 255
    e = C.boundaries(t)
    assert e[:, 2].all() and e[:, 3].all() and not e[:, [0, 1, 4, 5]].any()


def test_celeba_edge_construction():
    r = 48
    yy, xx = np.mgrid[:r, :r]
    skin = (yy - 24) ** 2 + (xx - 24) ** 2 < 12 ** 2
    hair = (yy < 10) & ~skin
    grey = np.full((r, r), 40, np.uint8)
    grey[:, 40:] = 220  # a strong edge in the background at x = 40
    grey[20:28, 20:28] = 200  # a strong edge inside the face: Canny must be masked out there
    out = C.celeba_edge_condition(grey, {"skin": skin, "hair": hair}, sigma=1.0)
    assert out.shape == (15, r, r)
    bound = C.boundaries(skin) | C.boundaries(hair)
    assert np.array_equal(out[14] > 0, bound)
    assert (out[0] >= out[14]).all()
    assert out[0][:, 38:42].any(axis=0).any()  # background Canny kept
    inner = np.zeros((r, r), bool)
    inner[16:32, 16:32] = True
    assert not (out[0] > 0)[inner & ~bound].any()  # no Canny inside the face
    assert out[1].min() == 0 and out[1][24, 24] == 11 // 3  # skin boundary distance, L1/3
    assert (out[2] == 255).all()  # l_brow absent
    assert out[13].min() == 0  # hair present


def test_landmark_lines_connect_groups():
    pts = np.full((68, 2), np.nan)
    pts[36:42] = [(10, 10), (12, 8), (14, 8), (16, 10), (14, 12), (12, 12)]  # right eye, closed
    lines = C.landmark_lines(pts, (20, 20))
    assert lines[10, 10] and lines[8, 13] and lines[12, 13] and lines[11, 11]
    assert lines.sum() < 20


def test_one_hot_and_palette():
    lab = np.array([[0, 2], [1, 2]])
    oh = C.one_hot(lab, 3)
    assert oh.shape == (3, 2, 2) and np.array_equal(oh.argmax(0), lab) and (oh.sum(0) == 1).all()
    pal = C.label_palette(4)
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[2].tolist() == [0, 128, 0]
    assert pal[3].tolist() == [128, 128, 0]


def test_hed_accepts_both_key_namings(tmp_path):
    """The layout of sniklaus/pytorch-hed: its files use ``module*`` keys, the newer code ``net*``."""
    state = {k.replace("module", "net", 1): v for k, v in C.HED().state_dict().items()}
    path = tmp_path / "hed.pt"
    torch.save(state, path)
    model = C.load_hed(path)
    edges = C.hed_edges(model, np.random.default_rng(0).random((32, 32, 3)).astype(np.float32))
    assert edges.shape == (1, 32, 32) and edges.dtype == np.uint8


# ---- lists and resizing ---------------------------------------------------------------------
def test_read_list_line_numbers_and_keys(tmp_path):
    p = tmp_path / "l.txt"
    p.write_bytes(b"\xef\xbb\xbf# comment\r\nimg\\A\\b.jpg,c.jpg\r\n\r\n  d.jpg , e.jpg  \r\n")
    rows = read_list("t", p)
    assert [(f, w.lineno) for f, w in rows] == [(["img\\A\\b.jpg", "c.jpg"], 2), (["d.jpg", "e.jpg"], 4)]
    assert norm_key(rows[0][0][0]) == "img/A/b.jpg" and str(rows[1][1]).endswith("l.txt line 4")


def test_resize_label_keeps_values():
    lab = np.arange(16).reshape(4, 4)
    assert np.array_equal(resize_label(lab, 8)[::2, ::2], lab)
    assert set(np.unique(resize_label(lab, 3))) <= set(range(16))


# ---- pseudo exemplars -----------------------------------------------------------------------
def test_identity_transform_is_identity():
    rng = np.random.default_rng(0)
    t = sample_transform(rng, 16, PseudoSettings(flip_probability=0.0, min_crop=1.0, jitter=0.0))
    img = rng.random((16, 16, 3))
    assert np.allclose(warp(img, sampling_grid(t), order=1), img, atol=1e-6)
    corr = correspondence(t)
    centres = (2 * np.arange(16) + 1) / 16 - 1
    assert np.allclose(corr[0], centres[None, :], atol=1e-5) and np.allclose(corr[1], centres[:, None], atol=1e-5)


def test_flip_only_mirrors():
    t = sample_transform(np.random.default_rng(0), 8, PseudoSettings(flip_probability=1.0, min_crop=1.0, jitter=0.0))
    img = np.arange(64, dtype=np.float64).reshape(8, 8)
    assert np.allclose(warp(img, sampling_grid(t), order=0), img[:, ::-1])


def test_correspondence_maps_photo_pixels_onto_the_exemplar():
    """Sampling the exemplar at ``corr`` gives the photo back inside the crop (the truth, up to resampling)."""
    n = 64
    yy, xx = np.mgrid[:n, :n] / n
    photo = np.stack([np.sin(6 * xx) * 0.5 + 0.5, np.cos(5 * yy) * 0.5 + 0.5, xx * yy], -1)
    for seed in range(3):
        t = sample_transform(np.random.default_rng(seed), n, PseudoSettings(flip_probability=0.5, min_crop=0.7))
        ex = warp(photo, sampling_grid(t), order=1)
        corr = torch.from_numpy(correspondence(t)).permute(1, 2, 0)[None]
        back = torch.nn.functional.grid_sample(torch.from_numpy(ex).permute(2, 0, 1)[None].float(), corr,
                                               mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        inside = (corr[0].abs() <= 0.95).all(-1).numpy()
        assert inside.mean() > 0.3
        assert np.abs(back - photo)[inside].mean() < 0.02


def test_pseudo_settings_validated():
    with pytest.raises(ValueError, match="jitter"):
        PseudoSettings(jitter=0.6)


# ---- cache ----------------------------------------------------------------------------------
def test_cache_content_keyed_and_atomic(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("one")
    cache = PrepCache(tmp_path / "c")
    calls = []

    def compute():
        calls.append(1)
        return np.full((2, 3), len(calls), np.uint8)

    a = cache.get_or_compute("k", 1, [src], {"r": 8}, compute)
    b = cache.get_or_compute("k", 1, [src], {"r": 8}, compute)
    assert np.array_equal(a, b) and len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    moved = tmp_path / "moved.txt"
    src.rename(moved)  # same contents elsewhere: still a hit
    cache.get_or_compute("k", 1, [moved], {"r": 8}, compute)
    assert len(calls) == 1
    cache.get_or_compute("k", 1, [moved], {"r": 16}, compute)  # other settings: a miss
    moved.write_text("two")  # other contents: a miss
    cache.get_or_compute("k", 1, [moved], {"r": 8}, compute)
    assert len(calls) == 3
    files = list((tmp_path / "c").rglob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]
    key_of = {str(f) for f in files if f.suffix == ".npy"}
    assert len(key_of) == 3
    for f in key_of:
        Path(f).write_bytes(b"garbage")  # torn entries are recomputed, not returned
    cache.get_or_compute("k", 1, [moved], {"r": 8}, compute)
    assert len(calls) == 4


def test_dataset_reuses_cache_across_instances(tmp_path, monkeypatch):
    """Two trials of the same dataset: the second reads the pose maps the first computed."""
    from PIL import Image

    import datasets  # noqa: F401
    from datasets.base import DatasetSpec
    from datasets.registry import DATASETS

    monkeypatch.setenv("BENCH_DATA_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "df"
    (root / "img/WOMEN/D/id_1").mkdir(parents=True)
    (root / "pose/WOMEN/D/id_1").mkdir(parents=True)
    for n in ("01_1_front", "02_1_front"):
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(root / f"img/WOMEN/D/id_1/{n}.jpg")
        (root / f"pose/WOMEN/D/id_1/{n}_candidate.txt").write_text("5 5 1 0\n20 20 1 1\n")
        (root / f"pose/WOMEN/D/id_1/{n}_subset.txt").write_text(" ".join(["0", "1"] + ["-1"] * 16) + " 2 2")
    (root / "val.txt").write_text("img/WOMEN/D/id_1/01_1_front.jpg\nimg/WOMEN/D/id_1/02_1_front.jpg\n")
    spec = DatasetSpec(name="deepfashion", root=str(root), options={"eval_exemplars": "random"})
    first = DATASETS.get("deepfashion")(spec, "test", resolution=16)
    a = first[0]
    assert first.cache.misses >= 1
    second = DATASETS.get("deepfashion")(spec, "test", resolution=16, seed=5)
    b = second[0]
    assert second.cache.misses == 0 and second.cache.hits >= 1 and torch.equal(a["cond"], b["cond"])
