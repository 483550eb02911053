"""LSUN-Churches (church_outdoor) with ADE20K-150 segmentation maps: mask -> photo.

Layouts accepted:

* ``midms`` (MIDMs ``data/lsun_church_dataset.py``): ``{training,validation}/<key>.jpg`` with the
  mask ``<key>.png`` next to it; the eval exemplars come from the validation folder as there.
* ``fewshot`` (Fewshot-SMIS ``data/LSUNchurch``): ``{train,test}/images/<n>.png`` and
  ``{train,test}/labels/<n>.png``.

Masks hold 0-indexed ADE20K-150 classes (0 wall, 1 building, 2 sky, ...) and 255 = don't care,
which MIDMs maps to class 150 (``label_nc=150`` + dontcare): a 151-channel one-hot. Values
150..254 are errors. How MIDMs produced its masks is not published; the Fewshot-SMIS masks use
the same encoding (network predictions).

Eval exemplars: ``lsun_church_ref_test.txt`` (300 lines ``key.jpg,ref1.jpg,ref2.jpg``; first used).
"""
from __future__ import annotations

from typing import List, Tuple

from PIL import Image

from datasets._conditions import one_hot
from datasets._io import (Condition, MissingRootError, RealDataset, Record, check_label_range, check_same_size,
                          decode, label_array, natural_key, open_header, resize_label)
from datasets.registry import DATASETS

NUM_LABELS = 150  # 0..149
DONTCARE = 255


@DATASETS.register("lsun_church")
class LSUNChurchDataset(RealDataset):
    """LSUN church_outdoor mask -> photo, 151 channels (150 ADE classes + don't care)."""

    variants = ("default",)
    name = "lsun_church"
    ref_list_names = ("lsun_church_ref.txt", "lsun_church_ref_test.txt")
    root_hint = "expected {training,validation}/<key>.jpg + <key>.png (MIDMs) or {train,test}/{images,labels}/ (Fewshot-SMIS)"
    cond_channels = NUM_LABELS + 1
    num_classes = NUM_LABELS + 1

    def _setup(self) -> None:
        r = self.root
        if (r / "training").is_dir() or (r / "validation").is_dir():
            self.layout = "midms"
        elif (r / "train" / "images").is_dir() or (r / "test" / "images").is_dir():
            self.layout = "fewshot"
        else:
            raise MissingRootError(f"dataset 'lsun_church': {r} has no LSUN-Churches layout ({self.root_hint}). "
                                   "See docs/datasets.md.")

    def _scan(self, split: str) -> Tuple[List[Record], str]:
        if self.layout == "midms":
            img_dir = lab_dir = self.root / ("training" if split == "train" else "validation")
            suffix = ".jpg"
        else:
            base = self.root / ("train" if split == "train" else "test")
            img_dir, lab_dir, suffix = base / "images", base / "labels", ".png"
        if not img_dir.is_dir():
            raise MissingRootError(f"dataset 'lsun_church': split {split!r} folder {img_dir} does not exist")
        images = sorted((p for p in img_dir.iterdir() if p.suffix.lower() == suffix), key=lambda p: natural_key(p.name))
        return [Record(p.name, p, {"label": lab_dir / (p.stem + ".png")}) for p in images], str(img_dir)

    def _check(self, rec: Record, full: bool) -> None:
        label_path = rec.files["label"]
        opener = decode if full else open_header
        img = opener(self.name, rec.image, rec.origin)
        lab = opener(self.name, label_path, rec.origin)
        check_same_size(self.name, rec.image, img.size, label_path, lab.size, rec.origin)
        if full:
            label = label_array(self.name, label_path, lab, rec.origin)
            check_label_range(self.name, label_path, label, NUM_LABELS - 1, extra=(DONTCARE,), origin=rec.origin)

    def _condition(self, rec: Record, img: Image.Image) -> Condition:
        label_path = rec.files["label"]
        lab_img = decode(self.name, label_path, rec.origin)
        check_same_size(self.name, rec.image, img.size, label_path, lab_img.size, rec.origin)
        label = label_array(self.name, label_path, lab_img, rec.origin)
        check_label_range(self.name, label_path, label, NUM_LABELS - 1, extra=(DONTCARE,), origin=rec.origin)
        label = resize_label(label, self.resolution)
        label[label == DONTCARE] = NUM_LABELS
        return Condition(one_hot(label, self.num_classes), label)

    def condition_desc(self) -> str:
        return "one-hot of the 0..149 ADE-150 label map, 255 -> 150 (don't care): 151 channels, NEAREST resize"
