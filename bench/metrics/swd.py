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
against an independent numpy implementation and against the published PGGAN test vector).

Where the time goes and what is done about it (scripts/bench_metrics.py measures it):
- the pyramid: the Gaussian levels are computed whole, with exact dyadic arithmetic in float32
  where it is provably exact; the Laplacian of a large level is evaluated only at the ~12 % of
  pixels some patch reads (``laplacian_patch_descriptors``; bit-identical, tested);
- projections: one matmul per set and level, laid out (direction, patch) so that
- the sorts run along contiguous rows with numpy's SIMD sort (~7x faster than the reference's
  column sort, ~20x faster than torch.sort on CPU), split over threads when torch has several;
- the per-channel normalisation stays numpy's float32 reductions, as in the reference (see
  ``finalize_descriptors``).

Logged as ``swd`` (the average over levels, CoCosNet's ``SWDx1e3_avg``) and ``swd_l<res>``.
Real images are the ground truths (``reference_image``), as CoCosNet's fake_B vs real_B.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from bench.metrics.base import METRICS, Metric, MetricContext, reference_image, to_uint8_hwc

NHOOD_SIZE = 7
NHOODS_PER_IMAGE = 128
DIR_REPEATS = 4
DIRS_PER_REPEAT = 128
MIN_RESOLUTION = 16
# A level is evaluated at the sampled pixels only when it has this many times more pixels than
# the patches read (measured crossover on CPU; below it the whole-level ops are cheaper).
SPARSE_LAPLACIAN_MIN_RATIO = 2
# Below this many pixels per image the pyramid is built on one thread (measured: 64^2 slower with 2).
PARALLEL_MIN_PIXELS = 128 * 128


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


def _exact_dtype(integral: bool, gaussian_index: int) -> torch.dtype:
    """float32 only where it is provably exact (uint8 input, Gaussian levels 0 and 1), else float64."""
    return torch.float32 if integral and gaussian_index <= 1 else torch.float64


def gaussian_pyramid(images: torch.Tensor, num_levels: int) -> List[torch.Tensor]:
    """(N, 3, H, W) 0..255 images -> the ``num_levels`` float32 Gaussian levels G_0 .. G_{L-1}."""
    integral = images.dtype == torch.uint8
    levels = [images.float()]
    for k in range(1, num_levels):
        levels.append(_pyr_down(levels[-1], _exact_dtype(integral, k - 1)))
    return levels


def laplacian_pyramid(images: torch.Tensor, num_levels: int) -> List[torch.Tensor]:
    """(N, 3, H, W) 0..255 images -> ``num_levels`` float32 levels, finest first:
    L_k = G_k - pyr_up(G_{k+1}), the last level the coarsest Gaussian. The definition, whole; the
    metric samples it through ``laplacian_patch_descriptors`` (tested equal)."""
    integral = images.dtype == torch.uint8
    pyramid = gaussian_pyramid(images, num_levels)
    for k in range(num_levels - 1):
        pyramid[k] = pyramid[k] - _pyr_up(pyramid[k + 1], _exact_dtype(integral, k + 1))
    return pyramid


def _patch_centres(rng: np.random.RandomState, count: int, h: int, w: int, half: int):
    """The reference's draws for one level: all x centres first, then all y."""
    x = torch.from_numpy(rng.randint(half, w - half, size=count))
    y = torch.from_numpy(rng.randint(half, h - half, size=count))
    return x, y


def _gather_patches(level: torch.Tensor, x: torch.Tensor, y: torch.Tensor, per_image: int,
                    size: int, first: int = 0) -> torch.Tensor:
    """(P, C, size, size) with out[p, c, i, j] = level[p // per_image, c, y_p + first + j, x_p + first + i]
    (the reference's transposed layout), by one ``torch.take`` on NCHW flat indices."""
    n, c, h, w = level.shape
    offs = torch.arange(first, first + size)
    # offset of (c, i, j) from a patch's (y + first, x + first) corner, then one broadcast add
    pattern = (torch.arange(c)[:, None, None] * h + offs[None, None, :]) * w + offs[None, :, None]
    base = (torch.arange(x.shape[0]) // per_image) * (c * h * w) + y * w + x
    return torch.take(level, (base[:, None, None, None] + pattern[None]).to(level.device))


def patch_descriptors(level: torch.Tensor, rng: np.random.RandomState,
                      nhood_size: int = NHOOD_SIZE, per_image: int = NHOODS_PER_IMAGE) -> torch.Tensor:
    """(N*per_image, 3, 7, 7) random patches of one level, in the reference's transposed layout.

    Centres: all x first, then all y (the reference's RNG order); out[p, c, i, j] is the pixel at
    row y_p + j - 3, column x_p + i - 3.
    """
    n, _, h, w = level.shape
    half = nhood_size // 2
    x, y = _patch_centres(rng, per_image * n, h, w, half)
    return _gather_patches(level, x, y, per_image, nhood_size, -half)


def _upsample_rows_matrix(nhood_size: int, parity: int) -> torch.Tensor:
    """(size, size - 1) weights of pyr_up along one axis for the ``size`` outputs r0 .. r0+size-1,
    r0 = 2 a0 + parity, from the window of inputs a0 - 1 .. a0 + size - 2 (see _upsample_axis:
    even outputs (x[a-1] + 6 x[a] + x[a+1]) / 8, odd ones (x[a] + x[a+1]) / 2)."""
    m = torch.zeros(nhood_size, nhood_size - 1, dtype=torch.float64)
    for j in range(nhood_size):
        rel = parity + j  # r - 2 a0
        a = rel // 2 + 1  # window index of x[r // 2]
        if rel % 2 == 0:
            m[j, a - 1], m[j, a], m[j, a + 1] = 1 / 8, 6 / 8, 1 / 8
        else:
            m[j, a], m[j, a + 1] = 1 / 2, 1 / 2
    return m


def _upsampled_patches(coarse: torch.Tensor, x: torch.Tensor, y: torch.Tensor, per_image: int,
                       nhood_size: int, exact_dtype: torch.dtype) -> torch.Tensor:
    """pyr_up(coarse) at the pixels of the patches centred at (x, y), without upsampling the level.

    Each 7x7 patch of the 2x upsampled image reads a 6x6 window of ``coarse``; the reflect-101
    border of the zero-stuffed signal maps window index -1 to 1 and n to n-1. The two separable
    passes are per-patch matrix products whose weights depend on the parity of the patch corner.
    Every product and partial sum is exact in ``exact_dtype`` (dyadic weights; see _TAPS), so the
    values are bit-identical to ``_pyr_up`` followed by a gather (tested).
    """
    n, c, hn, wn = coarse.shape
    half, win = nhood_size // 2, nhood_size - 1
    y0, x0 = y - half, x - half  # patch corner in the fine level
    steps = torch.arange(win) - 1

    def window(start: torch.Tensor, size: int) -> torch.Tensor:  # (P, win) coarse indices, reflected
        idx = (start // 2)[:, None] + steps[None, :]
        idx = torch.where(idx < 0, -idx, idx)
        return torch.where(idx >= size, 2 * size - 1 - idx, idx).clamp_(0, size - 1)

    rows, cols = window(y0, hn), window(x0, wn)
    plane = (torch.arange(x.shape[0]) // per_image)[:, None] * c + torch.arange(c)[None, :]  # (P, C)
    idx = (plane[:, :, None, None] * hn + rows[:, None, :, None]) * wn + cols[:, None, None, :]
    block = torch.take(coarse, idx.to(coarse.device)).to(exact_dtype)  # (P, C, win rows, win cols)
    mats = torch.stack([_upsample_rows_matrix(nhood_size, q) for q in (0, 1)]).to(exact_dtype).to(coarse.device)
    col_w = mats[(x0 % 2).to(coarse.device)]  # (P, 7 i, win)
    row_w = mats[(y0 % 2).to(coarse.device)]  # (P, 7 j, win)
    p = block.shape[0]
    # along columns: (P, C*rows, cols) @ (P, cols, i) -> (P, C, rows, i)
    t = torch.bmm(block.reshape(p, c * win, win), col_w.transpose(1, 2)).view(p, c, win, nhood_size)
    # along rows: (P, C, i, rows) @ (P, rows, j) -> (P, C, i, j): the reference's layout
    out = torch.bmm(t.transpose(2, 3).reshape(p, c * nhood_size, win), row_w.transpose(1, 2))
    return out.view(p, c, nhood_size, nhood_size).float()


def laplacian_patch_descriptors(images: torch.Tensor, num_levels: int, rng: np.random.RandomState,
                                nhood_size: int = NHOOD_SIZE, per_image: int = NHOODS_PER_IMAGE,
                                threads: int = 1) -> List[torch.Tensor]:
    """``patch_descriptors`` of every ``laplacian_pyramid`` level, same draws, same values.

    Only ~12 % of a 256^2 level lies in some patch, so on the large levels the Laplacian
    G_k - pyr_up(G_{k+1}) is evaluated at the sampled pixels only; small levels, where the
    patches cover the level several times over, are computed whole. The centres of every level
    are drawn first (the reference's order), so ``threads`` > 1 can then process slices of the
    batch concurrently (torch releases the GIL); the result does not depend on ``threads``.
    """
    n, _, h, w = images.shape
    half = nhood_size // 2
    centres = []
    for _ in range(num_levels):
        centres.append(_patch_centres(rng, per_image * n, h, w, half))
        h, w = (h + 1) // 2, (w + 1) // 2  # the size _pyr_down gives
    if images.shape[-2] * images.shape[-1] < PARALLEL_MIN_PIXELS:
        threads = 1  # small images: the threads' start-up and the final concatenation cost more

    def work(lo_hi) -> List[torch.Tensor]:
        lo, hi = lo_hi
        return _laplacian_patches(images[lo:hi], [(x[lo * per_image:hi * per_image], y[lo * per_image:hi * per_image])
                                                  for x, y in centres], nhood_size, per_image)

    parts = _map_threads(work, _spans(n, threads), threads)
    if len(parts) == 1:
        return parts[0]
    return [torch.cat([p[k] for p in parts]) for k in range(num_levels)]


def _laplacian_patches(images: torch.Tensor, centres, nhood_size: int, per_image: int) -> List[torch.Tensor]:
    """The patches at the given centres (one (x, y) pair of index tensors per level) of ``images``."""
    integral = images.dtype == torch.uint8
    gauss = gaussian_pyramid(images, len(centres))
    half = nhood_size // 2
    out = []
    for k, (level, (x, y)) in enumerate(zip(gauss, centres)):
        h, w = level.shape[-2:]
        dtype = _exact_dtype(integral, k + 1)
        if k == len(centres) - 1:  # the coarsest level is the Gaussian itself
            out.append(_gather_patches(level, x, y, per_image, nhood_size, -half))
        elif h * w > SPARSE_LAPLACIAN_MIN_RATIO * per_image * nhood_size ** 2:
            fine = _gather_patches(level, x, y, per_image, nhood_size, -half)
            out.append(fine - _upsampled_patches(gauss[k + 1], x, y, per_image, nhood_size, dtype))
        else:
            whole = level - _pyr_up(gauss[k + 1], dtype)
            out.append(_gather_patches(whole, x, y, per_image, nhood_size, -half))
    return out


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


def _sorted_projections(d: torch.Tensor, sets: Sequence[torch.Tensor], threads: int = 1) -> List[np.ndarray]:
    """Per set x, the (direction, patch) projections ``d @ x.T`` with every row sorted.

    The rows are sorted with numpy's SIMD sort (x86-simd-sort: ~20x faster than torch.sort on
    CPU and, on contiguous rows, ~7x faster than the reference's column sort; measured, AVX-512).
    With ``threads`` > 1, (set, block of directions) tasks -- a matmul into their rows, then the
    sort of those rows -- run concurrently, torch single-threaded (numpy and torch release the
    GIL): ~2x faster on 2 cores than a 2-thread matmul followed by split sorts, whose OpenMP
    threads keep spinning and starve the sorting threads (measured).
    """
    if d.device.type != "cpu":
        return [torch.sort(d @ x.t(), dim=1).values.cpu().numpy() for x in sets]
    outs = [torch.empty(d.shape[0], x.shape[0], dtype=torch.float32) for x in sets]
    jobs = [(out, x, lo, hi) for out, x in zip(outs, sets)
            for lo, hi in _spans(d.shape[0], max(1, -(-threads // len(sets))))]

    def run(job) -> None:
        out, x, lo, hi = job
        torch.mm(d[lo:hi], x.t(), out=out[lo:hi])
        out[lo:hi].numpy().sort(axis=1)

    with single_threaded_torch() if threads > 1 else contextlib.nullcontext():
        _map_threads(run, jobs, threads)
    return [out.numpy() for out in outs]


def _spans(n: int, parts: int) -> List[Tuple[int, int]]:
    """``range(n)`` cut into ``min(parts, n)`` contiguous, near-equal (lo, hi) spans."""
    bounds = np.linspace(0, n, max(1, min(parts, n)) + 1).astype(int)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _map_threads(fn, jobs: Sequence, threads: int) -> list:
    """``[fn(job) for job in jobs]`` on up to ``threads`` threads (in this one when 1): the jobs
    release the GIL in torch and numpy kernels."""
    if threads <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    with ThreadPoolExecutor(min(threads, len(jobs))) as pool:
        return list(pool.map(fn, jobs))


@contextlib.contextmanager
def single_threaded_torch():
    """Run torch ops on one thread for the duration (restored after).

    SWD's pyramid and gathers are many small memory-bound ops; on a shared 2-core machine,
    OpenMP's barriers made them ~5x slower with 2 threads than with 1 (measured, load ~10).
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def draw_directions(rng: np.random.RandomState, dim: int, repeats: int = DIR_REPEATS,
                    dirs_per_repeat: int = DIRS_PER_REPEAT) -> np.ndarray:
    """The reference's random unit directions for one call, (repeats * dirs, dim) float32.

    Per repeat ``randn(dim, dirs)`` normalised per column in float64, then cast to float32 --
    the reference's order and rounding; returned transposed (one direction per row).
    """
    out = []
    for _ in range(repeats):
        d = rng.randn(dim, dirs_per_repeat)
        d /= np.sqrt(np.sum(np.square(d), axis=0, keepdims=True))
        out.append(d.astype(np.float32).T)
    return np.concatenate(out)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, rng: np.random.RandomState,
                       repeats: int = DIR_REPEATS, dirs_per_repeat: int = DIRS_PER_REPEAT) -> float:
    """Mean over ``repeats`` of the mean |sorted(a.dirs) - sorted(b.dirs)|; a, b: (M, D) equal shape.

    The repeats' directions are drawn up front in the reference's order (the same stream), then
    each set's projections are laid out (direction, patch), so every sort runs along a contiguous
    row. Matmuls and sorts use torch's current thread count.
    """
    if a.shape != b.shape:
        raise ValueError(f"SWD needs equally many patches in both sets, got {tuple(a.shape)} vs {tuple(b.shape)}")
    d = torch.from_numpy(draw_directions(rng, a.shape[1], repeats, dirs_per_repeat)).to(a.device)
    pa, pb = _sorted_projections(d, (a, b), torch.get_num_threads())
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
        threads = torch.get_num_threads()  # slices of the batch in parallel, each op single-threaded
        with single_threaded_torch():
            levels = laplacian_patch_descriptors(images, len(self.resolutions), self.rng[which], threads=threads)
        for lod, desc in enumerate(levels):
            self.desc[which][lod].append(desc)
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
            with single_threaded_torch():  # memory-bound; the matmul and sorts use every thread
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
