"""Sliced Wasserstein distance, the PGGAN protocol (Karras et al. 2017), in torch.

Reference: tkarras/progressive_growing_of_gans ``metrics/sliced_wasserstein.py`` (CoCosNet's
``cal_sliced_wasserstein.py`` wraps it); described in reference/metrics.md section 4:

1. levels: image height halved while >= 16 (256 -> 256,128,64,32,16);
2. Laplacian pyramid on float32 0..255 pixels: 5x5 binomial blur with reflect-101 borders
   (scipy ``mode='mirror'`` = cv2.pyrDown/pyrUp), the last level is the coarsest Gaussian;
3. per minibatch and level, 128 random 7x7x3 patches per image: all x centres drawn first
   (``randint(3, W-3)``), then all y centres; the patch array is (N, 3, 7, 7) with axis 2 = x
   offset and axis 3 = y offset, i.e. *transposed* -- this fixes the order of the 147 descriptor
   components and therefore the projections;
4. per level and per set, per-colour-channel normalisation over all patches and positions;
5. 4 repeats x 128 random unit directions (``randn(147, 128)``, column-normalised, float32),
   sorted projections, mean |difference|; times 1e3; the plain average over levels.

Random numbers come from a ``numpy.random.RandomState`` in the reference's call order, so with
the same stream this module gives the reference's numbers (tests/test_metrics_swd.py checks it
against an independent numpy implementation and against the published PGGAN test vector);
the heavy lifting (blur, gather, projection, sort) runs in torch.

Logged as ``swd`` (the average over levels, CoCosNet's ``SWDx1e3_avg``) and ``swd_l<res>``.
Real images are the ground truths (``reference_image``), as CoCosNet's fake_B vs real_B.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.metrics.base import METRICS, Metric, MetricContext, reference_image, to_uint8_hwc

NHOOD_SIZE = 7
NHOODS_PER_IMAGE = 128
DIR_REPEATS = 4
DIRS_PER_REPEAT = 128
MIN_RESOLUTION = 16

def level_resolutions(height: int) -> List[int]:
    """PGGAN's levels: the height, halved while it stays >= 16."""
    res, out = height, []
    while res >= MIN_RESOLUTION:
        out.append(res)
        res //= 2
    return out


# The 5x5 kernel outer([1,4,6,4,1], [1,4,6,4,1]) / 256 is separable with dyadic weights, so the
# separable sums below give the exact convolution values -- the values scipy.ndimage.convolve
# computes in double before rounding to its float32 output -- provided the arithmetic is exact:
# always in float64; and in float32 for uint8 input down to the second Gaussian level (G1 values
# are n/2^8 with n < 2^16, G2 values n/2^16 with n < 2^24, and every partial sum stays within
# float32's 24-bit mantissa). The levels are therefore bit-identical to the reference's (tested)
# for a fraction of the work: pyr_down evaluates only the kept (even) positions, pyr_up only the
# non-zero taps of the zero-stuffed image (polyphase), and the large levels run in float32.
_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)


def _pyr_down(x: torch.Tensor, exact_dtype: torch.dtype) -> torch.Tensor:
    """cv2.pyrDown / reference ``pyr_down``: blur with reflect-101 borders, keep even rows/cols."""
    h, w = x.shape[-2:]
    p = F.pad(x.to(exact_dtype), (2, 2, 2, 2), mode="reflect")
    cols = sum(_TAPS[j] * p[..., j:j + w:2] for j in range(5))
    return (sum(_TAPS[i] * cols[..., i:i + h:2, :] for i in range(5)) / 256.0).float()


def _upsample_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    """One axis of the reference ``pyr_up`` (zero-stuff to 2n, taps [1,4,6,4,1]/8, reflect-101).

    Even outputs are (x[a-1] + 6 x[a] + x[a+1]) / 8 and odd ones (x[a] + x[a+1]) / 2, where the
    reflect-101 border of the *stuffed* signal means x[-1] = x[1] and x[n] = x[n-1].
    """
    n = x.shape[dim]
    left = x.narrow(dim, 1 if n > 1 else 0, 1)
    xp = torch.cat([left, x, x.narrow(dim, n - 1, 1)], dim=dim)
    prev, cur, nxt = xp.narrow(dim, 0, n), xp.narrow(dim, 1, n), xp.narrow(dim, 2, n)
    out = torch.stack([(prev + 6.0 * cur + nxt) / 8.0, (cur + nxt) / 2.0], dim=dim + 1)
    shape = list(x.shape)
    shape[dim] = 2 * n
    return out.reshape(shape)


def _pyr_up(x: torch.Tensor, exact_dtype: torch.dtype) -> torch.Tensor:
    """cv2.pyrUp / reference ``pyr_up`` of a float32 level."""
    return _upsample_axis(_upsample_axis(x.to(exact_dtype), 3), 2).float()


def laplacian_pyramid(images: torch.Tensor, num_levels: int) -> List[torch.Tensor]:
    """(N, 3, H, W) 0..255 images -> ``num_levels`` float32 levels, finest first."""
    integral = images.dtype == torch.uint8

    def dtype(gaussian_index: int) -> torch.dtype:  # float32 only where it is provably exact
        return torch.float32 if integral and gaussian_index <= 1 else torch.float64

    pyramid = [images.float()]
    for k in range(1, num_levels):
        pyramid.append(_pyr_down(pyramid[-1], dtype(k - 1)))
        pyramid[-2] = pyramid[-2] - _pyr_up(pyramid[-1], dtype(k))
    return pyramid


def patch_descriptors(level: torch.Tensor, rng: np.random.RandomState,
                      nhood_size: int = NHOOD_SIZE, per_image: int = NHOODS_PER_IMAGE) -> torch.Tensor:
    """(N*per_image, 3, 7, 7) random patches of one level, in the reference's transposed layout.

    Centres: all x first, then all y (the reference's RNG order); out[p, c, i, j] is the pixel at
    row y_p + j - 3, column x_p + i - 3.
    """
    n, c, h, w = level.shape
    half = nhood_size // 2
    count = per_image * n
    x = torch.from_numpy(rng.randint(half, w - half, size=count)).to(level.device)
    y = torch.from_numpy(rng.randint(half, h - half, size=count)).to(level.device)
    offs = torch.arange(-half, half + 1, device=level.device)
    img = torch.arange(count, device=level.device) // per_image
    rows = (y[:, None] + offs[None, :])  # (P, 7) indexed by j
    cols = (x[:, None] + offs[None, :])  # (P, 7) indexed by i
    # gather level[img, :, rows[p, j], cols[p, i]] -> (P, C, i, j)
    flat = level.permute(0, 2, 3, 1).reshape(n * h * w, c)
    idx = (img[:, None, None] * h + rows[:, None, :]) * w + cols[:, :, None]  # (P, i, j)
    return flat[idx].permute(0, 3, 1, 2).contiguous()


def finalize_descriptors(desc: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate, normalise per colour channel over all patches and positions, flatten to 147-D.

    The channel mean and std are taken with numpy on float32, exactly as the reference does:
    SWD is a mean of small differences of sorted projections, so even the ~1e-6 rounding
    difference of another summation order shows up at ~1e-5 relative in the result. The
    element-wise subtract/divide are IEEE-exact in either library.
    """
    d = torch.cat(list(desc), dim=0).float()
    host = d.cpu().numpy()
    mean = np.mean(host, axis=(0, 2, 3), keepdims=True)
    d = d - torch.from_numpy(mean).to(d.device)
    std = np.std(d.cpu().numpy(), axis=(0, 2, 3), keepdims=True)
    d = d / torch.from_numpy(std).to(d.device)
    return d.reshape(d.shape[0], -1)


def _sort_rows(x: torch.Tensor) -> np.ndarray:
    """Sort each row. On CPU numpy's SIMD sort (x86-simd-sort) is ~5x faster than torch.sort,
    and sorting contiguous rows ~3x faster than the reference's column sort."""
    if x.device.type == "cpu":
        return np.sort(x.numpy(), axis=1)
    return torch.sort(x, dim=1).values.cpu().numpy()


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, rng: np.random.RandomState,
                       repeats: int = DIR_REPEATS, dirs_per_repeat: int = DIRS_PER_REPEAT) -> float:
    """Mean over ``repeats`` of the mean |sorted(a.dirs) - sorted(b.dirs)|; a, b: (M, D) equal shape.

    Projections are laid out (direction, patch) so every sort runs along a contiguous row.
    """
    if a.shape != b.shape:
        raise ValueError(f"SWD needs equally many patches in both sets, got {tuple(a.shape)} vs {tuple(b.shape)}")
    results = []
    for _ in range(repeats):
        dirs = rng.randn(a.shape[1], dirs_per_repeat)
        dirs /= np.sqrt(np.sum(np.square(dirs), axis=0, keepdims=True))
        d = torch.from_numpy(dirs.astype(np.float32).T.copy()).to(a.device)
        pa, pb = _sort_rows(d @ a.t()), _sort_rows(d @ b.t())
        results.append(float(np.mean(np.abs(pa - pb), dtype=np.float64)))
    return float(np.mean(results))


class SWDAccumulator:
    """Streams real and fake minibatches, then computes PGGAN's per-level and average SWDx1e3.

    Patch centres of reals come from ``rng_real``, of fakes from ``rng_fake``, directions from
    ``rng_dirs``; to reproduce the reference driver's single global stream, pass the same
    RandomState to all three and feed in its order (all reals, then all fakes).
    """

    def __init__(self, height: int, rng_real: np.random.RandomState, rng_fake: np.random.RandomState,
                 rng_dirs: np.random.RandomState):
        self.resolutions = level_resolutions(height)
        if not self.resolutions:
            raise ValueError(f"SWD needs images at least {MIN_RESOLUTION}px high, got {height}")
        self.rng = {"real": rng_real, "fake": rng_fake}
        self.rng_dirs = rng_dirs
        self.desc: Dict[str, List[List[torch.Tensor]]] = {"real": [[] for _ in self.resolutions],
                                                           "fake": [[] for _ in self.resolutions]}
        self.count = {"real": 0, "fake": 0}

    def feed(self, which: str, images: torch.Tensor) -> None:
        """(N, 3, H, W) images with 0..255 values (uint8 or float)."""
        if images.shape[2] != self.resolutions[0]:
            raise ValueError(f"SWD: image height {images.shape[2]} != {self.resolutions[0]} of earlier images")
        for lod, level in enumerate(laplacian_pyramid(images, len(self.resolutions))):
            self.desc[which][lod].append(patch_descriptors(level, self.rng[which]))
        self.count[which] += images.shape[0]

    def distances(self) -> List[float]:
        """SWDx1e3 per level (finest first); needs equal image counts."""
        if self.count["real"] != self.count["fake"]:
            raise ValueError(f"SWD needs equal numbers of real and generated images, got "
                             f"{self.count['real']} real and {self.count['fake']} generated")
        if self.count["real"] == 0:
            raise ValueError("SWD: no images were fed")
        out = []
        for lod in range(len(self.resolutions)):
            real = finalize_descriptors(self.desc["real"][lod])
            fake = finalize_descriptors(self.desc["fake"][lod])
            out.append(1e3 * sliced_wasserstein(real, fake, self.rng_dirs))
        return out


def to_uint8_nchw(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 NCHW, quantised like saved PNGs (the reference reads PNGs)."""
    return torch.from_numpy(to_uint8_hwc(x)).permute(0, 3, 1, 2)


@METRICS.register("swd")
class SlicedWassersteinDistance(Metric):
    """PGGAN SWD x1e3 of outputs vs ground truths: ``swd`` (average over levels) + ``swd_l<res>``.

    Options: ``max_images`` caps the images used (memory: ~75 KB per image per level per set);
    the cap and the counts are recorded. The noise floor is large for small N (about 30 for 40
    random-noise images at 64 px; PGGAN used 16384), so compare numbers at equal N only.
    """

    def __init__(self, ctx: MetricContext):
        super().__init__(ctx)
        opts = dict(ctx.options)
        self.max_images: Optional[int] = opts.pop("max_images", None)
        if opts:
            raise ValueError(f"swd: unknown options {sorted(opts)}; valid: max_images")
        self.acc: Optional[SWDAccumulator] = None
        self.skipped = 0

    def update(self, batch, out):
        real, fake = reference_image(batch), out.output
        if real.shape != fake.shape:
            raise ValueError(f"swd: output {tuple(fake.shape)} and ground truth {tuple(real.shape)} differ in shape")
        if self.acc is None:
            seed = self.ctx.seed
            self.acc = SWDAccumulator(real.shape[2], np.random.RandomState(seed),
                                      np.random.RandomState(seed + 1), np.random.RandomState(seed + 2))
        n = real.shape[0]
        if self.max_images is not None:
            n = max(0, min(n, int(self.max_images) - self.acc.count["real"]))
            self.skipped += real.shape[0] - n
        if n:
            self.acc.feed("real", to_uint8_nchw(real[:n]))
            self.acc.feed("fake", to_uint8_nchw(fake[:n]))

    def compute(self):
        if self.acc is None:
            raise ValueError("swd: no images were fed")
        dist = self.acc.distances()
        self.settings = {
            "swd_n_images": self.acc.count["real"], "swd_images_skipped": self.skipped,
            "swd_max_images": self.max_images, "swd_levels": ",".join(map(str, self.acc.resolutions)),
            "swd_protocol": "PGGAN (7x7 patches, 128/image/level, 4x128 dirs, x1e3)", "swd_seed": self.ctx.seed,
        }
        result = {f"swd_l{res}": d for res, d in zip(self.acc.resolutions, dist)}
        result["swd"] = float(np.mean(dist))
        return result
