"""Condition maps of the real datasets, built as the official CoCosNet / MIDMs code builds them.

* Pose (DeepFashion, ``data/deepfashion_dataset.py``): OpenPose COCO-18 skeleton drawn as
  circles and limb ellipses with the OpenPose colours and 0.4/0.6 blending (3 channels), plus one
  clipped L1 distance map per limb (17 channels) = 20 channels.
* CelebA-HQ edges (``data/celebahqedge_dataset.py``): part-mask boundaries, Canny on background
  and hair, 13 per-part distance maps, boundaries alone = 15 channels.
* "Canny + connected landmarks" (the CoCosNet paper's wording): landmark polylines on the face,
  Canny outside it, 1 channel.
* Canny edges (MetFaces default), HED edges (MetFaces ``hed`` variant, needs the weights file).
* One-hot class maps and the SPADE colour map for pictures of label maps.

The official code draws with OpenCV, which this project does not depend on; the drawing here
uses numpy/scikit-image with the same geometry (OpenCV's ``ellipse2Poly`` vertices, filled
polygons including their outline, ``addWeighted`` rounding). Edge pixels of a shape may differ
by one pixel from OpenCV's rasteriser. ``cv2.distanceTransform(DIST_L1, 3)`` is an exact
city-block distance, which ``scipy.ndimage.distance_transform_cdt(metric="taxicab")`` reproduces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage import draw, feature

# ---- pose -----------------------------------------------------------------------------------
COCO18 = ("nose", "neck", "r_sho", "r_elb", "r_wri", "l_sho", "l_elb", "l_wri", "r_hip", "r_knee",
          "r_ank", "l_hip", "l_knee", "l_ank", "r_eye", "l_eye", "r_ear", "l_ear")
# 1-based keypoint pairs, as in the official code; only the first 17 are drawn there.
LIMB_SEQ = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
            (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18))
NUM_LIMBS = 17
# OpenPose colours as the official code lists them. It draws on a BGR canvas and converts to RGB
# at the end, so in the final picture each triple appears reversed; we draw the reversed triple.
OPENPOSE_COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
                    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
                    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
POSE_CHANNELS = 3 + NUM_LIMBS


@dataclass(frozen=True)
class PoseStyle:
    """Stroke sizes in canvas pixels: In-shop 256 canvas uses 4/4, DeepFashion-HD's 1024 canvas 20/20."""

    stickwidth: int = 4
    radius: int = 4


def ellipse_polygon(center: Tuple[int, int], axes: Tuple[int, int], angle: int) -> np.ndarray:
    """Vertices (x, y) of OpenCV's ``ellipse2Poly(center, axes, angle, 0, 360, 1)`` (integer degrees)."""
    angle = angle % 360
    a, b = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    t = np.radians(np.arange(0, 361))
    x = axes[0] * np.cos(t)
    y = axes[1] * np.sin(t)
    px = np.rint(center[0] + x * a - y * b)
    py = np.rint(center[1] + x * b + y * a)
    pts = np.stack([px, py], axis=1).astype(np.int64)
    keep = np.ones(len(pts), dtype=bool)
    keep[1:] = (pts[1:] != pts[:-1]).any(axis=1)  # OpenCV drops repeated consecutive vertices
    return pts[keep]


def polygon_mask(pts: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Filled polygon including its outline (``fillConvexPoly`` paints boundary pixels too)."""
    mask = np.zeros(shape, dtype=bool)
    rr, cc = draw.polygon(pts[:, 1], pts[:, 0], shape=shape)
    mask[rr, cc] = True
    rr, cc = draw.polygon_perimeter(pts[:, 1], pts[:, 0], shape=shape, clip=False)
    ok = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
    mask[rr[ok], cc[ok]] = True
    return mask


def disk_mask(cx: int, cy: int, radius: int, shape: Tuple[int, int]) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius * radius


def add_weighted(a: np.ndarray, b: np.ndarray, wa: float = 0.4, wb: float = 0.6) -> np.ndarray:
    """``cv2.addWeighted`` on uint8: round half to even, saturate."""
    return np.clip(np.rint(a.astype(np.float64) * wa + b.astype(np.float64) * wb), 0, 255).astype(np.uint8)


def l1_distance_map(zero_mask: np.ndarray) -> np.ndarray:
    """City-block distance to the nearest True pixel, /3, clipped to 255, uint8 (the official scaling).

    With no True pixel at all (a limb or part that is absent) OpenCV returns huge distances, which
    the clip turns into 255 everywhere; the same is returned here.
    """
    if not zero_mask.any():
        return np.full(zero_mask.shape, 255, dtype=np.uint8)
    dist = ndimage.distance_transform_cdt(~zero_mask, metric="taxicab").astype(np.float64)
    return np.clip(dist / 3.0, 0, 255).astype(np.uint8)


def draw_pose(keypoints: np.ndarray, canvas_hw: Tuple[int, int], style: PoseStyle) -> Tuple[np.ndarray, np.ndarray]:
    """Skeleton picture (H, W, 3) uint8 RGB and per-limb distance maps (17, H, W) uint8.

    ``keypoints``: (18, 2) canvas coordinates (x, y), NaN where the keypoint is missing. Keypoints are
    truncated to integers as the official code does (``int(x)``).
    """
    h, w = canvas_hw
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    present = np.isfinite(keypoints).all(axis=1)
    for i in range(18):
        if present[i]:
            x, y = int(keypoints[i, 0]), int(keypoints[i, 1])
            canvas[disk_mask(x, y, style.radius, (h, w))] = OPENPOSE_COLOURS[i][::-1]
    dists = np.empty((NUM_LIMBS, h, w), dtype=np.uint8)
    for i in range(NUM_LIMBS):
        a, b = LIMB_SEQ[i][0] - 1, LIMB_SEQ[i][1] - 1
        if not (present[a] and present[b]):
            dists[i] = 255
            continue
        (x0, y0), (x1, y1) = keypoints[a], keypoints[b]
        length = math.hypot(x0 - x1, y0 - y1)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        center = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        pts = ellipse_polygon(center, (int(length / 2), style.stickwidth), int(angle))
        limb = polygon_mask(pts, (h, w))
        cur = canvas.copy()
        cur[limb] = OPENPOSE_COLOURS[i][::-1]
        canvas = add_weighted(canvas, cur)
        dists[i] = l1_distance_map(limb)
    return canvas, dists


def pose_condition(keypoints: np.ndarray, canvas_hw: Tuple[int, int], style: PoseStyle, resolution: int) -> np.ndarray:
    """The 20-channel DeepFashion condition at ``resolution``, uint8 (divide by 255 for [0, 1]).

    As in the official code the skeleton is resized NEAREST and the distance maps BILINEAR.
    """
    skeleton, dists = draw_pose(keypoints, canvas_hw, style)
    size = (resolution, resolution)
    out = np.empty((POSE_CHANNELS, resolution, resolution), dtype=np.uint8)
    sk = Image.fromarray(skeleton)
    out[:3] = np.asarray(sk if sk.size == size else sk.resize(size, Image.NEAREST)).transpose(2, 0, 1)
    for i in range(NUM_LIMBS):
        d = Image.fromarray(dists[i])
        out[3 + i] = np.asarray(d if d.size == size else d.resize(size, Image.BILINEAR))
    return out


# ---- edges ----------------------------------------------------------------------------------
def boundaries(t: np.ndarray) -> np.ndarray:
    """Pixels on either side of a value change (``get_edges`` of the official code)."""
    edge = np.zeros(t.shape, dtype=bool)
    dx = t[:, 1:] != t[:, :-1]
    dy = t[1:, :] != t[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return edge


def canny(grey: np.ndarray, sigma: float = 1.0, low: Optional[float] = None, high: Optional[float] = None) -> np.ndarray:
    """scikit-image Canny (its defaults when thresholds are None), boolean."""
    return feature.canny(grey, sigma=sigma, low_threshold=low, high_threshold=high)


# Parts in the order of the 13 distance channels of the official edge construction.
CELEBA_EDGE_PARTS = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "l_ear", "r_ear", "nose", "u_lip", "mouth",
                     "l_lip", "eye_g", "hair")
CELEBA_EDGE_CHANNELS = 15


def celeba_edge_condition(grey: np.ndarray, parts: Dict[str, Optional[np.ndarray]], sigma: float = 1.0) -> np.ndarray:
    """The 15-channel CelebA-HQ edge condition, uint8 (0/255 edges, distance maps as in ``l1_distance_map``).

    ``grey``: (R, R) uint8 photo resized BILINEAR to R; ``parts``: part name -> (R, R) bool mask
    (resized NEAREST) or None when the part file is absent (the part is absent from the face).
    Channel 0: part boundaries plus Canny restricted to non-face pixels (background, hair, and parts
    not in the list such as neck and cloth); 1-13: distance to each part's boundary; 14: boundaries.
    """
    r = grey.shape[0]
    non_face = np.ones((r, r), dtype=bool)
    edges = np.zeros((r, r), dtype=bool)
    out = np.empty((CELEBA_EDGE_CHANNELS, r, r), dtype=np.uint8)
    for i, name in enumerate(CELEBA_EDGE_PARTS):
        mask = parts.get(name)
        part_edge = np.zeros((r, r), dtype=bool)
        if mask is not None:
            non_face[mask] = name == "hair"
            part_edge = boundaries(mask)
            edges |= part_edge
        out[1 + i] = l1_distance_map(part_edge)
    edges_all = edges | (canny(grey, sigma) & non_face)
    out[0] = edges_all.astype(np.uint8) * 255
    out[14] = edges.astype(np.uint8) * 255
    return out


# iBUG-68 groups (0-based) joined by straight segments; (indices, closed).
LANDMARK_GROUPS = ((tuple(range(0, 17)), False), (tuple(range(17, 22)), False), (tuple(range(22, 27)), False),
                   (tuple(range(27, 31)), False), (tuple(range(30, 36)), False), (tuple(range(36, 42)), True),
                   (tuple(range(42, 48)), True), (tuple(range(48, 60)), True), (tuple(range(60, 68)), True))


def landmark_lines(points: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Connected iBUG-68 landmarks as 1-pixel lines; segments touching a missing (NaN) point are left out."""
    out = np.zeros(shape, dtype=bool)
    for idx, closed in LANDMARK_GROUPS:
        seq = list(idx) + ([idx[0]] if closed else [])
        for a, b in zip(seq[:-1], seq[1:]):
            if not (np.isfinite(points[a]).all() and np.isfinite(points[b]).all()):
                continue
            rr, cc = draw.line(int(round(points[a, 1])), int(round(points[a, 0])),
                               int(round(points[b, 1])), int(round(points[b, 0])))
            ok = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
            out[rr[ok], cc[ok]] = True
    return out


def face_region(points: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Inside the outline jaw (0-16) + brows (26..17): where Canny is replaced by the landmark lines."""
    outline = [i for i in list(range(0, 17)) + list(range(26, 16, -1)) if np.isfinite(points[i]).all()]
    if len(outline) < 3:
        return np.zeros(shape, dtype=bool)
    pts = points[outline]
    rr, cc = draw.polygon(pts[:, 1], pts[:, 0], shape=shape)
    mask = np.zeros(shape, dtype=bool)
    mask[rr, cc] = True
    return mask


def landmark_edge_condition(grey: np.ndarray, points: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """1-channel "Canny + connected landmarks" map, uint8 0/255: lines on the face, Canny elsewhere."""
    shape = grey.shape
    edges = landmark_lines(points, shape) | (canny(grey, sigma) & ~face_region(points, shape))
    return edges.astype(np.uint8)[None] * 255


# ---- label maps -----------------------------------------------------------------------------
def one_hot(label: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) int class map -> (num_classes, H, W) float32 one-hot (the official ``scatter_``)."""
    out = np.zeros((num_classes,) + label.shape, dtype=np.float32)
    np.put_along_axis(out, label[None].astype(np.int64), 1.0, axis=0)
    return out


def label_palette(n: int) -> np.ndarray:
    """SPADE's ``labelcolormap``: a fixed colour per class (bit-interleaved), (n, 3) uint8; class 0 black."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        cid = i
        for j in range(7):
            r |= ((cid >> 0) & 1) << (7 - j)
            g |= ((cid >> 1) & 1) << (7 - j)
            b |= ((cid >> 2) & 1) << (7 - j)
            cid >>= 3
        cmap[i] = (r, g, b)
    return cmap


# ---- HED ------------------------------------------------------------------------------------
HED_FILE = "network-bsds500.pytorch"
HED_URL = "http://content.sniklaus.com/github/pytorch-hed/network-bsds500.pytorch"


def _vgg_block(cin: int, cout: int, convs: int, pool: bool) -> torch.nn.Sequential:
    layers: list = [torch.nn.MaxPool2d(kernel_size=2, stride=2)] if pool else []
    for k in range(convs):
        layers += [torch.nn.Conv2d(cin if k == 0 else cout, cout, 3, 1, 1), torch.nn.ReLU(inplace=False)]
    return torch.nn.Sequential(*layers)


class HED(torch.nn.Module):
    """Holistically-nested edge detection (Xie & Tu 2015), the layout of sniklaus/pytorch-hed so its
    converted BSDS500 weights (``network-bsds500.pytorch``) load by name."""

    def __init__(self):
        super().__init__()
        self.moduleVggOne = _vgg_block(3, 64, 2, False)
        self.moduleVggTwo = _vgg_block(64, 128, 2, True)
        self.moduleVggThr = _vgg_block(128, 256, 3, True)
        self.moduleVggFou = _vgg_block(256, 512, 3, True)
        self.moduleVggFiv = _vgg_block(512, 512, 3, True)
        self.moduleScoreOne = torch.nn.Conv2d(64, 1, 1)
        self.moduleScoreTwo = torch.nn.Conv2d(128, 1, 1)
        self.moduleScoreThr = torch.nn.Conv2d(256, 1, 1)
        self.moduleScoreFou = torch.nn.Conv2d(512, 1, 1)
        self.moduleScoreFiv = torch.nn.Conv2d(512, 1, 1)
        self.moduleCombine = torch.nn.Sequential(torch.nn.Conv2d(5, 1, 1), torch.nn.Sigmoid())

    def forward(self, rgb01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) edge probability."""
        bgr = rgb01.flip(1) * 255.0 - torch.tensor([104.00698793, 116.66876762, 122.67891434],
                                                   device=rgb01.device).view(1, 3, 1, 1)
        f1 = self.moduleVggOne(bgr)
        f2 = self.moduleVggTwo(f1)
        f3 = self.moduleVggThr(f2)
        f4 = self.moduleVggFou(f3)
        f5 = self.moduleVggFiv(f4)
        size = rgb01.shape[-2:]
        scores = [torch.nn.functional.interpolate(s(f), size=size, mode="bilinear", align_corners=False)
                  for s, f in ((self.moduleScoreOne, f1), (self.moduleScoreTwo, f2), (self.moduleScoreThr, f3),
                               (self.moduleScoreFou, f4), (self.moduleScoreFiv, f5))]
        return self.moduleCombine(torch.cat(scores, 1))


def load_hed(path) -> HED:
    """HED with the weights in ``path`` (``torch.load(weights_only=True)``); accepts the newer ``net*`` key names."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.replace("net", "module", 1) if k.startswith("net") else k: v for k, v in state.items()}
    model = HED()
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def hed_edges(model: HED, rgb01: np.ndarray) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1] -> (1, H, W) uint8 edge probability x 255."""
    x = torch.from_numpy(np.ascontiguousarray(rgb01.transpose(2, 0, 1)))[None].float()
    prob = model(x)[0].clamp(0, 1).numpy()
    return np.rint(prob * 255).astype(np.uint8)


def grey_uint8(rgb: Image.Image, resolution: int, resample: int = Image.BILINEAR) -> np.ndarray:
    """The photo as an (R, R) uint8 grey array, resized as the official edge code does (BILINEAR)."""
    img = rgb if rgb.size == (resolution, resolution) else rgb.resize((resolution, resolution), resample)
    return np.asarray(img.convert("L"))


def first_channel_vis(maps: np.ndarray) -> np.ndarray:
    """A 1-channel map (C, H, W) in [0, 1] as an (H, W, 3) grey picture of channel 0."""
    return np.repeat(maps[0][..., None], 3, axis=2)

