"""Reading the files of ``bench.score``'s folders the way the harness holds images in memory.

Images: PIL, converted to RGB (an alpha channel is dropped, not composited; grey and palette
images are expanded), uint8 (H, W, 3), then the harness' tensor convention: (B, 3, H, W) float in
[-1, 1] as u / 127.5 - 1, which the metrics' own ``to_uint8_hwc`` maps back to exactly u. Label
maps (``--conditions``): single-channel images (PIL modes L, P, I, I;16) whose pixel values are
class ids, as (B, H, W) int64. 16-bit and float photos are refused rather than silently rescaled.

``check_files`` opens every file's header before anything is computed, so an unreadable file, a
wrong mode or a size that differs from the fakes' is an error up front, naming the file.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bench.score.pairing import SHOWN, Folder, ScoreInputError

LABEL_MODES = ("L", "P", "I", "I;16")
HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # not 8-bit: refused for photos


@dataclass
class FolderReport:
    """What was found in one folder: counts, file formats and PIL modes (recorded in the settings)."""

    option: str
    root: str
    files: int
    ignored: int
    formats: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)

    def as_settings(self) -> Dict[str, object]:
        return {"dir": self.root, "files": self.files, "ignored_files": self.ignored,
                "formats": ",".join(f"{k}:{v}" for k, v in sorted(self.formats.items())),
                "modes": ",".join(f"{k}:{v}" for k, v in sorted(self.modes.items()))}


def _open_header(path: Path) -> Tuple[str, str, Tuple[int, int]]:
    try:
        with Image.open(path) as im:
            return str(im.format), im.mode, (im.height, im.width)
    except (UnidentifiedImageError, OSError) as exc:
        raise ScoreInputError(f"cannot read {path}: {exc}") from None


def check_files(folder: Folder, keys: Sequence[str], size: Tuple[int, int], labels: bool) -> FolderReport:
    """Every file of ``folder`` opens, has an accepted mode and is ``size`` (H, W)."""
    report = FolderReport(folder.option, str(folder.root), len(keys), folder.ignored)
    wrong_size: List[str] = []
    for key in keys:
        fmt, mode, hw = _open_header(folder.files[key])
        report.formats[fmt] += 1
        report.modes[mode] += 1
        if labels and mode not in LABEL_MODES:
            raise ScoreInputError(f"{folder.option}: {folder.files[key]} has PIL mode {mode}; label maps must be "
                                  f"single-channel class-id images (modes {', '.join(LABEL_MODES)}), not colour-coded")
        if not labels and mode in HIGH_DEPTH_MODES:
            raise ScoreInputError(f"{folder.option}: {folder.files[key]} has PIL mode {mode} (16-bit or float); "
                                  f"save 8-bit images (the harness scores uint8 images)")
        if hw != size:
            wrong_size.append(f"{folder.files[key].relative_to(folder.root)} {hw[0]}x{hw[1]}")
    if wrong_size:
        shown = ", ".join(wrong_size[:SHOWN]) + (", ..." if len(wrong_size) > SHOWN else "")
        raise ScoreInputError(f"{folder.option}: {len(wrong_size)} of {len(keys)} files are not {size[0]}x{size[1]} "
                              f"(height x width of the first --fake image): {shown}; resize them to the outputs' "
                              f"size first (bench.score does not resize: it would change the numbers)")
    return report


def first_size(folder: Folder, key: str) -> Tuple[int, int]:
    return _open_header(folder.files[key])[2]


def read_rgb(paths: Sequence[Path]) -> np.ndarray:
    """(B, H, W, 3) uint8."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return np.stack(out)


def read_labels(paths: Sequence[Path]) -> np.ndarray:
    """(B, H, W) int64 class ids."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im, dtype=np.int64))
    return np.stack(out)


def to_harness(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, H, W) float in [-1, 1], the evaluator's tensor convention."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
