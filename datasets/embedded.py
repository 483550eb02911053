"""The embedded dataset: procedural scenes with exact ground truth, generated on the fly.

Nothing is downloaded or stored: sample ``i`` of a split is a pure function of
(``data_seed``, split, ``i``), so every trial, process and machine sees the same data.

A scene is a class map (background 0 plus shapes, or a stick-figure body). Every class has a
fixed *texture family* (a base hue and a pattern kind: gradient, stripes, checker or dots); an
*appearance* samples one member of each family (hue jitter, saturation, value, frequency,
angle, phase). A sample pairs a condition scene A with an exemplar scene B that has the same
classes in another layout and another appearance. Because the generator knows both, it renders

* ``image``  = A's layout in A's appearance (the condition's own photo),
* ``exemplar`` = B's layout in B's appearance,
* ``target`` = A's layout in B's appearance: the exact answer an exemplar-based method should give,
* ``corr``   = for every pixel of A, the nearest pixel of the same class in B (a class-consistent
  correspondence; warping the exemplar with it approximates ``target``).

Variants: ``mask`` (one-hot class map), ``edge`` (class boundaries, 1 channel) and
``keypoint`` (stick figure drawn as coloured limbs, like an OpenPose rendering).
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
from scipy import ndimage

from datasets.base import DataInfo, DatasetSpec, ExemplarDataset
from datasets.registry import DATASETS

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
PATTERNS = ("gradient", "stripes", "checker", "dots")

# Stick figure: joints as (name, parent) and the class each limb paints.
LIMBS: List[Tuple[str, str, int]] = [
    ("neck", "pelvis", 2), ("neck", "l_elbow", 3), ("l_elbow", "l_hand", 3),
    ("neck", "r_elbow", 3), ("r_elbow", "r_hand", 3), ("pelvis", "l_knee", 4),
    ("l_knee", "l_foot", 4), ("pelvis", "r_knee", 4), ("r_knee", "r_foot", 4),
]
LIMB_COLOURS = np.array([
    [255, 0, 0], [255, 170, 0], [170, 255, 0], [0, 255, 85], [0, 255, 255],
    [0, 85, 255], [85, 0, 255], [255, 0, 170], [255, 255, 255]], dtype=np.float32) / 255.0


@dataclass
class EmbeddedOptions:
    num_classes: int = 6  # classes incl. background 0 (mask/edge; keypoint always uses 5)
    min_shapes: int = 2  # shapes per scene (mask/edge)
    max_shapes: int = 4
    train_size: int = 4096  # samples in the train split (virtual: generated on demand)
    eval_size: int = 64  # samples in the val/test split
    data_seed: int = 0  # the world: class families and every scene derive from it


def _palette(k: int) -> np.ndarray:
    return np.array([colorsys.hsv_to_rgb((i * 0.618) % 1.0, 0.65, 0.95) for i in range(k)], dtype=np.float32)


@DATASETS.register("embedded")
class EmbeddedDataset(ExemplarDataset):
    """Procedural mask/edge/keypoint -> image scenes with exact ground truth (see module doc)."""

    Options = EmbeddedOptions
    variants = ("mask", "edge", "keypoint")

    def __init__(self, spec: DatasetSpec, split: str, resolution: int, seed: int = 0):
        super().__init__(spec, split, resolution, seed)
        o = self.options
        if split not in SPLIT_IDS:
            raise ValueError(f"dataset 'embedded': unknown split {split!r}; choose one of {list(SPLIT_IDS)}")
        if self.variant == "keypoint":
            self.num_classes = 5  # background, head, torso, arms, legs
        else:
            if not 2 <= o.num_classes <= 32:
                raise ValueError("dataset 'embedded': options.num_classes must be in [2, 32]")
            if not 1 <= o.min_shapes <= o.max_shapes:
                raise ValueError("dataset 'embedded': need 1 <= options.min_shapes <= options.max_shapes")
            self.num_classes = o.num_classes
        size = o.train_size if split == "train" else o.eval_size
        if spec.max_samples is not None:
            size = min(size, spec.max_samples)
        self.size = size
        world = np.random.default_rng([o.data_seed, 991])
        k = self.num_classes
        # Texture family of each class: fixed for the world, shared by all scenes and splits.
        self.base_hue = (np.arange(k) / k + world.uniform(0, 0.5 / k)) % 1.0
        self.pattern = [PATTERNS[(c + 1) % len(PATTERNS)] for c in range(k)]
        self.palette = _palette(k)
        r = resolution
        yy, xx = np.meshgrid((np.arange(r) + 0.5) / r, (np.arange(r) + 0.5) / r, indexing="ij")
        self._yy, self._xx = yy.astype(np.float32), xx.astype(np.float32)
        cond_channels = {"mask": k, "edge": 1, "keypoint": 3}[self.variant]
        self.info = DataInfo(
            name="embedded", variant=self.variant, split=split, size=size, resolution=r,
            cond_channels=cond_channels, num_classes=k, has_target=True, has_corr=True,
            params={"generator": "procedural", "data_seed": o.data_seed, "num_classes": k,
                    "split": split, "size": size, "shapes": f"{o.min_shapes}-{o.max_shapes}"},
        )

    def __len__(self) -> int:
        return self.size

    # ---- scene layouts -------------------------------------------------------------------
    def _shape_layout(self, rng: np.random.Generator, classes: np.ndarray) -> np.ndarray:
        label = np.zeros((self.resolution, self.resolution), dtype=np.int64)
        for c in classes:
            cy, cx = rng.uniform(0.15, 0.85, size=2)
            ry, rx = rng.uniform(0.12, 0.35, size=2)
            if rng.random() < 0.5:  # ellipse
                inside = ((self._yy - cy) / ry) ** 2 + ((self._xx - cx) / rx) ** 2 <= 1.0
            else:  # rectangle
                inside = (np.abs(self._yy - cy) <= ry * 0.8) & (np.abs(self._xx - cx) <= rx * 0.8)
            label[inside] = c
        return label

    def _pose(self, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        s = rng.uniform(0.8, 1.1)
        pelvis = np.array([rng.uniform(0.45, 0.55), rng.uniform(0.4, 0.6)])  # (y, x)
        lean = rng.uniform(-0.3, 0.3)
        neck = pelvis + s * 0.3 * np.array([-np.cos(lean), np.sin(lean)])
        j = {"pelvis": pelvis, "neck": neck, "head": neck + s * 0.1 * np.array([-np.cos(lean), np.sin(lean)])}
        for side, sign in (("l", -1), ("r", 1)):
            a1 = rng.uniform(0.3, 2.2) * sign
            a2 = a1 + rng.uniform(-1.0, 1.0)
            j[f"{side}_elbow"] = neck + s * 0.15 * np.array([np.cos(a1), np.sin(a1)])
            j[f"{side}_hand"] = j[f"{side}_elbow"] + s * 0.14 * np.array([np.cos(a2), np.sin(a2)])
            b1 = rng.uniform(0.05, 0.5) * sign
            b2 = b1 + rng.uniform(-0.4, 0.4)
            j[f"{side}_knee"] = pelvis + s * 0.2 * np.array([np.cos(b1), np.sin(b1)])
            j[f"{side}_foot"] = j[f"{side}_knee"] + s * 0.2 * np.array([np.cos(b2), np.sin(b2)])
        return j

    def _segment_distance(self, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        d = q - p
        t = ((self._yy - p[0]) * d[0] + (self._xx - p[1]) * d[1]) / max(float(d @ d), 1e-9)
        t = np.clip(t, 0.0, 1.0)
        return np.hypot(self._yy - (p[0] + t * d[0]), self._xx - (p[1] + t * d[1]))

    def _body(self, joints: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """Class map of the body and its stick-figure rendering (the keypoint condition)."""
        r = self.resolution
        label = np.zeros((r, r), dtype=np.int64)
        skeleton = np.zeros((r, r, 3), dtype=np.float32)
        thickness = {2: 0.07, 3: 0.035, 4: 0.045}
        line = max(1.0 / r, 0.012)
        for i, (a, b, cls) in enumerate(LIMBS):
            dist = self._segment_distance(joints[a], joints[b])
            label[(dist <= thickness[cls]) & (label == 0)] = cls
            skeleton[dist <= line] = LIMB_COLOURS[i]
        head = np.hypot(self._yy - joints["head"][0], self._xx - joints["head"][1])
        label[head <= 0.07] = 1
        skeleton[np.abs(head - 0.05) <= line / 2 + 0.004] = LIMB_COLOURS[-1]
        return label, skeleton

    # ---- appearance ----------------------------------------------------------------------
    def _appearance(self, rng: np.random.Generator) -> List[dict]:
        look = []
        for c in range(self.num_classes):
            hue = (self.base_hue[c] + rng.uniform(-0.05, 0.05)) % 1.0
            sat, val = rng.uniform(0.45, 0.9), rng.uniform(0.55, 0.95)
            c1 = np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32)
            c2 = np.array(colorsys.hsv_to_rgb((hue + 0.08) % 1.0, sat * 0.6, val * 0.55), dtype=np.float32)
            look.append({"c1": c1, "c2": c2, "freq": rng.uniform(3.0, 7.0), "angle": rng.uniform(0, np.pi),
                         "phase": rng.uniform(0, 2 * np.pi)})
        return look

    def _texture(self, c: int, look: dict) -> np.ndarray:
        u = self._xx * np.cos(look["angle"]) + self._yy * np.sin(look["angle"])
        v = -self._xx * np.sin(look["angle"]) + self._yy * np.cos(look["angle"])
        f, ph = look["freq"], look["phase"]
        kind = self.pattern[c]
        if kind == "gradient":
            s = 0.5 + 0.5 * np.sin(np.pi * u + ph)
        elif kind == "stripes":
            s = 0.5 + 0.5 * np.sin(2 * np.pi * f * u + ph)
        elif kind == "checker":
            s = (np.sin(2 * np.pi * f * u + ph) * np.sin(2 * np.pi * f * v + ph) > 0).astype(np.float32)
        else:  # dots
            s = ((np.sin(2 * np.pi * f * u + ph) + np.sin(2 * np.pi * f * v + ph)) > 1.0).astype(np.float32)
        s = s[..., None]
        return look["c1"] * (1 - s) + look["c2"] * s

    def _render(self, label: np.ndarray, look: List[dict]) -> np.ndarray:
        img = np.zeros(label.shape + (3,), dtype=np.float32)
        for c in np.unique(label):
            m = label == c
            img[m] = self._texture(int(c), look[int(c)])[m]
        return img

    # ---- conditions ----------------------------------------------------------------------
    def _condition(self, label: np.ndarray, skeleton: np.ndarray = None) -> Tuple[np.ndarray, np.ndarray]:
        """(condition C x H x W, visualisation H x W x 3 in [0, 1])."""
        if self.variant == "keypoint":
            return skeleton.transpose(2, 0, 1).copy(), skeleton
        if self.variant == "edge":
            edge = np.zeros(label.shape, dtype=bool)
            edge[:-1] |= label[:-1] != label[1:]
            edge[:, :-1] |= label[:, :-1] != label[:, 1:]
            edge = edge.astype(np.float32)
            return edge[None], np.repeat(edge[..., None], 3, axis=2)
        onehot = (label[None] == np.arange(self.num_classes)[:, None, None]).astype(np.float32)
        return onehot, self.palette[label]

    def _correspondence(self, label_a: np.ndarray, label_b: np.ndarray) -> np.ndarray:
        """For each pixel of A, the nearest pixel of B with the same class, as (x, y) in [-1, 1]."""
        r = self.resolution
        iy, ix = np.meshgrid(np.arange(r), np.arange(r), indexing="ij")
        corr_y, corr_x = iy.astype(np.float32), ix.astype(np.float32)
        for c in np.unique(label_a):
            if not (label_b == c).any():
                continue
            _, (ny, nx) = ndimage.distance_transform_edt(label_b != c, return_indices=True)
            m = label_a == c
            corr_y[m], corr_x[m] = ny[m], nx[m]
        return np.stack([(2 * corr_x + 1) / r - 1, (2 * corr_y + 1) / r - 1]).astype(np.float32)

    # ---- samples -------------------------------------------------------------------------
    def _scene(self, rng: np.random.Generator, classes: np.ndarray):
        if self.variant == "keypoint":
            return self._body(self._pose(rng))
        return self._shape_layout(rng, classes), None

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"embedded[{self.split}] has {self.size} samples, asked for {index}")
        o = self.options
        rng = np.random.default_rng([o.data_seed, SPLIT_IDS[self.split], index])
        n = int(rng.integers(o.min_shapes, o.max_shapes + 1))
        classes = rng.choice(np.arange(1, self.num_classes), size=min(n, self.num_classes - 1), replace=False)
        label_a, skel_a = self._scene(rng, classes)
        label_b, skel_b = self._scene(rng, rng.permutation(classes))  # same classes, other layout
        look_a, look_b = self._appearance(rng), self._appearance(rng)
        cond_a, vis_a = self._condition(label_a, skel_a)
        cond_b, _ = self._condition(label_b, skel_b)

        def img(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(x.transpose(2, 0, 1).copy()) * 2 - 1

        return {
            "cond": torch.from_numpy(cond_a),
            "cond_vis": img(vis_a),
            "exemplar": img(self._render(label_b, look_b)),
            "exemplar_cond": torch.from_numpy(cond_b),
            "image": img(self._render(label_a, look_a)),
            "target": img(self._render(label_a, look_b)),
            "label": torch.from_numpy(label_a),
            "exemplar_label": torch.from_numpy(label_b),
            "corr": torch.from_numpy(self._correspondence(label_a, label_b)),
            "index": torch.tensor(index, dtype=torch.int64),
        }
