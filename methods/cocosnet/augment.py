"""Pseudo exemplars by geometric distortion (CoCosNet Sec. 3.3, "losses for pseudo exemplar pairs").

The official loader makes a self-reference by re-reading the ground-truth photo with fresh
random ``resize_and_crop`` (286 -> 256 crop) and flip parameters. Here: a random horizontal flip,
a random crop (side fraction in ``[crop_min, 1]``) resized back, and a smooth random elastic
displacement (a coarse grid of offsets upsampled bicubically) -- the paper's "image warping or
random flip". One sampling grid per sample is applied to the photo (bilinear) and to its
condition / label maps (nearest), so the pseudo exemplar's own condition stays aligned with it.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F


def random_grids(b: int, size: int, gen: torch.Generator, crop_min: float, elastic: float,
                 elastic_grid: int = 4, flip: bool = True, device: Optional[torch.device] = None) -> torch.Tensor:
    """``(B, size, size, 2)`` sampling grids in [-1, 1] (``grid_sample`` order: x, y)."""
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    base = torch.stack([gx, gy], dim=-1).expand(b, size, size, 2)
    scale = crop_min + (1 - crop_min) * torch.rand(b, generator=gen)  # crop side / image side
    centre = (1 - scale)[:, None] * (torch.rand(b, 2, generator=gen) * 2 - 1)  # crop stays inside
    grid = base * scale[:, None, None, None] + centre[:, None, None, :]
    if flip:
        sign = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
        grid = torch.stack([grid[..., 0] * sign[:, None, None], grid[..., 1]], dim=-1)
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


__all__: List[str] = ["random_grids", "distort", "distort_label", "select"]
