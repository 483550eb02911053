"""Qualitative figures like the papers' (CoCosNet v2 Fig. 1/5, MIDMs Fig. 5): a row of conditions,
a row of exemplars, then per method/variant its finest warp (when it has one) and its outputs,
then the ground truth; one figure per dataset, from the runs of one fixed seed.

Built from each run's ``samples/grid.png`` artifact, not by re-running generation: the grid holds
the first ``eval.grid_samples`` evaluation samples of the final model, which are the same inputs
for every method given the dataset, seed and resolution (the evaluation order is fixed), so the
figure costs no model loading and works for runs whose code has since changed. Rows of a grid are
found from its geometry (bench/grid.py: a label strip, then ``resolution``-pixel cells with a
2-pixel padding): condition, exemplar, warps (coarse to fine), output, ground truth.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from bench.grid import LABEL_WIDTH
from bench.report.data import RunSet
from bench.report.plots import plt, save
from bench.report.tables import row_labels

PAD = 2
GRID_ARTIFACT = "samples/grid.png"
PROGRESS_VAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass
class GridRows:
    condition: np.ndarray  # (H, N*(res+pad)-pad, 3) uint8 strips
    exemplar: np.ndarray
    warps: List[np.ndarray]  # coarse to fine
    output: np.ndarray
    truth: np.ndarray


def split_grid(img: np.ndarray, resolution: int, max_cols: int) -> GridRows:
    """Cut a bench grid image into its labelled rows (without the label strip)."""
    h, w = img.shape[:2]
    cell = resolution + PAD
    n_rows, n_cols = (h - PAD) // cell, (w - LABEL_WIDTH - PAD) // cell
    if n_rows < 4 or n_rows * cell + PAD != h or LABEL_WIDTH + n_cols * cell + PAD != w:
        raise ValueError(f"a {w}x{h} image is not a bench sample grid of {resolution}px cells")
    n = min(n_cols, max_cols)
    x0, x1 = LABEL_WIDTH + PAD, LABEL_WIDTH + PAD + n * cell - PAD
    strips = [img[PAD + r * cell: PAD + r * cell + resolution, x0:x1] for r in range(n_rows)]
    return GridRows(strips[0], strips[1], strips[2:-2], strips[-2], strips[-1])


def _download(runset: RunSet, run_id: str, dst: Path) -> Optional[np.ndarray]:
    from mlflow.tracking import MlflowClient

    old = os.environ.get(PROGRESS_VAR)
    os.environ[PROGRESS_VAR] = "false"  # a progress bar per 10 kB image is noise in a report build
    try:
        path = MlflowClient(runset.tracking_uri).download_artifacts(run_id, GRID_ARTIFACT, str(dst))
    except Exception:  # noqa: BLE001 - a run without a grid (no eval batch) is left out of the figure
        return None
    finally:
        if old is None:
            os.environ.pop(PROGRESS_VAR, None)
        else:
            os.environ[PROGRESS_VAR] = old
    return np.asarray(Image.open(path).convert("RGB"))


def qualitative_figures(runset: RunSet, out_dir: Path, seed: Optional[int] = None,
                        max_cols: int = 6) -> Tuple[List[Path], List[str]]:
    """Returns (files written, notes). ``seed``: which seed's runs to show (default: the smallest)."""
    df = runset.runs
    written: List[Path] = []
    notes: List[str] = []
    if df.empty:
        return written, notes
    seed = int(df["seed"].min()) if seed is None else seed
    labels = row_labels(df)  # the tables' row names (variants, methods or method/variant)
    with tempfile.TemporaryDirectory() as tmp:
        for ds, grp in df.groupby("dataset", sort=False):
            grp = grp[grp["seed"] == seed]
            blocks: List[Tuple[str, GridRows]] = []
            for k, (_, run) in enumerate(grp.iterrows()):
                img = _download(runset, run["run_id"], Path(tmp) / f"{k}")
                if img is None:
                    notes.append(f"{ds}: {run['row']} seed {seed} has no {GRID_ARTIFACT}")
                    continue
                res = int(run.get("params.scale.resolution") or 0)
                try:
                    blocks.append((labels[run["row"]], split_grid(img, res, max_cols)))
                except ValueError as exc:
                    notes.append(f"{ds}: {run['row']}: {exc}")
            if not blocks:
                continue
            written += _figure(blocks, ds, seed, out_dir / f"qualitative_{ds}_s{seed}")
    return written, notes


def _figure(blocks: List[Tuple[str, GridRows]], dataset: str, seed: int, stem: Path) -> List[Path]:
    first = blocks[0][1]
    # Inputs are shared when every run saw the same ones (same dataset, seed and resolution).
    shared = all(b.condition.shape == first.condition.shape and np.array_equal(b.condition, first.condition)
                 and np.array_equal(b.exemplar, first.exemplar) for _, b in blocks)
    rows: List[Tuple[str, np.ndarray]] = []
    if shared:
        rows += [("condition", first.condition), ("exemplar", first.exemplar)]
    for name, b in blocks:
        if not shared:
            rows += [(f"{name}\ncondition", b.condition), (f"{name}\nexemplar", b.exemplar)]
        if b.warps:
            rows.append((f"{name}\nwarp", b.warps[-1]))
        rows.append((f"{name}\noutput", b.output))
    rows.append(("ground truth", first.truth))
    width = max(r.shape[1] for _, r in rows)
    height = rows[0][1].shape[0]
    fig_w = 1.6 + 9.0 * min(1.0, width / 600)
    fig, axs = plt.subplots(len(rows), 1, figsize=(fig_w, 0.2 + len(rows) * fig_w * height / width * 0.8),
                            squeeze=False)
    for ax, (label, strip) in zip(axs[:, 0], rows):
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"{dataset}, seed {seed}: exemplars, warps and outputs per method", fontsize=8)
    fig.tight_layout(h_pad=0.3, rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    return save(fig, stem)
