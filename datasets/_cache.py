"""Preprocessing cache: condition maps computed once per (source file contents, settings).

A cache key is the SHA-1 of a JSON document holding the kind of map, a code version, the
SHA-1 of every source file's *contents* (not its path or mtime, so a moved dataset still hits
and an edited file misses) and every setting that changes the result (resolution, sigma, ...).
Entries are ``.npy`` arrays (uint8 for maps, so they stay small) written atomically: the array
goes to a temporary file in the same folder and is renamed into place, so concurrent trials
never read half a file. A corrupt entry is treated as a miss and rewritten.

The location is ``$BENCH_DATA_CACHE`` if set, else ``<repo>/.cache/datasets`` (git-ignored).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import numpy as np

CACHE_ENV = "BENCH_DATA_CACHE"
REPO_ROOT = Path(__file__).resolve().parents[1]

# In-process memo of content digests: (path, size, mtime_ns) -> sha1. Hashing is cheap next to
# decoding, but a sample's files are hashed on every access, so remember them while unchanged.
_DIGESTS: Dict[Tuple[str, int, int], str] = {}


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / ".cache" / "datasets"


def file_digest(path: Path) -> str:
    """SHA-1 of the file's contents (memoised while size and mtime are unchanged)."""
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha1()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def atomic_save(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as .npy to ``path`` via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PrepCache:
    """Content-addressed store of preprocessed arrays; ``enabled=False`` computes every time."""

    def __init__(self, directory: Optional[Path] = None, enabled: bool = True):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(kind: str, version: int, files: Iterable[Path], settings: Dict[str, Any]) -> str:
        doc = {"kind": kind, "version": version, "files": [file_digest(Path(f)) for f in files],
               "settings": settings}
        return hashlib.sha1(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npy"

    def load(self, key: str) -> Optional[np.ndarray]:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None  # torn or foreign file: recompute and overwrite

    def get_or_compute(self, kind: str, version: int, files: Iterable[Path], settings: Dict[str, Any],
                       compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array for this key, computing and storing it on a miss."""
        if not self.enabled:
            return compute()
        key = self.key(kind, version, files, settings)
        arr = self.load(key)
        if arr is not None:
            self.hits += 1
            return arr
        self.misses += 1
        arr = compute()
        try:
            atomic_save(self._path(key), arr)
        except OSError:
            pass  # a read-only or full cache must not stop a run; the map is still returned
        return arr

    # Verdicts: "these files passed the full check" markers, so a re-run skips re-decoding.
    def _mark_path(self, key: str) -> Path:
        return self.directory / "checks" / key[:2] / key

    def passed(self, key: str) -> bool:
        return self.enabled and self._mark_path(key).is_file()

    def mark_passed(self, key: str) -> None:
        if not self.enabled:
            return
        path = self._mark_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError:
            pass
