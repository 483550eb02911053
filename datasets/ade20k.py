"""ADE20K (MIT Scene Parsing / ADEChallengeData2016): segmentation mask -> photo.

Layouts accepted (root = the folder named here):

* ``challenge``: ``ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.{jpg,png}``
  (the official release; root may be ADEChallengeData2016 or its parent);
* ``side_by_side``: ``{training,validation}/ADE_*.jpg`` with the ``.png`` next to it (CoCosNet's
  ``dataroot``, annotations moved next to the images).

Labels are 8-bit, 0 = "other objects", 1..150 = the classes of ``objectInfo150.txt``. As CoCosNet
does (``label_nc=150`` + dontcare), the condition is a 151-channel one-hot with class 0 kept as
channel 0 (SPADE instead moves 0 to the end; see reference quirk 10). Values above 150 are errors.

Exemplars (eval): ``ade20k_ref_test.txt`` lines ``ADE_val_x.jpg,ADE_train_y.jpg`` (first entry
used, exemplar looked up in the training folder as CoCosNet does); train ref lists are
``key,easy,...,hard``. Variant ``outdoor``: the ADE20K-outdoor subset of the SIMS protocol, which
is a list of image names this loader cannot derive: give it with ``options.subset_list``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from PIL import Image

from datasets._conditions import one_hot
from datasets._io import (BadSampleError, Condition, MissingRootError, RealDataset, RealOptions, Record,
                          check_label_range, check_same_size, decode, label_array, natural_key, open_header,
                          read_list, resize_label)
from datasets.registry import DATASETS

NUM_LABELS = 150  # classes 1..150; 0 = other


@dataclass
class ADE20KOptions(RealOptions):
    subset_list: Optional[str] = None  # variant "outdoor": file with one image name per line (the SIMS subset)


@DATASETS.register("ade20k")
class ADE20KDataset(RealDataset):
    """ADE20K mask -> photo, 151-channel one-hot condition (0 = other)."""

    Options = ADE20KOptions
    variants = ("full", "outdoor")
    name = "ade20k"
    ref_list_names = ("ade20k_ref.txt", "ade20k_ref_test.txt")
    root_hint = ("expected ADEChallengeData2016/{images,annotations}/{training,validation} or "
                 "{training,validation}/ADE_*.jpg+png side by side")
    cond_channels = NUM_LABELS + 1
    num_classes = NUM_LABELS + 1

    def _setup(self) -> None:
        root = self.root
        if (root / "ADEChallengeData2016").is_dir() and not (root / "images").is_dir():
            root = root / "ADEChallengeData2016"
        if (root / "images").is_dir() and (root / "annotations").is_dir():
            self.layout, self.data_root = "challenge", root
        elif (root / "training").is_dir() or (root / "validation").is_dir():
            self.layout, self.data_root = "side_by_side", root
        else:
            raise MissingRootError(f"dataset 'ade20k': {self.root} has no ADE20K layout ({self.root_hint}). "
                                   "See docs/datasets.md.")
        self.subset = self._read_subset() if self.variant == "outdoor" else None

    def _search_dirs(self) -> List[Path]:
        dirs = super()._search_dirs()
        return dirs + [self.data_root.parent / "data"] if self.data_root != self.root else dirs

    def _read_subset(self) -> Dict[str, Any]:
        if not self.options.subset_list:
            raise MissingRootError(
                "dataset 'ade20k' variant 'outdoor' (the SIMS protocol's ADE20K-outdoor subset) needs the list of "
                "its image names, one per line, in options.subset_list; the subset cannot be derived from the "
                "ADEChallengeData2016 files. See docs/datasets.md.")
        path = self.find_list(self.options.subset_list, "", "outdoor subset list", "subset_list")
        names = {}
        for fields, where in read_list(self.name, path, sep=None):
            names[Path(fields[0].replace("\\", "/")).stem] = where
        self.subset_path = path
        return names

    def _folder(self, split: str) -> str:
        return "training" if split == "train" else "validation"

    def _scan(self, split: str) -> Tuple[List[Record], str]:
        folder = self._folder(split)
        if self.layout == "challenge":
            img_dir = self.data_root / "images" / folder
            ann_dir = self.data_root / "annotations" / folder
        else:
            img_dir = ann_dir = self.data_root / folder
        if not img_dir.is_dir():
            raise MissingRootError(f"dataset 'ade20k': split {split!r} folder {img_dir} does not exist")
        images = sorted((p for p in img_dir.iterdir() if p.suffix.lower() == ".jpg"), key=lambda p: natural_key(p.name))
        records = [Record(key=p.name, image=p, files={"label": ann_dir / (p.stem + ".png")}) for p in images]
        if self.subset is not None:
            records = self._apply_subset(records, split, img_dir)
        return records, str(img_dir)

    def _apply_subset(self, records: List[Record], split: str, img_dir: Path) -> List[Record]:
        """Keep the listed images; a listed name of this split that is not on disk is a bad sample."""
        by_stem = {r.image.stem: r for r in records}
        tag = "_train_" if split == "train" else "_val_"
        kept = []
        for stem, where in self.subset.items():
            if stem in by_stem:
                rec = by_stem[stem]
                kept.append(Record(rec.key, rec.image, rec.files, origin=where))
            elif tag in stem:  # names of the other split are simply not part of this one
                kept.append(Record(stem + ".jpg", img_dir / (stem + ".jpg"), {}, origin=where, data={"missing": True}))
        return sorted(kept, key=lambda r: natural_key(r.key))

    def _check(self, rec: Record, full: bool) -> None:
        label_path = rec.files.get("label")
        if rec.data.get("missing") or label_path is None:
            raise BadSampleError(self.name, rec.image, "file not found", rec.origin)
        img = decode(self.name, rec.image, rec.origin) if full else open_header(self.name, rec.image, rec.origin)
        lab = decode(self.name, label_path, rec.origin) if full else open_header(self.name, label_path, rec.origin)
        check_same_size(self.name, rec.image, img.size, label_path, lab.size, rec.origin)
        if full:
            check_label_range(self.name, label_path, label_array(self.name, label_path, lab, rec.origin), NUM_LABELS,
                              origin=rec.origin)

    def _condition(self, rec: Record, img: Image.Image) -> Condition:
        label_path = rec.files["label"]
        lab_img = decode(self.name, label_path, rec.origin)
        check_same_size(self.name, rec.image, img.size, label_path, lab_img.size, rec.origin)
        label = label_array(self.name, label_path, lab_img, rec.origin)
        check_label_range(self.name, label_path, label, NUM_LABELS, origin=rec.origin)
        label = resize_label(label, self.resolution)
        return Condition(one_hot(label, self.num_classes), label)

    def condition_desc(self) -> str:
        return "one-hot of the 0..150 label map (151 channels, 0 = other), NEAREST resize"

    def extra_params(self) -> Dict[str, Any]:
        if self.subset is None:
            return {}
        return {"subset": "SIMS ADE20K-outdoor", "subset_list": str(self.subset_path), "subset_names": len(self.subset)}
