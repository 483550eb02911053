"""DeepFashion pose -> person: In-shop (256x256) and DeepFashion-HD (CoCosNet v2, padded to square).

Layouts accepted (root = the ``DeepFashion`` folder):

* ``cocosnet``: ``img/<MEN|WOMEN>/<cat>/<id>/<n>_<view>.jpg``, OpenPose output
  ``pose/.../<n>_<view>_candidate.txt`` + ``_subset.txt`` (pytorch-openpose, ``np.savetxt``:
  candidate K x 4 ``x y score id``; subset 20 values per person: 18 COCO-18 candidate indices or
  -1, total score, part count), split lists ``train.txt`` / ``val.txt`` with lines such as
  ``img\\WOMEN\\Dresses\\id_00000244\\02_1_front.jpg`` (Windows separators, as released).
  Keypoints may instead come from a Pose-Transfer CSV (``options.keypoints_csv``).
* ``pose_transfer`` (Pose-Transfer / PATN / ADGAN): ``{train,test}/<flat name>.jpg`` (176x256 crops)
  and ``fasion-resize-annotation-{train,test}.csv`` (or ``fasion-annotation-*``): ``name:keypoints_y:
  keypoints_x`` with 18 y and 18 x values, -1 = missing. The rows are the split.

Condition: 20 channels, the CoCosNet rendering (``_conditions.pose_condition``). Variants:

* ``inshop``: keypoints in the photo's pixels; a non-square photo (the 176-wide Pose-Transfer
  crops) is padded back to a square (40 px a side restores the 256 frame); stick width 4.
* ``hd``: DeepFashion-HD as CoCosNet v2: 750x1101 photos padded horizontally to 1101x1101 with
  value 232 (``data/preprocess.py``), keypoints on the 1024x1024 canvas of the padded photo,
  stick width and circle radius 20.

Exemplars: ``deepfashion_ref_test.txt`` / ``deepfashion_ref.txt`` (retrieved, other people) or,
with ``self_pair``, ``deepfashion_self_pair.txt`` (``key,other pose,...`` of the same person; the
Pose-Transfer ``fasion-resize-pairs-*.csv`` ``from,to`` pairs are read as such too). With a same-
person exemplar the photo itself is the exact target.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from datasets._conditions import POSE_CHANNELS, PoseStyle, pose_condition
from datasets._io import (BadSampleError, Condition, DatasetError, ListLine, MissingRootError, RealDataset,
                          RealOptions, Record, decode, find_file, image_to_array, norm_key, open_header, pad_to_square,
                          read_list, resolve_option_path)
from datasets.registry import DATASETS

POSE_VERSION = 1
VARIANT_STYLE = {"inshop": PoseStyle(4, 4), "hd": PoseStyle(20, 20)}
VARIANT_PAD = {"inshop": 255, "hd": 232}  # hd: CoCosNet v2 preprocess.py; inshop: the white studio background
HD_CANVAS = 1024


@dataclass
class DeepFashionOptions(RealOptions):
    train_list: Optional[str] = None  # default train.txt in root, root/data or root/../data
    eval_list: Optional[str] = None  # default val.txt
    keypoints_csv: Optional[str] = None  # Pose-Transfer annotation CSV (name:keypoints_y:keypoints_x) instead of OpenPose files
    self_pair_list: Optional[str] = None  # default deepfashion_self_pair.txt (pose_transfer layout: fasion-resize-pairs-<split>.csv)
    pad_value: Optional[int] = None  # fill of the padding to square; None: 255 (inshop) / 232 (hd)
    pose_canvas: Optional[int] = None  # side of the square frame keypoints are in; None: padded photo (inshop) / 1024 (hd)


def flat_name(key: str) -> str:
    """Pose-Transfer's file name for an In-shop path (``tool/generate_fashion_datasets.py``):
    ``img/WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg`` -> ``fashionWOMENBlouses_Shirtsid0000000102_1front.jpg``."""
    parts = key.split("/")
    if parts and parts[0] == "img":
        parts = parts[1:]
    if len(parts) != 4:
        return Path(key).name
    gender, cat, ident, fname = parts
    head, *rest = fname.split("_")
    return "fashion" + gender + cat + ident.replace("_", "") + head + "_" + "".join(rest)


@DATASETS.register("deepfashion")
class DeepFashionDataset(RealDataset):
    """DeepFashion pose -> person, 20-channel OpenPose rendering (skeleton RGB + 17 limb distance maps)."""

    Options = DeepFashionOptions
    variants = ("inshop", "hd")
    name = "deepfashion"
    ref_list_names = ("deepfashion_ref.txt", "deepfashion_ref_test.txt")
    self_pair_name = "deepfashion_self_pair.txt"
    supported_policies = ("pseudo", "ref_list", "self_pair", "random")
    root_hint = "expected DeepFashion/{img,pose} with train.txt/val.txt, or {train,test}/ with fasion-*annotation-*.csv"
    cond_channels = POSE_CHANNELS

    def _setup(self) -> None:
        o = self.options
        if (self.root / "img").is_dir():
            self.layout = "cocosnet"
        elif any(self.root.glob("fasion-*annotation-*.csv")) or o.keypoints_csv:
            self.layout = "pose_transfer"
        else:
            raise MissingRootError(f"dataset 'deepfashion': {self.root} has no DeepFashion layout ({self.root_hint}). "
                                   "See docs/datasets.md.")
        self.style = VARIANT_STYLE[self.variant]
        self.pad_value = VARIANT_PAD[self.variant] if o.pad_value is None else int(o.pad_value)
        self.canvas = o.pose_canvas or (HD_CANVAS if self.variant == "hd" else None)
        self.csv_path: Optional[Path] = None
        self._csv: Dict[str, Tuple[np.ndarray, ListLine]] = {}
        if self.layout == "cocosnet" and o.keypoints_csv:
            self.csv_path = resolve_option_path(self.root, o.keypoints_csv)
            self._csv = self._read_csv(self.csv_path)

    # ---- keypoint CSV -----------------------------------------------------------------------
    def _annotation_csv(self, split: str) -> Path:
        if self.options.keypoints_csv:
            return resolve_option_path(self.root, self.options.keypoints_csv)
        tag = "train" if split == "train" else "test"
        names = [f"fasion-resize-annotation-{tag}.csv", f"fasion-annotation-{tag}.csv"]
        found = find_file([d / n for d in self._search_dirs() for n in names])
        if found is None:
            raise MissingRootError(f"dataset 'deepfashion': keypoint CSV for split {split!r} not found "
                                   f"({' or '.join(names)} in {self.root}); set options.keypoints_csv")
        return found

    def _read_csv(self, path: Path) -> Dict[str, Tuple[np.ndarray, ListLine]]:
        rows = read_list(self.name, path, sep=":")
        if not rows:
            raise DatasetError(f"dataset 'deepfashion': keypoint CSV {path} is empty")
        header, _ = rows[0]
        if [h.strip() for h in header] != ["name", "keypoints_y", "keypoints_x"]:
            raise DatasetError(f"dataset 'deepfashion': {path} line 1: expected the header 'name:keypoints_y:keypoints_x'")
        table = {}
        for fields, where in rows[1:]:
            if len(fields) != 3:
                raise DatasetError(f"dataset 'deepfashion': {where}: expected 'name:[18 y]:[18 x]'")
            try:
                ys, xs = json.loads(fields[1]), json.loads(fields[2])
            except ValueError:
                raise DatasetError(f"dataset 'deepfashion': {where}: keypoint lists are not valid JSON") from None
            if len(ys) != 18 or len(xs) != 18:
                raise DatasetError(f"dataset 'deepfashion': {where}: expected 18 y and 18 x values, got {len(ys)}/{len(xs)}")
            pts = np.stack([np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)], axis=1)
            pts[(pts[:, 0] == -1) | (pts[:, 1] == -1)] = np.nan
            table[fields[0]] = (pts, where)
        return table

    # ---- splits -----------------------------------------------------------------------------
    def _scan(self, split: str) -> Tuple[List[Record], str]:
        if self.layout == "pose_transfer":
            path = self._annotation_csv(split)
            table = self._read_csv(path)
            folder = self.root / ("train" if split == "train" else "test")
            records = [Record(name, folder / name, {}, origin=where, data={"kp": pts}) for name, (pts, where) in table.items()]
            return records, str(path)
        option = "train_list" if split == "train" else "eval_list"
        path = self.find_list(getattr(self.options, option), "train.txt" if split == "train" else "val.txt",
                              f"{split} list", option)
        return [self._record(self._norm_key(f[0]), where) for f, where in read_list(self.name, path, sep=None)], str(path)

    def _norm_key(self, name: str) -> str:
        key = norm_key(name)
        return key.split("DeepFashion/")[-1]  # lists may hold paths with the dataset folder (CoCosNet splits on it)

    def _record(self, key: str, where: Optional[ListLine]) -> Record:
        files = {}
        if not self._csv:
            stem = str(Path("pose", *Path(key).parts[1:]).with_suffix(""))
            files = {"candidate": self.root / f"{stem}_candidate.txt", "subset": self.root / f"{stem}_subset.txt"}
        return Record(key, self.root / key, files, origin=where)

    def _record_for_name(self, name: str, where: ListLine) -> Optional[Record]:
        if self.layout == "cocosnet":
            return self._record(name, where)
        for group in ("train", "eval"):
            rec = self._index(group).get(name)
            if rec is not None:
                return Record(rec.key, rec.image, rec.files, origin=where, data=rec.data)
        return None

    def _parse_pairs(self, path: Path) -> Dict[str, Tuple[List[str], ListLine]]:
        """Ref/self-pair lists; also Pose-Transfer's ``from,to`` pair CSV (exemplar = from, query = to)."""
        rows = read_list(self.name, path)
        if rows and [f.strip() for f in rows[0][0]] == ["from", "to"]:
            table: Dict[str, Tuple[List[str], ListLine]] = {}
            for fields, where in rows[1:]:
                if len(fields) != 2:
                    raise DatasetError(f"dataset 'deepfashion': {where}: expected 'from,to'")
                table.setdefault(fields[1], ([], where))[0].append(fields[0])
            return table
        return super()._parse_pairs(path)

    def _exemplar_table(self):
        if self.policy == "self_pair" and self.layout == "pose_transfer" and not self.options.self_pair_list:
            tag = "train" if self.is_train else "test"
            self.self_pair_name = f"fasion-resize-pairs-{tag}.csv"
        return super()._exemplar_table()

    def _exemplar_record(self, index: int, rng: np.random.Generator) -> Optional[Record]:
        """Train ref lists as CoCosNet reads DeepFashion's: the easy exemplar is the line's last entry,
        the hard one a random photo of the split (``get_ref_vgg``)."""
        if self.is_train and self.policy == "ref_list":
            if rng.random() < self.options.hard_reference_probability:
                return self.records[int(rng.integers(0, len(self.records)))]
            return self._plans[index][-1]
        return super()._exemplar_record(index, rng)

    # ---- keypoints --------------------------------------------------------------------------
    def keypoints(self, rec: Record) -> np.ndarray:
        """(18, 2) keypoints (x, y) in the frame they were annotated in, NaN where missing."""
        if "kp" in rec.data:
            return rec.data["kp"]
        if self._csv:
            entry = self._csv.get(flat_name(rec.key)) or self._csv.get(rec.key) or self._csv.get(Path(rec.key).name)
            if entry is None:
                raise BadSampleError(self.name, rec.image, f"no keypoints for it in {self.csv_path} "
                                     f"(looked for {flat_name(rec.key)!r})", rec.origin)
            rec.data["kp"] = entry[0]
        else:
            rec.data["kp"] = self._openpose(rec)
        return rec.data["kp"]

    def _openpose(self, rec: Record) -> np.ndarray:
        cand_path, sub_path = rec.files["candidate"], rec.files["subset"]
        candidate = self._loadtxt(cand_path, rec)
        subset = self._loadtxt(sub_path, rec)
        if candidate.size and candidate.shape[1] < 2:
            raise BadSampleError(self.name, cand_path, f"expected rows 'x y score id', got {candidate.shape[1]} column(s)",
                                 rec.origin)
        if subset.size == 0:
            raise BadSampleError(self.name, sub_path, "no person detected (empty subset)", rec.origin)
        if subset.shape[1] != 20:
            raise BadSampleError(self.name, sub_path, f"expected 20 values per person, got {subset.shape[1]}", rec.origin)
        person = subset[int(np.argmax(subset[:, 18]))]  # several people: the best-scoring one
        pts = np.full((18, 2), np.nan)
        for i in range(18):
            j = int(person[i])
            if j == -1:
                continue
            if not 0 <= j < len(candidate):
                raise BadSampleError(self.name, sub_path, f"keypoint {i} refers to candidate {j}, but "
                                     f"{cand_path.name} has {len(candidate)} rows", rec.origin)
            pts[i] = candidate[j, :2]
        return pts

    def _loadtxt(self, path: Path, rec: Record) -> np.ndarray:
        if not path.is_file():
            raise BadSampleError(self.name, path, "pose file not found", rec.origin)
        try:
            with warnings.catch_warnings():  # an empty file is reported below, not as a numpy warning
                warnings.simplefilter("ignore", UserWarning)
                arr = np.loadtxt(path, ndmin=2, dtype=np.float64)
        except ValueError as exc:
            raise BadSampleError(self.name, path, f"cannot parse as numbers: {exc}", rec.origin) from None
        if not np.isfinite(arr).all():
            raise BadSampleError(self.name, path, "contains non-finite values", rec.origin)
        return arr

    # ---- checks and samples -----------------------------------------------------------------
    def _check(self, rec: Record, full: bool) -> None:
        (decode if full else open_header)(self.name, rec.image, rec.origin)
        self.keypoints(rec)

    def _padded(self, img: Image.Image) -> Tuple[Image.Image, int, int]:
        return pad_to_square(img, self.pad_value)

    def _photo(self, rec: Record, img: Image.Image) -> np.ndarray:
        return image_to_array(self._padded(img)[0], self.resolution)

    def _condition(self, rec: Record, img: Image.Image) -> Condition:
        pts = self.keypoints(rec)
        side = max(img.size)
        ox, oy = (side - img.size[0]) // 2, (side - img.size[1]) // 2
        if self.canvas is None:  # keypoints in the photo's own pixels: shift them into the padded square
            canvas, frame = side, pts + np.array([ox, oy])
        else:
            canvas, frame = self.canvas, pts
        settings = {"r": self.resolution, "canvas": canvas, "stick": self.style.stickwidth, "radius": self.style.radius,
                    "points": [[None if not np.isfinite(v) else round(float(v), 4) for v in p] for p in frame]}
        maps = self.cache.get_or_compute("pose20", POSE_VERSION, [], settings,
                                         lambda: pose_condition(frame, (canvas, canvas), self.style, self.resolution))
        return Condition(maps.astype(np.float32) / 255.0)

    def cond_vis(self, cond: Condition) -> np.ndarray:
        return np.ascontiguousarray(cond.maps[:3].transpose(1, 2, 0))

    def condition_desc(self) -> str:
        src = "Pose-Transfer CSV" if (self.layout == "pose_transfer" or self._csv) else "OpenPose candidate/subset"
        canvas = f"{self.canvas}px canvas" if self.canvas else "photo-size canvas (padded square)"
        return (f"{src} keypoints -> CoCosNet pose map: skeleton RGB + 17 limb L1 distance maps (20 ch), "
                f"stick {self.style.stickwidth}/radius {self.style.radius} on a {canvas}")

    def extra_params(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"pad_value": self.pad_value}
        if self.csv_path is not None:
            out["keypoints_csv"] = str(self.csv_path)
        return out
