"""On-disk cache of features and statistics of *real* images, shared by trials and sweeps.

Why: the expensive half of FID/KID is pushing the real images (ground truths, exemplars)
through Inception. Those features depend only on the real data and the feature network, not on
the method under test, so a sweep of N trials should compute them once. The cache key is a hash
of everything that changes the features (mmagic-style): ``data_key`` (dataset identity), split,
resolution, mode (clean-fid resizer + network variant), the backbone's provenance (weights file
hash, or untrained seed) and n (split size). Writes are atomic (temp file in the same directory +
``os.replace``, torch-fidelity-style) so concurrent trials never read half a file; the last writer
wins, and the feature bank merges what is on disk before writing so no entry is lost.

Two layers:

* ``FeatureCache``: named ``.npz`` files under ``cache_dir``, ``get_or_compute`` with a log line
  saying whether the value was computed or reused.
* ``FeatureBank``: content-addressed per-image features (key = hash of the uint8 pixels), so the
  real images can stream in from the evaluation batches in any order, any subset, with
  duplicates, and still reuse what an earlier trial computed -- never a stale or mismatched row.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

log = logging.getLogger("bench.metrics.feature_cache")

CACHE_FORMAT = 1  # bump when the stored layout changes


def cache_key(**parts: object) -> str:
    """Stable short hash of the key parts (JSON with sorted keys, so order does not matter)."""
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def image_digest(image: np.ndarray) -> str:
    """Content hash of one uint8 image (shape included, so a resized copy never collides)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def atomic_save_npz(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FeatureCache:
    """Named arrays under ``cache_dir/metric_features``; one ``<kind>-<key>.npz`` per entry."""

    def __init__(self, cache_dir: Path):
        self.root = Path(cache_dir) / "metric_features"

    def path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}.npz"

    def load(self, kind: str, key: str) -> Optional[Dict[str, np.ndarray]]:
        p = self.path(kind, key)
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def save(self, kind: str, key: str, arrays: Dict[str, np.ndarray], meta: Dict[str, object]) -> Path:
        p = self.path(kind, key)
        payload = dict(arrays)
        payload["meta_json"] = np.array(json.dumps(meta, sort_keys=True, default=str))
        atomic_save_npz(p, payload)
        return p

    def get_or_compute(self, kind: str, key: str, meta: Dict[str, object],
                       compute: Callable[[], Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
        """The cached arrays, or ``compute()``'s (then saved); logs which of the two happened."""
        cached = self.load(kind, key)
        if cached is not None:
            log.info("%s %s: reused from %s", kind, key, self.path(kind, key))
            cached.pop("meta_json", None)
            return cached
        arrays = compute()
        p = self.save(kind, key, arrays, meta)
        log.info("%s %s: computed and saved to %s", kind, key, p)
        return arrays


class FeatureBank:
    """Per-image features of real images, addressed by pixel content, persisted in a FeatureCache.

    ``lookup(images, compute)`` returns one feature row per image, computing only rows whose
    content hash is not known yet; ``flush()`` writes new rows (merged with whatever another
    process wrote meanwhile). Instances are shared per process by key (``shared``), so several
    metrics over the same real data (FID and KID, sources and exemplars) compute each row once.
    """

    KIND = "realfeats"
    _shared: Dict[Tuple[str, str], "FeatureBank"] = {}
    _lock = threading.Lock()

    def __init__(self, cache: FeatureCache, key: str, meta: Dict[str, object]):
        self.cache, self.key, self.meta = cache, key, meta
        self.rows: Dict[str, np.ndarray] = {}
        self.new: Dict[str, np.ndarray] = {}
        self.reused = 0
        self._merge_from_disk()
        if self.rows:
            log.info("real-image features: %d cached rows found in %s", len(self.rows),
                     cache.path(self.KIND, key))

    @classmethod
    def shared(cls, cache: FeatureCache, key: str, meta: Dict[str, object]) -> "FeatureBank":
        with cls._lock:
            k = (str(cache.root), key)
            if k not in cls._shared:
                cls._shared[k] = cls(cache, key, meta)
            return cls._shared[k]

    def _merge_from_disk(self) -> None:
        data = self.cache.load(self.KIND, self.key)
        if data is None:
            return
        for digest, row in zip(data["digests"].tolist(), data["features"]):
            self.rows.setdefault(digest, row)

    def lookup(self, images: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> Tuple[List[str], np.ndarray]:
        """(digests, features) for uint8 (B, H, W, 3) ``images``; ``compute`` gets only unknown ones."""
        digests = [image_digest(im) for im in images]
        missing = [i for i, d in enumerate(digests) if d not in self.rows]
        # duplicates inside one batch are computed once
        first: "OrderedDict[str, int]" = OrderedDict()
        for i in missing:
            first.setdefault(digests[i], i)
        if first:
            feats = compute(images[list(first.values())])
            for d, row in zip(first.keys(), feats):
                self.rows[d] = row
                self.new[d] = row
        self.reused += len(digests) - len(missing)
        return digests, np.stack([self.rows[d] for d in digests])

    def flush(self) -> None:
        """Persist rows computed since the last flush; a no-op (with a 'reused' log) otherwise."""
        path = self.cache.path(self.KIND, self.key)
        if not self.new:
            if self.reused:
                log.info("real-image features: reused %d cached rows (%s), none computed", self.reused, path)
            self.reused = 0
            return
        self._merge_from_disk()  # another trial may have added rows meanwhile
        digests = sorted(self.rows)
        self.cache.save(self.KIND, self.key, {
            "digests": np.array(digests),
            "features": np.stack([self.rows[d] for d in digests]),
        }, self.meta)
        log.info("real-image features: computed %d new rows, reused %d; %d rows saved to %s",
                 len(self.new), self.reused, len(digests), path)
        self.new.clear()
        self.reused = 0


class LRUFeatureMemo:
    """In-memory features of generated images by content hash, bounded.

    Why: several metric instances (``fid_sources``, ``kid_sources``, ``fid_exemplars``...) receive
    the same outputs batch after batch; the network should run once per image, not once per metric.
    Generated images are never written to disk (they belong to one trial).
    """

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self.rows: "OrderedDict[str, np.ndarray]" = OrderedDict()

    def lookup(self, images: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        digests = [image_digest(im) for im in images]
        todo: "OrderedDict[str, int]" = OrderedDict()
        for i, d in enumerate(digests):
            if d not in self.rows:
                todo.setdefault(d, i)
        if todo:
            for d, row in zip(todo.keys(), compute(images[list(todo.values())])):
                self.rows[d] = row
        for d in digests:
            self.rows.move_to_end(d)
        out = np.stack([self.rows[d] for d in digests])
        while len(self.rows) > self.capacity:
            self.rows.popitem(last=False)
        return out


def digest_of_list(digests: Iterable[str]) -> str:
    """One hash for an ordered list of image digests (identifies a set of real images)."""
    h = hashlib.sha256()
    for d in digests:
        h.update(d.encode())
    return h.hexdigest()[:24]
