"""Reading real datasets safely, and the loader the five real datasets share.

* Errors: every failure that comes from the data on disk is a ``DatasetError`` whose message names
  the offending file and, when it came from a list, the list file and line number. The harness
  prints these as they are, so PIL/numpy exceptions are caught here and re-raised with the file
  named (no bare tracebacks).
* Readers: images (header-only or fully decoded), label maps (mode and range checks), part masks;
  list files with line numbers; resizing and padding.
* ``SkipLog``: with ``skip_bad`` a bad sample is recorded as (file, reason) instead of raised.
* ``RealDataset``: scanning a split -> checking each sample (skip or raise) -> resolving its
  exemplar from the ref / self-pair list -> building sample dicts (pseudo exemplars, caching).
  Dataset modules only describe their layout and condition through its hooks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from datasets._cache import PrepCache, file_digest
from datasets._conditions import first_channel_vis, label_palette, one_hot
from datasets._pseudo import PseudoSettings, correspondence, sample_transform, sampling_grid, warp
from datasets.base import DataInfo, DatasetSpec, ExemplarDataset

T = TypeVar("T")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ---- errors ---------------------------------------------------------------------------------
class DatasetError(Exception):
    """A problem with a dataset on disk; the message is meant for the user as is."""


class MissingRootError(DatasetError, FileNotFoundError):
    """The dataset root (or a folder the layout needs) does not exist."""


@dataclass(frozen=True)
class ListLine:
    """Where a sample was named: a list file and a 1-based line number."""

    path: Path
    lineno: int

    def __str__(self) -> str:
        return f"{self.path} line {self.lineno}"


class BadSampleError(DatasetError):
    """One sample cannot be used; names the file, the reason and the list line it came from."""

    def __init__(self, dataset: str, file: Path | str, reason: str, origin: Optional[ListLine] = None):
        self.dataset = dataset
        self.file = str(file)
        self.reason = reason
        self.origin = origin
        super().__init__(self.describe())

    def describe(self) -> str:
        where = f" (listed in {self.origin})" if self.origin is not None else ""
        return f"dataset {self.dataset!r}: {self.file}: {self.reason}{where}"


def require_dir(dataset: str, path: Path, what: str, hint: str = "") -> Path:
    """``path`` if it is a directory, else a ``MissingRootError`` naming it and what it should hold."""
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        more = f"\n  {hint}" if hint else ""
        raise MissingRootError(f"dataset {dataset!r}: {what} {path} {state}.{more}\n  See docs/datasets.md.")
    return path


def require_root(dataset: str, root: Optional[str], hint: str) -> Path:
    """The dataset root as a Path; a clear error when it is unset or missing."""
    if not root:
        raise MissingRootError(f"dataset {dataset!r} needs a root folder (spec.root); {hint}. See docs/datasets.md.")
    return require_dir(dataset, Path(root).expanduser(), "root", hint)


# ---- lists ----------------------------------------------------------------------------------
def read_list(dataset: str, path: Path, sep: Optional[str] = ",") -> List[Tuple[List[str], ListLine]]:
    """Rows of a list file as (fields, where) pairs; blank lines and ``#`` comments are skipped.

    Tolerates what the official lists contain: CRLF endings, a UTF-8 BOM and trailing spaces.
    ``sep=None`` keeps each line as one field.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MissingRootError(f"dataset {dataset!r}: list file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset {dataset!r}: list file {path} cannot be read: {exc}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [line] if sep is None else [f.strip() for f in line.split(sep)]
        rows.append((fields, ListLine(path, n)))
    return rows


def norm_key(name: str) -> str:
    """A list entry as a forward-slash relative path (the official lists use Windows backslashes)."""
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def natural_key(text: str) -> list:
    """Sort key that orders ``ADE_val_2`` before ``ADE_val_10`` (what the official code does)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def find_file(candidates: Sequence[Path]) -> Optional[Path]:
    """The first existing file of ``candidates``."""
    for c in candidates:
        if c.is_file():
            return c
    return None


def resolve_option_path(root: Path, value: str) -> Path:
    """An option naming a file: absolute as is, else relative to the root when it exists there."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    return root / p if (root / p).exists() else p.resolve()


# ---- images and labels ----------------------------------------------------------------------
def _bad(dataset: str, path: Path, reason: str, origin: Optional[ListLine]) -> BadSampleError:
    return BadSampleError(dataset, path, reason, origin)


def open_header(dataset: str, path: Path, origin: Optional[ListLine] = None) -> Image.Image:
    """Open an image lazily (reads the header only): existence and format are checked, pixels are not."""
    if not path.is_file():
        raise _bad(dataset, path, "file not found", origin)
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise _bad(dataset, path, "not a readable image (unknown or corrupt format)", origin) from None
    except OSError as exc:
        raise _bad(dataset, path, f"corrupt or truncated image (header unreadable): {exc}", origin) from None


def decode(dataset: str, path: Path, origin: Optional[ListLine] = None) -> Image.Image:
    """Open and fully decode an image, so truncated or corrupt pixel data is reported here."""
    img = open_header(dataset, path, origin)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise _bad(dataset, path, f"corrupt or truncated image data: {exc}", origin) from None
    return img


def read_rgb(dataset: str, path: Path, origin: Optional[ListLine] = None) -> Image.Image:
    """A decoded RGB image."""
    img = decode(dataset, path, origin)
    return img if img.mode == "RGB" else img.convert("RGB")


def label_array(dataset: str, path: Path, img: Image.Image, origin: Optional[ListLine] = None) -> np.ndarray:
    """The class indices of a label PNG as a 2-D array.

    Accepted: single-channel modes (L, P: palette indices are the labels, I;16, I) and RGB whose three
    channels are equal (a grey map saved as RGB). A colour-coded RGB map is rejected: its colours are
    not class indices.
    """
    if img.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        return np.asarray(img).astype(np.int64)
    if img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img)[..., :3]
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
            return arr[..., 0].astype(np.int64)
        raise _bad(dataset, path, "label map is colour (RGB) but class indices must be single-channel (mode L)", origin)
    raise _bad(dataset, path, f"label map has unsupported image mode {img.mode!r}", origin)


def check_label_range(dataset: str, path: Path, label: np.ndarray, max_value: int, extra: Iterable[int] = (),
                      origin: Optional[ListLine] = None) -> None:
    """Reject label values above ``max_value`` (other than the allowed ``extra`` values, e.g. 255)."""
    bad = label > max_value
    for v in extra:
        bad &= label != v
    if bad.any():
        values = np.unique(label[bad])[:5].tolist()
        allowed = f"0..{max_value}" + "".join(f", {v}" for v in extra)
        raise _bad(dataset, path, f"label value(s) {values} out of range (allowed {allowed})", origin)


def check_same_size(dataset: str, image: Path, image_size: Tuple[int, int], other: Path,
                    other_size: Tuple[int, int], origin: Optional[ListLine] = None) -> None:
    """Image and its label map must have the same size (they are paired pixel by pixel)."""
    if tuple(image_size) != tuple(other_size):
        raise _bad(dataset, other, f"size {other_size[0]}x{other_size[1]} does not match its image {image} "
                   f"({image_size[0]}x{image_size[1]})", origin)


def read_binary_mask(dataset: str, path: Path, size: int, origin: Optional[ListLine] = None) -> np.ndarray:
    """A 0/255 part mask (CelebAMask-HQ stores them as RGB) resized NEAREST to ``size``; True = part."""
    img = decode(dataset, path, origin).convert("L")
    img = img.resize((size, size), resample=Image.NEAREST)
    return np.asarray(img) == 255


# ---- resizing helpers ----------------------------------------------------------------------
def pad_to_square(img: Image.Image, value: int) -> Tuple[Image.Image, int, int]:
    """Pad the short side symmetrically (left/top gets the floor half, as DeepFashion-HD's preprocess does).

    Returns the padded image and the (x, y) offset of the original inside it.
    """
    w, h = img.size
    if w == h:
        return img, 0, 0
    side = max(w, h)
    ox, oy = (side - w) // 2, (side - h) // 2
    canvas = Image.new(img.mode, (side, side), (value,) * len(img.getbands()) if len(img.getbands()) > 1 else value)
    canvas.paste(img, (ox, oy))
    return canvas, ox, oy


def image_to_array(img: Image.Image, resolution: int, resample: int = Image.BICUBIC) -> np.ndarray:
    """RGB image -> (H, W, 3) float32 in [0, 1] at ``resolution`` x ``resolution`` (aspect not kept,
    as the official ``resize_and_crop`` with load size = crop size does)."""
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), resample=resample)
    return np.asarray(img, dtype=np.float32) / 255.0


def resize_label(label: np.ndarray, resolution: int) -> np.ndarray:
    """Nearest-neighbour resize of a class map (values preserved)."""
    if label.shape == (resolution, resolution):
        return label
    h, w = label.shape
    rows = np.minimum((np.arange(resolution) + 0.5) * h / resolution, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(resolution) + 0.5) * w / resolution, w - 1).astype(np.int64)
    return label[rows][:, cols]


# ---- skip-bad bookkeeping -------------------------------------------------------------------
@dataclass
class SkipLog:
    """Collects bad samples when ``skip_bad`` is on; re-raises them when it is off."""

    skip_bad: bool
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def attempt(self, fn: Callable[[], T]) -> Optional[T]:
        """``fn()``; on ``BadSampleError`` record and return None (skip_bad) or re-raise."""
        try:
            return fn()
        except BadSampleError as exc:
            if not self.skip_bad:
                raise
            where = f" (listed in {exc.origin})" if exc.origin is not None else ""
            self.skipped.append((exc.file, exc.reason + where))
            return None

    def summary(self, limit: int = 3) -> str:
        """Short text for run params: the count and the first few files."""
        if not self.skipped:
            return "0"
        head = "; ".join(f"{Path(f).name}: {r}" for f, r in self.skipped[:limit])
        more = f"; ... {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"{len(self.skipped)}: {head}{more}"


# ---- the shared real-dataset loader ---------------------------------------------------------

SPLITS = ("train", "val", "test")
EXEMPLAR_POLICIES = ("pseudo", "ref_list", "self_pair", "random")
VALIDATE_MODES = ("auto", "full", "header")
CHECK_VERSION = 1


@dataclass
class RealOptions:
    """Options every real dataset takes (dataset modules add their own fields)."""

    # Where the exemplar of a sample comes from, per split: "pseudo" (the photo itself, flipped /
    # cropped / warped; exact target known), "ref_list" (the official key,easy,...,hard lists),
    # "self_pair" (DeepFashion: same person, other pose) or "random" (another sample, seeded).
    train_exemplars: str = "pseudo"
    eval_exemplars: str = "ref_list"
    train_ref_list: Optional[str] = None  # None: the dataset's official file name, searched in root, root/data, root/../data
    eval_ref_list: Optional[str] = None
    hard_reference_probability: float = 0.2  # train ref lists: chance of the last (hard) entry instead of the first (CoCosNet default)
    # "full" decodes every file at construction (finds corrupt files and bad label values up front, so
    # skip_bad can skip them); "header" only checks presence, format and sizes; "auto" = full iff skip_bad.
    validate: str = "auto"
    cache: bool = True  # reuse preprocessed condition maps (content-hash keyed)
    cache_dir: Optional[str] = None  # default $BENCH_DATA_CACHE or <repo>/.cache/datasets
    pseudo_flip: float = 0.5  # pseudo exemplars: flip probability
    pseudo_min_crop: float = 0.8  # pseudo exemplars: smallest crop side (fraction)
    pseudo_grid: int = 4  # pseudo exemplars: piecewise-affine grid cells per side
    pseudo_jitter: float = 0.25  # pseudo exemplars: control-point jitter (fraction of a cell, < 0.5)


@dataclass
class Record:
    """One photo and the files its condition is built from."""

    key: str  # the name the ref lists use for it
    image: Path
    files: Dict[str, Path] = field(default_factory=dict)  # condition sources by role
    origin: Optional[ListLine] = None  # list line that named it (None: found by listing a folder)
    data: Dict[str, Any] = field(default_factory=dict)  # parsed extras (e.g. CSV keypoints)


@dataclass
class Condition:
    maps: np.ndarray  # (C, H, W) float32 in [0, 1]: what the method sees
    label: Optional[np.ndarray] = None  # (H, W) int64 class map, for label-map conditions


class RealDataset(ExemplarDataset):
    """Base of the on-disk datasets. Subclasses implement the hooks marked "hook"."""

    Options = RealOptions
    name: str = ""
    ref_list_names: Tuple[str, str] = ("", "")  # official (train, eval) ref list file names
    self_pair_name: str = ""
    supported_policies: Tuple[str, ...] = ("pseudo", "ref_list", "random")
    root_hint: str = ""
    cond_channels: int = 0
    num_classes: Optional[int] = None
    layout: str = ""

    def __init__(self, spec: DatasetSpec, split: str, resolution: int, seed: int = 0):
        super().__init__(spec, split, resolution, seed)
        if split not in SPLITS:
            raise ValueError(f"dataset {self.name!r}: unknown split {split!r}; choose one of {list(SPLITS)}")
        if resolution < 8:
            raise ValueError(f"dataset {self.name!r}: resolution must be >= 8, got {resolution}")
        o = self.options
        self.is_train = split == "train"
        self.root = require_root(self.name, spec.root, self.root_hint)
        self.cache = PrepCache(Path(o.cache_dir).expanduser() if o.cache_dir else None, enabled=o.cache)
        self.policy = o.train_exemplars if self.is_train else o.eval_exemplars
        self._check_choice("train_exemplars", o.train_exemplars, self.supported_policies)
        self._check_choice("eval_exemplars", o.eval_exemplars, self.supported_policies)
        self._check_choice("validate", o.validate, VALIDATE_MODES)
        if not 0.0 <= o.hard_reference_probability <= 1.0:
            raise ValueError(f"dataset {self.name!r}: hard_reference_probability must be in [0, 1]")
        self.pseudo = PseudoSettings(o.pseudo_flip, o.pseudo_min_crop, o.pseudo_grid, o.pseudo_jitter)
        self.full_check = o.validate == "full" or (o.validate == "auto" and spec.skip_bad)
        self._log = SkipLog(spec.skip_bad)
        self._indexes: Dict[str, Dict[str, Record]] = {}
        self._checked: set = set()
        self._setup()
        records, self.split_source = self._scan(split)
        self._indexes[self._split_group(split)] = {r.key: r for r in records}
        self.ref_source: Optional[Path] = None
        self._table = self._exemplar_table()
        self.records, self._plans = self._select(records)
        self.skipped: List[Tuple[str, str]] = self._log.skipped
        if not self.records:
            raise DatasetError(f"dataset {self.name!r}: split {split!r} has no usable samples "
                               f"({len(records)} listed in {self.split_source}, {len(self.skipped)} skipped: "
                               f"{self._log.summary()})")
        self.palette = label_palette(self.num_classes) if self.num_classes else None
        self.info = DataInfo(
            name=self.name, variant=self.variant, split=split, size=len(self.records), resolution=resolution,
            cond_channels=self.cond_channels, num_classes=self.num_classes,
            has_target=self.policy in ("pseudo", "self_pair"), has_corr=self.policy == "pseudo",
            params=self._params(len(records)),
        )

    # ---- hooks ------------------------------------------------------------------------------
    def _setup(self) -> None:
        """hook: detect the layout, set ``layout``, ``cond_channels``, ``num_classes`` for the variant."""

    def _scan(self, split: str) -> Tuple[List[Record], str]:
        """hook: the split's records in order, and a description of where they were listed."""
        raise NotImplementedError

    def _check(self, rec: Record, full: bool) -> None:
        """hook: raise BadSampleError if the record is unusable (full: decode everything)."""
        raise NotImplementedError

    def _condition(self, rec: Record, img: Image.Image) -> Condition:
        """hook: the condition at ``self.resolution`` (``img`` is the decoded RGB photo)."""
        raise NotImplementedError

    def condition_desc(self) -> str:
        """hook: how the condition is built, for the run's params."""
        return ""

    def extra_params(self) -> Dict[str, Any]:
        """hook: dataset-specific params."""
        return {}

    def _photo(self, rec: Record, img: Image.Image) -> np.ndarray:
        """hook: the photo as (R, R, 3) float32 in [0, 1]."""
        return image_to_array(img, self.resolution)

    def _files(self, rec: Record) -> List[Path]:
        """hook: every file the sample is built from (hashed for the check verdicts)."""
        return [rec.image] + [p for p in rec.files.values() if p.is_file()]

    def _norm_key(self, name: str) -> str:
        """hook: a ref-list entry in the form of ``Record.key``."""
        return norm_key(name)

    def _split_group(self, split: str) -> str:
        return "train" if split == "train" else "eval"

    # ---- construction -----------------------------------------------------------------------
    def _check_choice(self, option: str, value: str, allowed: Sequence[str]) -> None:
        if value not in allowed:
            raise ValueError(f"dataset {self.name!r}: options.{option}={value!r}; choose one of {list(allowed)}")

    def _search_dirs(self) -> List[Path]:
        return [self.root, self.root / "data", self.root.parent / "data"]

    def find_list(self, option_value: Optional[str], default_name: str, what: str, option: str) -> Path:
        """A list file: the option's path, else the official name in root, root/data or root/../data."""
        if option_value:
            path = resolve_option_path(self.root, option_value)
            if not path.is_file():
                raise MissingRootError(f"dataset {self.name!r}: {what} {path} (options.{option}) does not exist")
            return path
        dirs = self._search_dirs()
        found = find_file([d / default_name for d in dirs]) if default_name else None
        if found is None:
            looked = ", ".join(str(d) for d in dirs)
            raise MissingRootError(f"dataset {self.name!r}: {what} {default_name!r} not found (looked in {looked}); "
                                   f"set options.{option} to its path")
        return found

    def _exemplar_table(self) -> Dict[str, Tuple[List[str], ListLine]]:
        """key -> (exemplar names, list line) for the ref_list and self_pair policies."""
        if self.policy == "ref_list":
            option = "train_ref_list" if self.is_train else "eval_ref_list"
            default = self.ref_list_names[0 if self.is_train else 1]
            alt = "pseudo" if self.is_train else "random"
            try:
                self.ref_source = self.find_list(getattr(self.options, option), default, "ref list", option)
            except MissingRootError as exc:
                policy_opt = "train_exemplars" if self.is_train else "eval_exemplars"
                raise MissingRootError(f"{exc}, or choose other exemplars (options.{policy_opt}: {alt})") from None
            return self._parse_pairs(self.ref_source)
        if self.policy == "self_pair":
            self.ref_source = self.find_list(getattr(self.options, "self_pair_list", None), self.self_pair_name,
                                             "self-pair list", "self_pair_list")
            return self._parse_pairs(self.ref_source)
        return {}

    def _parse_pairs(self, path: Path) -> Dict[str, Tuple[List[str], ListLine]]:
        table: Dict[str, Tuple[List[str], ListLine]] = {}
        for fields, where in read_list(self.name, path):
            names = [f for f in fields if f]
            if len(names) < 2:
                raise DatasetError(f"dataset {self.name!r}: {where}: expected 'key,exemplar[,...]', got {','.join(fields)!r}")
            table[self._norm_key(names[0])] = ([self._norm_key(n) for n in names[1:]], where)
        return table

    def _select(self, records: List[Record]) -> Tuple[List[Record], List[List[Record]]]:
        """Check records in order, skipping bad ones (skip_bad), up to ``max_samples``."""
        cap = self.spec.max_samples
        if cap is not None and cap < 1:
            raise ValueError(f"dataset {self.name!r}: max_samples must be >= 1, got {cap}")
        good, plans = [], []
        for rec in records:
            if cap is not None and len(good) >= cap:
                break
            plan = self._log.attempt(lambda: self._admit(rec))
            if plan is not None:
                good.append(rec)
                plans.append(plan)
        return good, plans

    def _admit(self, rec: Record) -> List[Record]:
        """Check a record and resolve its exemplar(s); returns the exemplar plan."""
        self.check_record(rec)
        if self.policy not in ("ref_list", "self_pair"):
            return []
        entry = self._table.get(rec.key)
        if entry is None:
            kind = "ref list" if self.policy == "ref_list" else "self-pair list"
            raise BadSampleError(self.name, rec.image, f"has no entry in the {kind} ({self.ref_source.name})", rec.origin)
        names, where = entry
        if self.policy == "ref_list":
            names = [names[0], names[-1]] if self.is_train else [names[0]]  # CoCosNet: easy/hard; test: first
        plan = []
        for n in dict.fromkeys(names):
            try:
                ex = self._lookup(n, where)
                self.check_record(ex)
            except BadSampleError as exc:  # say which query loses its exemplar
                raise BadSampleError(self.name, exc.file, f"{exc.reason} [exemplar of {rec.key}]", exc.origin) from None
            plan.append(ex)
        return plan

    def check_record(self, rec: Record) -> None:
        """Header checks always; full decoding when configured, remembered per file contents."""
        if rec.key in self._checked:
            return
        self._check(rec, full=False)
        if self.full_check:
            key = self.cache.key("check", CHECK_VERSION, self._files(rec),
                                 {"dataset": self.name, "variant": self.variant, "layout": self.layout})
            if not self.cache.passed(key):
                self._check(rec, full=True)
                self.cache.mark_passed(key)
        self._checked.add(rec.key)

    def _index(self, group: str) -> Dict[str, Record]:
        if group not in self._indexes:
            try:
                records, _ = self._scan("train" if group == "train" else "test")
            except DatasetError:
                records = []  # the other split may simply not be there
            self._indexes[group] = {r.key: r for r in records}
        return self._indexes[group]

    def _record_for_name(self, name: str, where: ListLine) -> Optional[Record]:
        """hook: build the record an exemplar name refers to directly (list-based layouts, where
        any image of the dataset may serve as exemplar); None: look it up in the split listings."""
        return None

    def _lookup(self, name: str, where: ListLine) -> Record:
        """The record an exemplar name refers to: built directly, else this split first, then the other one."""
        direct = self._record_for_name(name, where)
        if direct is not None:
            return direct
        own = self._split_group(self.split)
        for group in (own, "eval" if own == "train" else "train"):
            rec = self._index(group).get(name)
            if rec is not None:
                return rec
        raise BadSampleError(self.name, name, f"exemplar not found in either split of {self.root}", where)

    def _params(self, listed: int) -> Dict[str, Any]:
        spec = self.spec
        params: Dict[str, Any] = {
            "root": str(self.root), "layout": self.layout, "split": self.split, "split_source": self.split_source,
            "listed": listed, "size": len(self.records), "max_samples": spec.max_samples,
            "skip_bad": spec.skip_bad, "skipped": self._log.summary(),
            "validate": "full" if self.full_check else "header", "variant": self.variant,
            "resolution": self.resolution, "condition": self.condition_desc(), "exemplars": self.policy,
        }
        if self.ref_source is not None:
            params["exemplar_list"] = str(self.ref_source)
            params["exemplar_list_sha1"] = file_digest(self.ref_source)
        if self.policy == "ref_list" and self.is_train:
            params["hard_reference_probability"] = self.options.hard_reference_probability
        if self.policy == "pseudo":
            params["pseudo"] = (f"flip={self.pseudo.flip_probability}, min_crop={self.pseudo.min_crop}, "
                                f"grid={self.pseudo.grid}, jitter={self.pseudo.jitter}")
        params.update(self.extra_params())
        return params

    # ---- samples ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def photo(self, rec: Record) -> np.ndarray:
        """Only the photo (R, R, 3) in [0, 1] (retrieval needs no condition)."""
        return self._photo(rec, read_rgb(self.name, rec.image, rec.origin))

    def load(self, rec: Record) -> Tuple[np.ndarray, Condition]:
        """The photo (R, R, 3) in [0, 1] and its condition."""
        img = read_rgb(self.name, rec.image, rec.origin)
        return self._photo(rec, img), self._condition(rec, img)

    def _rng(self, index: int) -> np.random.Generator:
        """Eval draws are a function of (seed, index); train draws also take a number from torch's
        generator, which the harness seeds (and DataLoader seeds per worker)."""
        if not self.is_train:
            return np.random.default_rng([self.seed, index, 1])
        return np.random.default_rng([self.seed, index, int(torch.randint(0, 2**31 - 1, ()).item())])

    def _exemplar_record(self, index: int, rng: np.random.Generator) -> Optional[Record]:
        plan = self._plans[index]
        if self.policy == "pseudo":
            return None
        if self.policy == "random":
            n = len(self.records)
            if n == 1:
                return self.records[index]
            j = int(rng.integers(0, n - 1))
            return self.records[j + 1 if j >= index else j]
        if not self.is_train:
            return plan[0]
        if self.policy == "ref_list":
            return plan[-1] if rng.random() < self.options.hard_reference_probability else plan[0]
        return plan[int(rng.integers(0, len(plan)))]  # self_pair: any other pose

    def encode_label(self, label: np.ndarray) -> np.ndarray:
        return one_hot(label, self.num_classes)

    def _warp_condition(self, cond: Condition, grid) -> Condition:
        if cond.label is not None:
            label = warp(cond.label, grid, order=0)
            return Condition(self.encode_label(label), label)
        return Condition(warp(cond.maps.transpose(1, 2, 0), grid, order=0).transpose(2, 0, 1).copy())

    def cond_vis(self, cond: Condition) -> np.ndarray:
        """(H, W, 3) in [0, 1]: label maps in SPADE's colours, other maps as channel 0 in grey."""
        if cond.label is not None:
            return self.palette[cond.label].astype(np.float32) / 255.0
        return first_channel_vis(cond.maps)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < len(self.records):
            raise IndexError(f"{self.name}[{self.split}] has {len(self.records)} samples, asked for {index}")
        rec = self.records[index]
        photo, cond = self.load(rec)
        rng = self._rng(index)
        ex_rec = self._exemplar_record(index, rng)
        corr = None
        if ex_rec is None:
            t = sample_transform(rng, self.resolution, self.pseudo)
            grid = sampling_grid(t)
            ex_photo, ex_cond = warp(photo, grid, order=1), self._warp_condition(cond, grid)
            corr = correspondence(t)
        else:
            ex_photo, ex_cond = self.load(ex_rec)
        image = _to_image(photo)
        sample = {
            "cond": torch.from_numpy(np.ascontiguousarray(cond.maps, dtype=np.float32)),
            "cond_vis": _to_image(self.cond_vis(cond)),
            "exemplar": _to_image(ex_photo),
            "exemplar_cond": torch.from_numpy(np.ascontiguousarray(ex_cond.maps, dtype=np.float32)),
            "image": image,
            "index": torch.tensor(index, dtype=torch.int64),
        }
        if self.info.has_target:
            sample["target"] = image.clone()
        if self.num_classes:
            sample["label"] = torch.from_numpy(cond.label.astype(np.int64))
            sample["exemplar_label"] = torch.from_numpy(ex_cond.label.astype(np.int64))
        if corr is not None:
            sample["corr"] = torch.from_numpy(corr)
        return sample

    def prepare_sample(self, index: int) -> None:
        """Compute (and cache) the conditions sample ``index`` needs: its own and its planned exemplars'."""
        for rec in [self.records[index]] + list(self._plans[index]):
            self.load(rec)


def _to_image(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) in [0, 1] -> (3, H, W) float32 in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))
    return t * 2 - 1

