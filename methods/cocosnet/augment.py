"""Self-reference exemplars: the training photo re-sampled so it can serve as its own exemplar
(CoCosNet Sec. 3.3, "losses for pseudo exemplar pairs").

Official (``pix2pix_dataset.py``): a self-reference sample's exemplar is the ground-truth photo read
again through the training transform with *fresh* random parameters -- resize to ``load_size``
(286), random ``crop_size`` (256) crop, random horizontal flip unless ``--no_flip``
(``base_dataset.get_params``) -- and its label map with the same parameters. The input photo got
its own independent draw, so the two differ by a crop offset and (half the time) a flip. Our
harness feeds training photos without augmentation, so ``recrop_grids`` applies the official
transform (crop size, offset and flip distributions, at the harness resolution) to the unaugmented
photo: relative to our input the exemplar is therefore also zoomed by 286/256, where officially
input and exemplar are crops of the same resized photo.

``random_grids`` is the elastic variant (a random crop of side in ``[crop_min, 1]``, flip, and a
smooth random displacement: the paper's "image warping or random flip"). One sampling grid per
sample is applied to the photo (bilinear) and to its condition / label maps (nearest), so the
exemplar's own condition stays aligned with it.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F


def _base_grid(b: int, size: int) -> torch.Tensor:
    """``(B, size, size, 2)`` identity grid at pixel centres, ``grid_sample`` order (x, y)."""
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([gx, gy], dim=-1).expand(b, size, size, 2)


def _random_flip(grid: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    sign = torch.where(torch.rand(grid.shape[0], generator=gen) < 0.5, -1.0, 1.0)
    return torch.stack([grid[..., 0] * sign[:, None, None], grid[..., 1]], dim=-1)


def recrop_grids(b: int, size: int, gen: torch.Generator, scale: float, flip: bool = True,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """The official self-reference transform: the photo resized to ``load = round(size / scale)``
    (``scale`` = crop_size / load_size = 256/286), a ``size`` crop at a uniform integer offset in
    ``[0, load - size]`` per axis, and a horizontal flip with probability 1/2 when ``flip``."""
    load = int(round(size / scale))
    offset = torch.randint(0, load - size + 1, (b, 2), generator=gen).float()  # (x, y) in load pixels
    centre = (size + 2 * offset) / load - 1  # where the crop's centre sits, in [-1, 1]
    grid = _base_grid(b, size) * (size / load) + centre[:, None, None, :]
    if flip:
        grid = _random_flip(grid, gen)
    return grid.to(device) if device is not None else grid


def random_grids(b: int, size: int, gen: torch.Generator, crop_min: float, elastic: float,
                 elastic_grid: int = 4, flip: bool = True, device: Optional[torch.device] = None) -> torch.Tensor:
    """``(B, size, size, 2)`` sampling grids in [-1, 1]: a random crop (side fraction in
    ``[crop_min, 1]``), a flip, and a smooth displacement of up to ``elastic`` of the side."""
    scale = crop_min + (1 - crop_min) * torch.rand(b, generator=gen)  # crop side / image side
    centre = (1 - scale)[:, None] * (torch.rand(b, 2, generator=gen) * 2 - 1)  # crop stays inside
    grid = _base_grid(b, size) * scale[:, None, None, None] + centre[:, None, None, :]
    if flip:
        grid = _random_flip(grid, gen)
    if elastic > 0:
        coarse = (torch.rand(b, 2, elastic_grid, elastic_grid, generator=gen) * 2 - 1) * 2 * elastic
        disp = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
        grid = grid + disp.permute(0, 2, 3, 1)
    return grid.to(device) if device is not None else grid


def distort(grid: torch.Tensor, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample ``x`` (B, C, H, W) with ``grid``; reflection padding so no black borders appear."""
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode="reflection", align_corners=False)


def distort_label(grid: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Nearest resampling of an int64 (B, H, W) label map."""
    return distort(grid, label[:, None].float(), "nearest")[:, 0].round().long()


def select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample choice: ``a[i]`` where ``mask[i]`` else ``b[i]``."""
    m = mask.view(-1, *([1] * (a.dim() - 1)))
    return torch.where(m, a, b)


__all__: List[str] = ["recrop_grids", "random_grids", "distort", "distort_label", "select"]
