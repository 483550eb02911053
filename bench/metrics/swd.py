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
the heavy lifting (blur, gather, projection) runs in torch; on CPU the sorts use numpy's SIMD
sort (measured ~5x faster than torch.sort here) on the tensors' memory.

Logged as ``swd`` (the average over levels, CoCosNet's ``SWDx1e3_avg``) and ``swd_l<res>``.
Real images are the ground truths (``reference_image``), as CoCosNet's fake_B vs real_B.
"""
from __future__ import annotations

import contextlib
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


def _taps5(even: torch.Tensor, odd: torch.Tensor, dim: int, n_out: int) -> torch.Tensor:
    """sum_j k_j p[2c + j] for the taps (1, 4, 6, 4, 1), given p's even and odd samples along dim."""
    e = lambda i: even.narrow(dim, i, n_out)  # noqa: E731 - p[2c + 2i]
    o = lambda i: odd.narrow(dim, i, n_out)  # noqa: E731 - p[2c + 2i + 1]
    acc = e(0) + e(2)
    return acc.add_(o(0), alpha=4).add_(o(1), alpha=4).add_(e(1), alpha=6)


def _pyr_down(x: torch.Tensor, exact_dtype: torch.dtype) -> torch.Tensor:
    """cv2.pyrDown / reference ``pyr_down``: blur with reflect-101 borders, keep even rows/cols.

    Only the kept positions are computed; the padded signal is split into its even and odd
    samples first so every tap reads a contiguous run.
    """
    h, w = x.shape[-2:]
    p = F.pad(x.to(exact_dtype), (2, 2, 2, 2), mode="reflect")
    cols = _taps5(p[..., 0::2].contiguous(), p[..., 1::2].contiguous(), 3, (w + 1) // 2)
    rows = _taps5(cols[..., 0::2, :], cols[..., 1::2, :], 2, (h + 1) // 2)
    return rows.div_(256.0).float()


def _upsample_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    """One axis of the reference ``pyr_up`` (zero-stuff to 2n, taps [1,4,6,4,1]/8, reflect-101).

    Even outputs are (x[a-1] + 6 x[a] + x[a+1]) / 8 and odd ones (x[a] + x[a+1]) / 2, where the
    reflect-101 border of the *stuffed* signal means x[-1] = x[1] and x[n] = x[n-1].
    """
    n = x.shape[dim]
    xp = torch.cat([x.narrow(dim, 1 if n > 1 else 0, 1), x, x.narrow(dim, n - 1, 1)], dim=dim)
    prev, cur, nxt = xp.narrow(dim, 0, n), xp.narrow(dim, 1, n), xp.narrow(dim, 2, n)
    shape = list(x.shape)
    shape[dim] = 2 * n
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    even = [slice(None)] * x.dim()
    odd = [slice(None)] * x.dim()
    even[dim], odd[dim] = slice(0, None, 2), slice(1, None, 2)
    out[tuple(even)] = (prev + nxt).add_(cur, alpha=6).div_(8.0)
    out[tuple(odd)] = (cur + nxt).div_(2.0)
    return out


def _pyr_up(x: torch.Tensor, exact_dtype: torch.dtype) -> torch.Tensor:
    """cv2.pyrUp / reference ``pyr_up`` of a float32 level (columns first: the cheaper
    strided interleave runs on the smaller array)."""
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

    The channel mean and std are numpy's float32 reductions, exactly as in the reference: SWD is a
    mean of small differences of sorted projections, so even the ~1e-7 rounding difference of
    another summation order shows up at ~1e-5 relative in the result. On CPU the subtraction and
    division run in place on the tensor's memory (IEEE-exact in either library).
    """
    d = torch.cat(list(desc), dim=0).float()
    if d.device.type == "cpu":
        host = d.numpy()
        host -= np.mean(host, axis=(0, 2, 3), keepdims=True)
        host /= np.std(host, axis=(0, 2, 3), keepdims=True)
        return d.reshape(d.shape[0], -1)
    d = d - torch.from_numpy(np.mean(d.cpu().numpy(), axis=(0, 2, 3), keepdims=True)).to(d.device)
    d = d / torch.from_numpy(np.std(d.cpu().numpy(), axis=(0, 2, 3), keepdims=True)).to(d.device)
    return d.reshape(d.shape[0], -1)


def _sort_rows_inplace(x: torch.Tensor) -> np.ndarray:
    """Sort each row of a (directions, patches) projection matrix, in place on CPU.

    numpy's SIMD sort (x86-simd-sort) is ~5x faster than torch.sort on CPU and, on contiguous
    rows, ~3x faster than the reference's column sort.
    """
    if x.device.type != "cpu":
        return torch.sort(x, dim=1).values.cpu().numpy()
    arr = x.numpy()
    arr.sort(axis=1)
    return arr


@contextlib.contextmanager
def single_threaded_torch():
    """Run torch ops on one thread for the duration (restored after).

    SWD's torch work is many small memory-bound ops; on a shared 2-core machine, OpenMP's
    barriers made them ~5x slower with 2 threads than with 1 (measured, load ~10).
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, rng: np.random.RandomState,
                       repeats: int = DIR_REPEATS, dirs_per_repeat: int = DIRS_PER_REPEAT) -> float:
    """Mean over ``repeats`` of the mean |sorted(a.dirs) - sorted(b.dirs)|; a, b: (M, D) equal shape.

    The repeats' directions are drawn up front in the reference's order (the same stream), then
    each set's projections come from one matmul laid out (direction, patch), so every sort runs
    along a contiguous row.
    """
    if a.shape != b.shape:
        raise ValueError(f"SWD needs equally many patches in both sets, got {tuple(a.shape)} vs {tuple(b.shape)}")
    dirs = []
    for _ in range(repeats):
        d = rng.randn(a.shape[1], dirs_per_repeat)
        d /= np.sqrt(np.sum(np.square(d), axis=0, keepdims=True))
        dirs.append(d.astype(np.float32).T)
    d = torch.from_numpy(np.concatenate(dirs)).to(a.device)  # (repeats * dirs, D)
    pa = _sort_rows_inplace(d @ a.t())
    pb = _sort_rows_inplace(d @ b.t())
    np.subtract(pa, pb, out=pa)
    np.abs(pa, out=pa)
    per_repeat = np.mean(pa.reshape(repeats, -1), axis=1, dtype=np.float64)
    return float(np.mean(per_repeat))


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
        with single_threaded_torch():
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
        with single_threaded_torch():
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
            "n_images": self.acc.count["real"], "images_skipped": self.skipped,
            "max_images": self.max_images, "levels": ",".join(map(str, self.acc.resolutions)),
            "protocol": "PGGAN (7x7 patches, 128/image/level, 4x128 dirs, x1e3)", "seed": self.ctx.seed,
            "quantisation": "uint8",
        }
        result = {f"swd_l{res}": d for res, d in zip(self.acc.resolutions, dist)}
        result["swd"] = float(np.mean(dist))
        return result
