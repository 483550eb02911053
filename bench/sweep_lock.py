"""One ``bench.run`` of a sweep per tracking store at a time.

Two drivers of the same sweep on the same store would run the same trials twice and race on their
MLflow runs. The lock is an advisory ``flock`` on a small file: the kernel releases it when its
holder exits in any way (``kill -9`` included), so a stale lock never blocks ``--resume``. The file
keeps the holder's pid and command line so the second driver can say who is running.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Optional


class SweepLocked(RuntimeError):
    """Another driver holds the sweep; the message names it."""


def lock_path(tracking_uri: str, sweep: str, workdir: Path) -> Path:
    """Next to a sqlite store (every driver using that file finds it); for a server, in the workdir."""
    digest = hashlib.sha256(f"{tracking_uri}\0{sweep}".encode()).hexdigest()[:16]
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return db.parent / f".{db.name}.{digest}.lock"
    return workdir / ".cache" / "bench" / "locks" / f"{digest}.lock"


class SweepLock:
    def __init__(self, tracking_uri: str, sweep: str, workdir: Path):
        self.path = lock_path(tracking_uri, sweep, workdir)
        self.sweep, self.uri = sweep, tracking_uri
        self._fh = None

    def acquire(self) -> "SweepLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise SweepLocked(f"sweep {self.sweep!r} is already running on {self.uri}: {holder}. Wait for it, or "
                              f"stop it (Ctrl-C; then --resume continues it).") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} ({' '.join(sys.argv) or 'python'}), since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.seek(0)
            fh.truncate()  # the next holder writes its own line; an empty file names nobody
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    def __enter__(self) -> "SweepLock":
        return self.acquire()

    def __exit__(self, *exc) -> Optional[bool]:
        self.release()
        return None
