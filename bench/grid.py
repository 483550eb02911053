"""Sample grids: one column per sample, labelled rows (condition, exemplar, warps, output, ground truth)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

LABEL_WIDTH = 72


def grid_rows(batch: Dict[str, torch.Tensor], out) -> List[Tuple[str, torch.Tensor]]:
    """The rows of a method's sample grid, each (label, (N, 3, H, W) in [-1, 1])."""
    size = out.output.shape[-2:]
    rows = [("condition", batch["cond_vis"]), ("exemplar", batch["exemplar"])]
    for level, warp in sorted(out.warps.items(), key=lambda kv: kv[1].shape[-1]):
        rows.append((f"warp {level}", F.interpolate(warp, size=size, mode="nearest")))
    rows.append(("output", out.output))
    gt_key = "target" if "target" in batch else "image"
    rows.append(("ground truth" if gt_key == "target" else "real photo", batch[gt_key]))
    return rows


def render_grid(rows: List[Tuple[str, torch.Tensor]], pad: int = 2) -> Image.Image:
    n, _, h, w = rows[0][1].shape
    canvas = Image.new("RGB", (LABEL_WIDTH + n * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, imgs) in enumerate(rows):
        y = pad + r * (h + pad)
        draw.text((4, y + h // 2 - 5), label, fill="black")
        arr = ((imgs.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for c in range(min(n, arr.shape[0])):
            canvas.paste(Image.fromarray(np.ascontiguousarray(arr[c])), (LABEL_WIDTH + pad + c * (w + pad), y))
    return canvas


def save_grid(rows: List[Tuple[str, torch.Tensor]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    render_grid(rows).save(path)
    return path
