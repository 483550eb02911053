"""CelebA-HQ faces with CelebAMask-HQ annotations: edge -> face and mask -> face.

Layout (root = the ``CelebAMask-HQ`` folder as released): ``CelebA-HQ-img/<id>.jpg`` (1024^2),
``CelebAMask-HQ-mask-anno/<id // 2000>/<id:05d>_<part>.png`` (512^2, 0/255 per part; a missing
file means the part is absent), ``train.txt`` / ``val.txt`` (one id per line, CoCosNet's split).

Variants:

* ``edge`` (default; CoCosNet ``celebahqedge_dataset.py``, reused verbatim by MIDMs): 15 channels
  from the part masks - boundaries + Canny on background and hair, 13 per-part distance maps,
  boundaries alone. A sample without a ``skin`` mask is rejected: it has no part annotation
  (the construction would silently produce a face without a face).
* ``edge_landmarks``: the CoCosNet paper's "connected facial landmarks + Canny on the background"
  (not what its code does), 1 channel; needs landmark files (``options.landmarks``: a JSON file
  or a folder of ``<id>.txt`` with 68 "x y" rows, in the photo's pixel frame).
* ``mask``: 19 classes in CoCosNet's order (0 background, 1 skin, 2 hair, 3 l_brow, 4 r_brow,
  5 l_eye, 6 r_eye, 7 l_ear, 8 r_ear, 9 nose, 10 u_lip, 11 mouth, 12 l_lip, 13 neck, 14 cloth,
  15 hat, 16 eye_g, 17 ear_r, 18 neck_l). Built from CoCosNet's merged
  ``all_parts_except_glasses/<id:05d>.png`` with the glasses mask written into channel 16 (as its
  ``preprocess_input`` does), else from the per-part masks, or from another repo's merged maps
  (``options.merged_labels``, in CelebAMask-HQ's own class order unless told otherwise).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from datasets._conditions import (CELEBA_EDGE_CHANNELS, CELEBA_EDGE_PARTS, celeba_edge_condition, grey_uint8,
                                  landmark_edge_condition, one_hot)
from datasets._pseudo import warp
from datasets._io import (BadSampleError, Condition, DatasetError, MissingRootError, RealDataset, RealOptions,
                          Record, check_label_range, decode, label_array, open_header, read_binary_mask, read_list,
                          require_dir, resize_label)
from datasets.registry import DATASETS

# CelebAMask-HQ's own class order (its g_mask.py; later parts are painted over earlier ones).
OFFICIAL_PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth", "u_lip",
                  "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
# CoCosNet's class order (commented in its celebahq_dataset.py; checked on the merged maps: l_eye=5, r_eye=6).
COCOSNET_PARTS = ("skin", "hair", "l_brow", "r_brow", "l_eye", "r_eye", "l_ear", "r_ear", "nose", "u_lip", "mouth",
                  "l_lip", "neck", "cloth", "hat", "eye_g", "ear_r", "neck_l")
COCOSNET_INDEX = {p: i + 1 for i, p in enumerate(COCOSNET_PARTS)}
NUM_CLASSES = 19
GLASSES = COCOSNET_INDEX["eye_g"]
EDGE_VERSION = 1
LANDMARK_VERSION = 1


@dataclass
class CelebAHQOptions(RealOptions):
    train_list: Optional[str] = None  # ids of the train split; default <root>/train.txt
    eval_list: Optional[str] = None  # ids of the val/test split; default <root>/val.txt
    canny_sigma: float = 1.0  # Canny on background/hair (skimage default, as the official code)
    landmarks: Optional[str] = None  # edge_landmarks: JSON file or folder of <id>.txt; default <root>/landmarks.json or <root>/landmarks/
    merged_labels: Optional[str] = None  # mask: folder of merged 0..18 maps <id>.png from another repo
    merged_label_order: str = "official"  # class order of merged_labels: "official" (CelebAMask-HQ) or "cocosnet"


@DATASETS.register("celebahq")
class CelebAHQDataset(RealDataset):
    """CelebA-HQ edge -> face (15-ch CoCosNet edges or Canny + landmarks) and mask -> face (19 classes)."""

    Options = CelebAHQOptions
    variants = ("edge", "edge_landmarks", "mask")
    name = "celebahq"
    ref_list_names = ("celebahq_ref.txt", "celebahq_ref_test.txt")
    root_hint = "expected the CelebAMask-HQ folder with CelebA-HQ-img/ and CelebAMask-HQ-mask-anno/"
    layout = "celebamask_hq"

    def _setup(self) -> None:
        self.img_dir = require_dir(self.name, self.root / "CelebA-HQ-img", "image folder", self.root_hint)
        self.anno_dir = self.root / "CelebAMask-HQ-mask-anno"
        if self.variant != "edge_landmarks":
            require_dir(self.name, self.anno_dir, "annotation folder", self.root_hint)
        self.cond_channels = {"edge": CELEBA_EDGE_CHANNELS, "edge_landmarks": 1, "mask": NUM_CLASSES}[self.variant]
        self.num_classes = NUM_CLASSES if self.variant == "mask" else None
        self._check_choice("merged_label_order", self.options.merged_label_order, ("official", "cocosnet"))
        self.landmark_source: Optional[Path] = None
        self._landmarks: Dict[str, np.ndarray] = {}
        if self.variant == "edge_landmarks":
            self._load_landmarks()
        self.merged_dir = None
        if self.variant == "mask" and self.options.merged_labels:
            self.merged_dir = require_dir(self.name, Path(self.options.merged_labels).expanduser(), "merged label folder")

    # ---- split lists ------------------------------------------------------------------------
    def _scan(self, split: str) -> Tuple[List[Record], str]:
        option = "train_list" if split == "train" else "eval_list"
        default = "train.txt" if split == "train" else "val.txt"
        path = self.find_list(getattr(self.options, option), default, f"{split} id list", option)
        records = []
        for fields, where in read_list(self.name, path, sep=None):
            stem = Path(fields[0]).stem
            if not stem.isdigit():
                raise DatasetError(f"dataset 'celebahq': {where}: expected a CelebA-HQ image id, got {fields[0]!r}")
            records.append(self._record(int(stem), where))
        return records, str(path)

    def _record(self, idx: int, where) -> Record:
        sub = self.anno_dir / str(idx // 2000)
        files = {f"part:{p}": sub / f"{idx:05d}_{p}.png" for p in OFFICIAL_PARTS}
        files["merged"] = self.anno_dir / "all_parts_except_glasses" / f"{idx:05d}.png"
        if self.merged_dir is not None:
            files["merged_other"] = self._merged_other(idx)
        return Record(key=f"{idx}.jpg", image=self.img_dir / f"{idx}.jpg", files=files, origin=where, data={"id": idx})

    def _merged_other(self, idx: int) -> Path:
        for name in (f"{idx}.png", f"{idx:05d}.png"):
            if (self.merged_dir / name).is_file():
                return self.merged_dir / name
        return self.merged_dir / f"{idx}.png"

    def _record_for_name(self, name: str, where) -> Optional[Record]:
        """CoCosNet opens exemplars by id from CelebA-HQ-img, whatever split lists them."""
        stem = Path(name).stem
        return self._record(int(stem), where) if stem.isdigit() else None

    def _norm_key(self, name: str) -> str:
        stem = Path(name.strip()).stem
        return f"{int(stem)}.jpg" if stem.isdigit() else name.strip()

    # ---- checks -----------------------------------------------------------------------------
    def _parts(self, rec: Record) -> Dict[str, Path]:
        return {k[5:]: p for k, p in rec.files.items() if k.startswith("part:") and p.is_file()}

    def _check(self, rec: Record, full: bool) -> None:
        opener = decode if full else open_header
        opener(self.name, rec.image, rec.origin)
        if self.variant == "edge":
            self._check_parts(rec, opener, require_skin=True)
        elif self.variant == "edge_landmarks":
            self._points(rec)
        else:
            self._check_mask(rec, opener, full)

    def _check_parts(self, rec: Record, opener, require_skin: bool) -> None:
        parts = self._parts(rec)
        if require_skin and "skin" not in parts:
            raise BadSampleError(self.name, rec.files["part:skin"], "no skin part mask: this face has no part "
                                 f"annotation (found: {sorted(parts) or 'none'})", rec.origin)
        sizes = {}
        for name, path in parts.items():
            sizes[path] = opener(self.name, path, rec.origin).size
        if len(set(sizes.values())) > 1:
            first = next(iter(sizes))
            for path, size in sizes.items():
                if size != sizes[first]:
                    raise BadSampleError(self.name, path, f"part mask size {size[0]}x{size[1]} differs from "
                                         f"{first.name} ({sizes[first][0]}x{sizes[first][1]})", rec.origin)

    def _mask_source(self, rec: Record) -> str:
        if self.merged_dir is not None:
            return "merged_other"
        if rec.files["merged"].is_file():
            return "merged"
        if rec.files["part:skin"].is_file():
            return "parts"
        raise BadSampleError(self.name, rec.files["merged"], "no label map: neither this merged map nor part masks "
                             f"(e.g. {rec.files['part:skin'].name}) exist", rec.origin)

    def _check_mask(self, rec: Record, opener, full: bool) -> None:
        source = self._mask_source(rec)
        if source == "parts":
            self._check_parts(rec, opener, require_skin=True)
            return
        path = rec.files[source]
        img = opener(self.name, path, rec.origin)
        if img.size[0] != img.size[1]:
            raise BadSampleError(self.name, path, f"label map is {img.size[0]}x{img.size[1]}, expected square",
                                 rec.origin)
        if full:
            check_label_range(self.name, path, label_array(self.name, path, img, rec.origin), NUM_CLASSES - 1,
                              origin=rec.origin)
        glasses = rec.files["part:eye_g"]
        if source == "merged" and glasses.is_file():
            opener(self.name, glasses, rec.origin)

    # ---- conditions -------------------------------------------------------------------------
    def _condition(self, rec: Record, img: Image.Image) -> Condition:
        if self.variant == "edge":
            return Condition(self._edge_maps(rec, img).astype(np.float32) / 255.0)
        if self.variant == "edge_landmarks":
            return Condition(self._landmark_maps(rec, img).astype(np.float32) / 255.0)
        return self._mask_condition(rec)

    def _edge_maps(self, rec: Record, img: Image.Image) -> np.ndarray:
        parts = self._parts(rec)
        r, sigma = self.resolution, self.options.canny_sigma

        def compute() -> np.ndarray:
            masks = {p: read_binary_mask(self.name, parts[p], r, rec.origin) if p in parts else None
                     for p in CELEBA_EDGE_PARTS}
            return celeba_edge_condition(grey_uint8(img, r), masks, sigma)

        files = [rec.image] + [parts[p] for p in sorted(parts)]
        return self.cache.get_or_compute("celeba_edge15", EDGE_VERSION, files, {"r": r, "sigma": sigma}, compute)

    def _landmark_maps(self, rec: Record, img: Image.Image) -> np.ndarray:
        pts = self._points(rec)
        r, sigma = self.resolution, self.options.canny_sigma
        w, h = img.size
        scaled = pts * np.array([r / w, r / h])
        settings = {"r": r, "sigma": sigma, "points": np.round(scaled, 3).tolist()}
        return self.cache.get_or_compute("celeba_landmark_edges", LANDMARK_VERSION, [rec.image], settings,
                                         lambda: landmark_edge_condition(grey_uint8(img, r), scaled, sigma))

    def _mask_condition(self, rec: Record) -> Condition:
        source = self._mask_source(rec)
        if source == "parts":
            label, glasses = self._label_from_parts(rec)
        else:
            path = rec.files[source]
            label = label_array(self.name, path, decode(self.name, path, rec.origin), rec.origin)
            check_label_range(self.name, path, label, NUM_CLASSES - 1, origin=rec.origin)
            if source == "merged_other" and self.options.merged_label_order == "official":
                remap = np.array([0] + [COCOSNET_INDEX[p] for p in OFFICIAL_PARTS], dtype=np.int64)
                label = remap[label]
            label = resize_label(label, self.resolution)
            glasses = None
            if source == "merged" and rec.files["part:eye_g"].is_file():
                glasses = read_binary_mask(self.name, rec.files["part:eye_g"], self.resolution, rec.origin)
        maps = one_hot(label, NUM_CLASSES)
        if glasses is not None:  # CoCosNet: glasses go into channel 16 on top of what is under them
            maps[GLASSES] = glasses
            label = np.where(glasses, GLASSES, label)
        return Condition(maps, label)

    def _label_from_parts(self, rec: Record) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Paint the part masks in CelebAMask-HQ's order, glasses kept apart as in CoCosNet."""
        parts = self._parts(rec)
        r = self.resolution
        label = np.zeros((r, r), dtype=np.int64)
        for p in OFFICIAL_PARTS:
            if p in parts and p != "eye_g":
                label[read_binary_mask(self.name, parts[p], r, rec.origin)] = COCOSNET_INDEX[p]
        glasses = read_binary_mask(self.name, parts["eye_g"], r, rec.origin) if "eye_g" in parts else None
        return label, glasses

    def _warp_condition(self, cond: Condition, grid) -> Condition:
        """Warp the maps themselves: with glasses two channels can be on at one pixel."""
        maps = warp(cond.maps.transpose(1, 2, 0), grid, order=0).transpose(2, 0, 1).copy()
        label = warp(cond.label, grid, order=0) if cond.label is not None else None
        return Condition(maps, label)

    # ---- landmarks --------------------------------------------------------------------------
    def _load_landmarks(self) -> None:
        opt = self.options.landmarks
        if opt:
            source = Path(opt).expanduser()
            if not source.is_absolute() and (self.root / source).exists():
                source = self.root / source
        else:
            source = next((p for p in (self.root / "landmarks.json", self.root / "landmarks") if p.exists()), None)
        if source is None or not source.exists():
            looked = str(source) if source is not None else f"{self.root / 'landmarks.json'}, {self.root / 'landmarks'}"
            raise MissingRootError(f"dataset 'celebahq' variant 'edge_landmarks' needs landmark files; not found "
                                   f"({looked}). Set options.landmarks to a JSON file or a folder of <id>.txt. "
                                   "See docs/datasets.md.")
        self.landmark_source = source
        if source.is_file():
            self._landmarks = _parse_landmark_json(source)

    def _points(self, rec: Record) -> np.ndarray:
        """(68, 2) landmarks (x, y) in the photo's pixels, NaN where missing."""
        idx = rec.data["id"]
        if self.landmark_source.is_dir():
            path = self.landmark_source / f"{idx}.txt"
            if not path.is_file():
                raise BadSampleError(self.name, path, "landmark file not found", rec.origin)
            try:
                pts = np.loadtxt(path, ndmin=2, dtype=np.float64)
            except ValueError as exc:
                raise BadSampleError(self.name, path, f"cannot parse landmarks: {exc}", rec.origin) from None
            if pts.shape != (68, 2):
                raise BadSampleError(self.name, path, f"expected 68 rows of 'x y', got shape {pts.shape}", rec.origin)
            return pts
        pts = self._landmarks.get(str(idx))
        if pts is None:
            raise BadSampleError(self.name, self.landmark_source, f"no landmarks for image {idx}", rec.origin)
        return pts

    # ---- params -----------------------------------------------------------------------------
    def condition_desc(self) -> str:
        s = self.options.canny_sigma
        if self.variant == "edge":
            return (f"CoCosNet 15-ch edges from CelebAMask-HQ part masks: boundaries + canny(sigma={s}) on "
                    "background/hair, 13 part distance maps (L1/3), boundaries")
        if self.variant == "edge_landmarks":
            return f"connected iBUG-68 landmarks on the face + canny(sigma={s}) outside it, 1 channel"
        return "one-hot of 19 CelebAMask-HQ classes in CoCosNet's order, glasses in channel 16"

    def extra_params(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.variant in ("edge", "edge_landmarks"):
            out["edge_method"] = "canny" if self.variant == "edge" else "canny+landmarks"
            out["canny_sigma"] = self.options.canny_sigma
        if self.landmark_source is not None:
            out["landmarks"] = str(self.landmark_source)
        if self.variant == "mask":
            sources = [self._mask_source(r) for r in self.records]
            out["mask_sources"] = ", ".join(f"{s}={sources.count(s)}" for s in sorted(set(sources)))
            if self.merged_dir is not None:
                out["merged_labels"] = f"{self.merged_dir} ({self.options.merged_label_order} order)"
        return out


def _parse_landmark_json(path: Path) -> Dict[str, np.ndarray]:
    """Landmarks from JSON: ``{"<id>": [[x, y], ...68]}`` or the 1-based keyed form
    ``{"landmarks": {"<id>": {"1": [x, y, ...], ...}}}`` (keys above 68 are ignored)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"dataset 'celebahq': landmark file {path} cannot be read: {exc}") from None
    table = doc.get("landmarks", doc) if isinstance(doc, dict) else None
    if not isinstance(table, dict):
        raise DatasetError(f"dataset 'celebahq': landmark file {path}: expected an object keyed by image id")
    out = {}
    for idx, entry in table.items():
        if idx.startswith("_"):
            continue
        pts = np.full((68, 2), np.nan)
        if isinstance(entry, dict):
            for k, v in entry.items():
                if k.isdigit() and 1 <= int(k) <= 68:
                    pts[int(k) - 1] = v[:2]
        elif isinstance(entry, list) and len(entry) >= 68:
            pts[:] = np.asarray([p[:2] for p in entry[:68]], dtype=np.float64)
        else:
            raise DatasetError(f"dataset 'celebahq': landmark file {path}: entry {idx!r} is neither 68 points "
                               "nor a {'1': [x, y], ...} object")
        out[str(int(idx)) if idx.isdigit() else idx] = pts
    return out
