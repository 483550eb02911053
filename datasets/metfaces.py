"""MetFaces (NVlabs/metfaces-dataset): edge -> painted face.

Layout: ``images/<MetObjectID>-<nn>.png`` (1024x1024 RGB, 1336 files); ``options.image_dir``
names another folder. The official repos publish no MetFaces loader, split or edge files
(CoCosNet v2 issues #20/#24), so here:

* Edges are computed by the harness at the run's resolution. The paper used HED, whose weights
  (``network-bsds500.pytorch`` of sniklaus/pytorch-hed, BSDS500) must be supplied: variant ``hed``
  raises ``MissingWeightsError`` without them. The default variant ``canny`` is scikit-image Canny
  on the grey photo, recorded as such in the run's params (``edge_method``): it is not the paper's
  condition.
* The split is explicit: ``options.train_list`` / ``options.eval_list`` (file names), else a seeded
  shuffle of the sorted file names (``split_seed``) with ``eval_fraction`` of them for evaluation.
* Exemplars are random other faces of the split, seeded (the default for both splits).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from datasets._conditions import HED_FILE, HED_URL, canny, grey_uint8, hed_edges, load_hed
from datasets._io import (Condition, DatasetError, IMAGE_SUFFIXES, RealDataset, RealOptions, Record, decode,
                          image_to_array, natural_key, open_header, read_list, require_dir)
from datasets.registry import DATASETS

EDGE_VERSION = 1


@dataclass
class MetFacesOptions(RealOptions):
    train_exemplars: str = "random"
    eval_exemplars: str = "random"
    image_dir: str = "images"  # folder of the PNGs, relative to root
    train_list: Optional[str] = None  # file names of the train split (else the seeded split below)
    eval_list: Optional[str] = None
    split_seed: int = 0  # seeded split: fixed across trials, independent of the trial seed
    eval_fraction: float = 0.1  # seeded split: share of the files held out for evaluation (at least 1)
    canny_sigma: float = 2.0  # canny variant: Gaussian sigma at the run's resolution
    canny_low: Optional[float] = None  # canny thresholds (None: scikit-image defaults)
    canny_high: Optional[float] = None
    weights_dir: Optional[str] = None  # hed variant: folder holding network-bsds500.pytorch
    download_weights: bool = True  # hed variant: try the official URL when the file is absent


@DATASETS.register("metfaces")
class MetFacesDataset(RealDataset):
    """MetFaces edge -> face; Canny edges by default (named so), HED behind its weights file."""

    Options = MetFacesOptions
    variants = ("canny", "hed")
    name = "metfaces"
    ref_list_names = ("metfaces_ref.txt", "metfaces_ref_test.txt")
    root_hint = "expected <root>/images/*.png (MetFaces 1024x1024 PNGs)"
    layout = "metfaces"
    cond_channels = 1

    def _setup(self) -> None:
        o = self.options
        self.img_dir = require_dir(self.name, self.root / o.image_dir, "image folder", self.root_hint)
        if not 0.0 < o.eval_fraction < 1.0:
            raise ValueError("dataset 'metfaces': eval_fraction must be in (0, 1)")
        self.hed = None
        self.hed_provenance = ""
        if self.variant == "hed":
            self._load_hed()

    def _load_hed(self) -> None:
        """HED weights or a MissingWeightsError (never random weights: the edges would be noise)."""
        from methods.base import BackboneSettings
        from methods.common.weights import find_weights, provenance_of

        o = self.options
        settings = BackboneSettings(weights_dir=o.weights_dir, allow_untrained=False, download=o.download_weights)
        path = find_weights(HED_FILE, HED_URL, settings, "MetFaces HED edges (variant 'hed')")
        try:
            self.hed = load_hed(path)
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            raise DatasetError(f"dataset 'metfaces': HED weights {path} cannot be loaded: {exc}") from None
        self.hed_path = path
        self.hed_provenance = provenance_of(path, 0)

    # ---- split ------------------------------------------------------------------------------
    def _all_files(self) -> List[Path]:
        return sorted((p for p in self.img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                      key=lambda p: natural_key(p.name))

    def _scan(self, split: str) -> Tuple[List[Record], str]:
        o = self.options
        option = "train_list" if split == "train" else "eval_list"
        if getattr(o, option):
            path = self.find_list(getattr(o, option), "", f"{split} list", option)
            rows = read_list(self.name, path, sep=None)
            return [Record(Path(f[0]).name, self.img_dir / Path(f[0]).name, origin=w) for f, w in rows], str(path)
        files = self._all_files()
        if len(files) < 2:
            raise DatasetError(f"dataset 'metfaces': {self.img_dir} holds {len(files)} image(s); a train/eval "
                               "split needs at least 2")
        order = np.random.default_rng(o.split_seed).permutation(len(files))
        n_eval = max(1, int(round(len(files) * o.eval_fraction)))
        chosen = order[:n_eval] if split != "train" else order[n_eval:]
        picked = [files[i] for i in sorted(chosen)]
        desc = (f"seeded split of {len(files)} files in {self.img_dir} (split_seed={o.split_seed}, "
                f"eval_fraction={o.eval_fraction}: {n_eval} eval / {len(files) - n_eval} train)")
        return [Record(p.name, p) for p in picked], desc

    # ---- samples ----------------------------------------------------------------------------
    def _check(self, rec: Record, full: bool) -> None:
        (decode if full else open_header)(self.name, rec.image, rec.origin)

    def _condition(self, rec: Record, img: Image.Image) -> Condition:
        r, o = self.resolution, self.options
        if self.variant == "canny":
            settings = {"r": r, "sigma": o.canny_sigma, "low": o.canny_low, "high": o.canny_high}
            maps = self.cache.get_or_compute(
                "metfaces_canny", EDGE_VERSION, [rec.image], settings,
                lambda: canny(grey_uint8(img, r, Image.BICUBIC), o.canny_sigma, o.canny_low, o.canny_high)
                .astype(np.uint8)[None] * 255)
        else:
            settings = {"r": r, "weights": self.hed_provenance}
            maps = self.cache.get_or_compute("metfaces_hed", EDGE_VERSION, [rec.image], settings,
                                             lambda: hed_edges(self.hed, image_to_array(img, r)))
        return Condition(maps.astype(np.float32) / 255.0)

    def condition_desc(self) -> str:
        o = self.options
        if self.variant == "canny":
            return (f"canny(sigma={o.canny_sigma}, low={o.canny_low}, high={o.canny_high}; None = skimage default) "
                    "on the grey photo at the run's resolution - not the paper's HED")
        return f"HED (BSDS500 weights {self.hed_provenance}) edge probability at the run's resolution"

    def extra_params(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"edge_method": self.variant}
        if self.variant == "hed":
            out["hed_weights"] = f"{self.hed_path} ({self.hed_provenance})"
        return out
