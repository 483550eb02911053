"""Pseudo exemplars for training: the sample's own photo, flipped, cropped and warped.

CoCosNet trains part of the time with a "self reference": the exemplar is the ground-truth
photo itself under a geometric augmentation, so the right output is known exactly (it is the
photo). Here one transform combines a horizontal flip, a random crop (zoom) and a piecewise
affine warp (scikit-image ``PiecewiseAffineTransform`` on a jittered control grid). Because
the transform is known, the true correspondence (for every pixel of the condition, where it
landed in the exemplar) is returned too.

Conventions: coordinates are (x, y) in pixels of an ``size`` x ``size`` image; correspondences
are normalised as in ``grid_sample`` with ``align_corners=False``: ``(2 * x + 1) / size - 1``,
the same convention as the embedded dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
from scipy import ndimage
from skimage.transform import PiecewiseAffineTransform


@dataclass(frozen=True)
class PseudoSettings:
    flip_probability: float = 0.5  # chance of a horizontal flip
    min_crop: float = 0.8  # smallest crop side as a fraction of the image (1.0 = no crop)
    grid: int = 4  # control-grid cells per side of the piecewise affine warp
    jitter: float = 0.25  # interior control-point displacement, fraction of a grid cell (< 0.5 keeps it fold-free)

    def __post_init__(self):
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError("pseudo flip_probability must be in [0, 1]")
        if not 0.1 <= self.min_crop <= 1.0:
            raise ValueError("pseudo min_crop must be in [0.1, 1]")
        if self.grid < 1:
            raise ValueError("pseudo grid must be >= 1")
        if not 0.0 <= self.jitter < 0.5:
            raise ValueError("pseudo jitter must be in [0, 0.5) (larger values can fold the mesh)")


@dataclass
class PseudoTransform:
    """Exemplar pixel -> photo pixel mapping: a crop rectangle, a flip and a jittered control grid."""

    size: int
    crop: Tuple[float, float, float, float]  # x0, y0, x1, y1 in photo pixels (inclusive pixel centres)
    flip: bool
    exemplar_pts: np.ndarray  # (N, 2) control points in the exemplar
    photo_pts: np.ndarray  # (N, 2) the same points in the photo

    def _affine_to_photo(self, u: np.ndarray, v: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        s = self.size - 1
        x0, y0, x1, y1 = self.crop
        u = s - u if self.flip else u
        return x0 + u * (x1 - x0) / s, y0 + v * (y1 - y0) / s

    def _affine_to_exemplar(self, x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        s = self.size - 1
        x0, y0, x1, y1 = self.crop
        u = (x - x0) * s / (x1 - x0)
        v = (y - y0) * s / (y1 - y0)
        return (s - u if self.flip else u), v


def sample_transform(rng: np.random.Generator, size: int, settings: PseudoSettings) -> PseudoTransform:
    """Draw a flip, a crop and control-point jitter."""
    s = size - 1
    side = rng.uniform(settings.min_crop, 1.0) * s
    x0 = rng.uniform(0, s - side)
    y0 = rng.uniform(0, s - side)
    flip = bool(rng.random() < settings.flip_probability)
    g = settings.grid
    ticks = np.linspace(0, s, g + 1)
    u, v = np.meshgrid(ticks, ticks)
    u, v = u.ravel(), v.ravel()
    t = PseudoTransform(size, (x0, y0, x0 + side, y0 + side), flip, np.stack([u, v], 1), np.zeros((len(u), 2)))
    px, py = t._affine_to_photo(u, v)
    interior = (u > 0) & (u < s) & (v > 0) & (v < s)
    cell = side / g
    px[interior] += rng.uniform(-settings.jitter, settings.jitter, interior.sum()) * cell
    py[interior] += rng.uniform(-settings.jitter, settings.jitter, interior.sum()) * cell
    t.photo_pts = np.stack([px, py], 1)
    return t


def _estimate(src: np.ndarray, dst: np.ndarray) -> PiecewiseAffineTransform:
    tf = PiecewiseAffineTransform.from_estimate(src, dst)
    if not tf:
        raise RuntimeError(f"piecewise affine estimation failed: {tf}")
    return tf


def sampling_grid(t: PseudoTransform) -> Tuple[np.ndarray, np.ndarray]:
    """For every exemplar pixel, the photo position it shows: (rows, cols) arrays of shape (size, size)."""
    n = t.size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    coords = _estimate(t.exemplar_pts, t.photo_pts)(np.stack([xx.ravel(), yy.ravel()], 1))
    return coords[:, 1].reshape(n, n), coords[:, 0].reshape(n, n)


def warp(array: np.ndarray, grid: Tuple[np.ndarray, np.ndarray], order: int) -> np.ndarray:
    """Resample an (H, W) or (H, W, C) array at ``grid``: order 1 for photos, 0 for labels and maps."""
    rows, cols = grid
    if array.ndim == 2:
        return ndimage.map_coordinates(array, [rows, cols], order=order, mode="nearest")
    return np.stack([ndimage.map_coordinates(array[..., c], [rows, cols], order=order, mode="nearest")
                     for c in range(array.shape[-1])], axis=-1)


def correspondence(t: PseudoTransform) -> np.ndarray:
    """(2, size, size) float32: for every photo (= condition) pixel, its (x, y) in the exemplar, normalised.

    Inside the crop rectangle the inverse of the piecewise warp; outside, the crop/flip affine map
    extended (those pixels are outside the exemplar, so the values fall outside [-1, 1]).
    """
    n = t.size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    u, v = t._affine_to_exemplar(xx.ravel(), yy.ravel())
    x0, y0, x1, y1 = t.crop
    inside = (xx.ravel() >= x0) & (xx.ravel() <= x1) & (yy.ravel() >= y0) & (yy.ravel() <= y1)
    if inside.any():
        inv = _estimate(t.photo_pts, t.exemplar_pts)(np.stack([xx.ravel()[inside], yy.ravel()[inside]], 1))
        ok = np.isfinite(inv).all(axis=1) & ~((inv[:, 0] == -1) & (inv[:, 1] == -1))
        idx = np.flatnonzero(inside)[ok]
        u[idx], v[idx] = inv[ok, 0], inv[ok, 1]
    return np.stack([(2 * u + 1) / n - 1, (2 * v + 1) / n - 1]).reshape(2, n, n).astype(np.float32)
