"""Finding pretrained weights files, or opting in to seeded random init.

Every pretrained network the project uses (VGG19 for losses and metrics, AlexNet for LPIPS,
Inception for FID) is looked up the same way: the configured weights directory, then
``$TORCH_HOME/hub/checkpoints`` (torch.hub's cache), then a download from the official URL when
the network allows. When all fail, ``MissingWeightsError`` names the file, its URL and where to
put it -- unless ``allow_untrained`` is set, in which case the caller builds a seeded random-init
network and records it as untrained. Weights are never faked silently.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.request
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch

from methods.base import BackboneSettings

UNTRAINED_PREFIX = "untrained"


class MissingWeightsError(FileNotFoundError):
    pass


@contextlib.contextmanager
def private_rng(seed: Optional[int] = None, devices: Sequence[int] = ()) -> Iterator[None]:
    """Random draws inside (module construction, seeded random init) come from a stream of their
    own, seeded with ``seed`` when given, and leave the global CPU stream (and the ``devices``'
    CUDA streams) where they were: networks cached per process must not make a trial's numbers
    depend on whether an earlier trial in the same process already built them."""
    with torch.random.fork_rng(devices=list(devices)):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def hub_checkpoint_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def search_dirs(settings: BackboneSettings) -> List[Path]:
    dirs = []
    if settings.weights_dir:
        dirs.append(Path(settings.weights_dir).expanduser())
    env_dir = os.environ.get("BENCH_WEIGHTS_DIR")
    if env_dir:
        dirs.append(Path(env_dir).expanduser())
    dirs.append(hub_checkpoint_dir())
    return dirs


def _download(url: str, dest: Path, timeout: float = 20.0) -> bool:
    """Download to ``dest`` atomically; False (not an exception) when the network says no."""
    if os.environ.get("BENCH_OFFLINE") == "1":
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as fh:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                fh.write(chunk)
        os.replace(tmp, dest)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


@dataclass
class WeightsRequest:
    """One ``find_weights`` call seen while probing (``probe_weights``)."""

    filename: str
    url: str
    purpose: str
    settings: BackboneSettings
    found: Optional[Path]  # where it is now; None: absent (downloadable or not)

    def missing_message(self) -> str:
        return missing_weights_message(self.filename, self.url, search_dirs(self.settings), self.purpose)


_PROBE: ContextVar[Optional[List[WeightsRequest]]] = ContextVar("bench_weights_probe", default=None)


@contextlib.contextmanager
def probe_weights() -> Iterator[List[WeightsRequest]]:
    """Inside, ``find_weights`` only records what it is asked for and answers None (so callers
    build their seeded random-init stand-in instead of reading a file): building a method or
    metric on the meta device under this shows every weights file it needs, in milliseconds and
    without downloading or loading anything (the sweep preflight)."""
    requests: List[WeightsRequest] = []
    token = _PROBE.set(requests)
    try:
        yield requests
    finally:
        _PROBE.reset(token)


def probing_weights() -> bool:
    """True inside ``probe_weights``: loaders that read files themselves (not via find_weights)
    check existence only."""
    return _PROBE.get() is not None


def find_weights(filename: str, url: str, settings: BackboneSettings, purpose: str) -> Optional[Path]:
    """Path of ``filename``; None when it is absent and ``settings.allow_untrained`` is set.

    Raises ``MissingWeightsError`` (naming file, URL and directories) otherwise.
    """
    dirs = search_dirs(settings)
    found = next((d / filename for d in dirs if (d / filename).is_file()), None)
    probe = _PROBE.get()
    if probe is not None:
        probe.append(WeightsRequest(filename, url, purpose, settings, found))
        return None
    if found is not None:
        return found
    if settings.download and _download(url, dirs[-1] / filename):
        return dirs[-1] / filename
    if settings.allow_untrained:
        return None
    raise MissingWeightsError(missing_weights_message(filename, url, dirs, purpose))


def fetch_weights(request: WeightsRequest) -> Optional[Path]:
    """Download a probed request's file the way ``find_weights`` would (None: not possible)."""
    dest = search_dirs(request.settings)[-1] / request.filename
    if request.settings.download and _download(request.url, dest):
        return dest
    return None


def missing_weights_message(filename: str, url: str, dirs: Sequence[Path], purpose: str) -> str:
    where = "\n".join(f"  - {d}" for d in dirs)
    return (f"{purpose} needs the pretrained weights file {filename!r}, which was not found and could not be "
            f"downloaded.\n  Get it from: {url}\n  and put it in one of:\n{where}\n"
            f"(or set the weights directory in the sweep / BENCH_WEIGHTS_DIR). To run anyway with seeded "
            f"random-init networks, whose numbers are labelled untrained, set allow_untrained_backbones: true.")



def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def provenance_of(path: Optional[Path], seed: int) -> str:
    """The tag value recorded for a backbone: its file hash, or that it is untrained."""
    if path is None:
        return f"{UNTRAINED_PREFIX}(seed={seed})"
    return f"sha256:{file_sha256(path)}"


def is_untrained(provenance: str) -> bool:
    return provenance.startswith(UNTRAINED_PREFIX)
