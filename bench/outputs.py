"""Evaluated outputs written as image files (``eval.save_outputs``), and read back when the metrics
score the files (``eval.score_from: files``).

Layout, paired by file name so that ``python -m bench.score --fake output --real real --exemplars
exemplar --conditions cond`` scores a run's saved outputs with the same metric code::

    outputs/output/00000.png     the method's output
    outputs/real/00000.png       what the metrics compare it with (the exact target, else the photo)
    outputs/exemplar/00000.png   the exemplar it was given
    outputs/cond/00000.png       the condition, as the sample grids draw it

Images are 8-bit RGB, rounded like torchvision's ``save_image`` (the metrics' own ``to_uint8_hwc``).
Outputs are png (lossless) or jpg (quality 95, 4:4:4 chroma); the other folders are always png (CoCosNet #19: the same model scores
FID 14.3 from .jpg and 16.95 from .png outputs, which is why the format is a param of the run).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from PIL import Image

from bench.metrics.base import reference_image, to_uint8_hwc
from methods.base import MethodOutput

FORMATS = {"png": ("PNG", {}), "jpg": ("JPEG", {"quality": 95, "subsampling": 0})}
FOLDERS = ("output", "real", "exemplar", "cond")


def encode(image: np.ndarray, fmt: str) -> bytes:
    kind, kwargs = FORMATS[fmt]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, kind, **kwargs)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def from_uint8_hwc(images: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1] on ``like``'s device and dtype."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(like.device, like.dtype)
    return x / 127.5 - 1.0


class OutputWriter:
    """Writes each evaluated batch's images; with ``read_back`` returns the output as the metrics
    will see it from the file (quantised to 8 bits, and JPEG's loss when jpg)."""

    def __init__(self, directory: Path, fmt: str, read_back: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"save_outputs: format must be one of {list(FORMATS)}, got {fmt!r}")
        self.dir, self.fmt, self.read_back = Path(directory), fmt, read_back
        self.count = 0
        for sub in FOLDERS:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: Dict[str, torch.Tensor], out: MethodOutput) -> MethodOutput:
        images = {"output": out.output, "real": reference_image(batch), "exemplar": batch["exemplar"]}
        if "cond_vis" in batch:
            images["cond"] = batch["cond_vis"]
        decoded = []
        for folder, tensor in images.items():
            # Only the output takes the chosen format; the references stay lossless (the metrics
            # quantise them to the same 8 bits in memory), so scoring the files equals score_from: files.
            fmt = self.fmt if folder == "output" else "png"
            for i, image in enumerate(to_uint8_hwc(tensor)):
                data = encode(image, fmt)
                (self.dir / folder / f"{self.count + i:05d}.{fmt}").write_bytes(data)
                if folder == "output" and self.read_back:
                    decoded.append(decode(data))
        self.count += out.output.shape[0]
        if not self.read_back:
            return out
        return MethodOutput(from_uint8_hwc(np.stack(decoded), out.output), out.warps)
