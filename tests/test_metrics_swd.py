"""SWD: the torch implementation vs an independent numpy implementation of the PGGAN algorithm.

``NumpySWD`` below is written from the algorithm's description (reference/metrics.md section 4,
tkarras/progressive_growing_of_gans metrics/sliced_wasserstein.py): scipy.ndimage convolutions
with mode='mirror', numpy fancy indexing with the reference's transposed (x, y) patch layout,
numpy sort/matmul. It shares no code with bench/metrics/swd.py. Both are driven by one
RandomState in the reference driver's call order (reals fed, reals-vs-reals directions, fakes fed,
reals-vs-fakes directions), so they must agree to float tolerance.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from bench.metrics import swd as tswd
from bench.metrics.base import MetricContext
from datasets.base import DataInfo
from methods.base import BackboneSettings, MethodOutput

GAUSS = np.float32([[1, 4, 6, 4, 1], [4, 16, 24, 16, 4], [6, 24, 36, 24, 6],
                    [4, 16, 24, 16, 4], [1, 4, 6, 4, 1]]) / 256.0


class NumpySWD:
    """The PGGAN API (begin/feed/end) in plain numpy/scipy, global-stream RNG passed explicitly."""

    def __init__(self, height, rng):
        self.rng = rng
        self.res = []
        r = height
        while r >= 16:
            self.res.append(r)
            r //= 2

    @staticmethod
    def pyramid(mb, levels):
        def down(x):
            return scipy.ndimage.convolve(x, GAUSS[None, None], mode="mirror")[:, :, ::2, ::2]

        def up(x):
            s = x.shape
            z = np.zeros((s[0], s[1], 2 * s[2], 2 * s[3]), x.dtype)
            z[:, :, ::2, ::2] = x
            return scipy.ndimage.convolve(z, GAUSS[None, None] * 4.0, mode="mirror")

        pyr = [np.float32(mb)]
        for _ in range(1, levels):
            pyr.append(down(pyr[-1]))
            pyr[-2] -= up(pyr[-1])
        return pyr

    def patches(self, level):
        n, c, h, w = level.shape
        count = 128 * n
        nh, ch, xo, yo = np.ogrid[0:count, 0:c, -3:4, -3:4]  # axis 2 = x offset, axis 3 = y offset
        img = nh // 128
        x = xo + self.rng.randint(3, w - 3, size=(count, 1, 1, 1))
        y = yo + self.rng.randint(3, h - 3, size=(count, 1, 1, 1))
        return level.flat[((img * c + ch) * h + y) * w + x]

    @staticmethod
    def finalize(desc):
        d = np.concatenate(desc, axis=0)
        d -= np.mean(d, axis=(0, 2, 3), keepdims=True)
        d /= np.std(d, axis=(0, 2, 3), keepdims=True)
        return d.reshape(d.shape[0], -1)

    def sliced(self, a, b, project=True):
        out = []
        for _ in range(4):
            dirs = self.rng.randn(a.shape[1], 128)
            dirs /= np.sqrt(np.sum(np.square(dirs), axis=0, keepdims=True))
            dirs = dirs.astype(np.float32)
            if project:
                pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
                out.append(np.mean(np.abs(pa - pb)))
        return np.mean(out) if project else 0.0

    def run(self, reals, fakes, minibatch, project_reals_pass=True):
        """The driver: reals fed and compared with themselves, then fakes. ``project_reals_pass=False``
        only draws the reals pass's directions (its distances are exactly 0): same fakes numbers."""
        results = {}
        for mode, data in (("reals", reals), ("fakes", fakes)):
            desc = [[] for _ in self.res]
            for i in range(0, len(data), minibatch):
                for lod, lev in enumerate(self.pyramid(data[i:i + minibatch], len(self.res))):
                    desc[lod].append(self.patches(lev))
            desc = [self.finalize(d) for d in desc]
            if mode == "reals":
                self.real = desc
            project = mode == "fakes" or project_reals_pass
            dist = [1e3 * self.sliced(r, f, project) for r, f in zip(self.real, desc)]
            results[mode] = dist + [float(np.mean(dist))]
        return results["fakes"]


def torch_swd_reference_order(reals, fakes, minibatch, rng):
    """bench.metrics.swd driven in the PGGAN driver's RNG order with one stream."""
    acc = tswd.SWDAccumulator(reals.shape[2], rng, rng, rng)
    for i in range(0, len(reals), minibatch):
        acc.feed("real", torch.from_numpy(reals[i:i + minibatch]))
    # The driver's reals-vs-reals pass: W(r, r) is exactly 0 at every level (sorted(r.d) - sorted(r.d)),
    # so only its position in the stream matters -- draw the directions it consumes.
    for _ in acc.resolutions:
        tswd.draw_directions(rng, 3 * tswd.NHOOD_SIZE ** 2)
    for i in range(0, len(fakes), minibatch):
        acc.feed("fake", torch.from_numpy(fakes[i:i + minibatch]))
    dist = acc.distances()
    return dist + [float(np.mean(dist))]


def _published_pair():
    reals = np.random.RandomState(1).randint(0, 256, (40, 3, 64, 64)).astype(np.uint8)
    fakes = ((reals.astype(np.int32) + np.roll(reals, 1, axis=3)) // 2).astype(np.uint8)
    return reals, fakes


def test_levels():
    assert tswd.level_resolutions(256) == [256, 128, 64, 32, 16]
    assert tswd.level_resolutions(64) == [64, 32, 16]
    assert tswd.level_resolutions(15) == []


def test_pyramid_bit_identical_to_scipy_mirror():
    """uint8 input (float32 fast path on the fine levels, float64 below) and float input."""
    x = np.random.RandomState(3).randint(0, 256, (2, 3, 128, 128)).astype(np.uint8)
    for inp in (torch.from_numpy(x), torch.from_numpy(x).float() + 0.3):
        ref = NumpySWD.pyramid(inp.numpy().copy(), 4)  # the reference works in place
        got = tswd.laplacian_pyramid(inp, 4)
        assert [g.shape[-1] for g in got] == [128, 64, 32, 16]
        for r, g in zip(ref, got):
            np.testing.assert_array_equal(g.numpy(), r)


@pytest.mark.parametrize("ratio,threads", [(0, 1), (tswd.SPARSE_LAPLACIAN_MIN_RATIO, 1),
                                           (tswd.SPARSE_LAPLACIAN_MIN_RATIO, 2), (10 ** 9, 3)])
@pytest.mark.parametrize("integral", [True, False])
def test_sampled_laplacian_equals_whole_pyramid(monkeypatch, ratio, threads, integral):
    """Laplacian evaluated at the sampled pixels only (every level, the default mix, no level; the
    batch split over threads or not) is bit-identical to gathering from the whole pyramid, same
    draws -- borders included: some centres sit on the first and last valid rows and columns."""
    monkeypatch.setattr(tswd, "SPARSE_LAPLACIAN_MIN_RATIO", ratio)
    monkeypatch.setattr(tswd, "PARALLEL_MIN_PIXELS", 0)
    x = torch.from_numpy(np.random.RandomState(8).randint(0, 256, (3, 3, 128, 96)).astype(np.uint8))
    if not integral:
        x = x.float() * 0.731 + 0.1
    got = tswd.laplacian_patch_descriptors(x, 4, np.random.RandomState(2), per_image=200, threads=threads)
    rng = np.random.RandomState(2)
    want = [tswd.patch_descriptors(lev, rng, per_image=200) for lev in tswd.laplacian_pyramid(x, 4)]
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    centres = np.random.RandomState(2).randint(3, 96 - 3, size=600)
    assert centres.min() == 3 and centres.max() == 96 - 4  # the borders were exercised


def test_threaded_sorts_give_the_same_value():
    rs = np.random.RandomState(4)
    a, b = (torch.from_numpy(rs.randn(700, 147).astype(np.float32)) for _ in range(2))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tswd.sliced_wasserstein(a, b, np.random.RandomState(9))
        torch.set_num_threads(2)
        two = tswd.sliced_wasserstein(a, b, np.random.RandomState(9))
    finally:
        torch.set_num_threads(old)
    assert one > 0 and two == pytest.approx(one, rel=1e-6)  # matmul blocking may round differently


def test_patch_layout_is_transposed():
    """Known answer: a level whose value encodes (row, col) shows the reference's layout."""
    h = w = 16
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    level = torch.from_numpy(np.float32(rows * 100 + cols)[None, None].repeat(3, axis=1))
    rng = np.random.RandomState(5)
    x0 = np.random.RandomState(5).randint(3, w - 3, size=128)
    p = tswd.patch_descriptors(level, rng)
    # out[p, c, i, j] = level[y + j - 3, x + i - 3]: axis 2 walks columns, axis 3 walks rows
    assert torch.all(p[:, 0, :, 3] % 100 == torch.from_numpy(x0)[:, None] + torch.arange(-3, 4))
    assert torch.all(p[:, 0, 1, :] - p[:, 0, 0, :] == 1)  # axis 2: next column
    assert torch.all(p[:, 0, :, 1] - p[:, 0, :, 0] == 100)  # axis 3: next row


def test_torch_matches_numpy_reference_and_published_vector():
    reals, fakes = _published_pair()
    ref = NumpySWD(64, np.random.RandomState(0)).run(reals, fakes, minibatch=20)
    got = torch_swd_reference_order(reals, fakes, 20, np.random.RandomState(0))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    # reference/metrics.md 4.4: the original PGGAN code, np.random.seed(0), same driver order
    np.testing.assert_allclose(got, [38.0659, 25.6130, 26.4369, 30.0386], atol=6e-4)


def test_reals_pass_is_zero_and_only_its_directions_matter():
    """The driver's reals row is exactly 0, so drawing its directions without projecting (what the
    torch driver above does) leaves the fakes numbers unchanged."""
    reals, fakes = _published_pair()
    full = NumpySWD(64, np.random.RandomState(0))
    with_pass = full.run(reals[:10], fakes[:10], minibatch=5)
    without = NumpySWD(64, np.random.RandomState(0)).run(reals[:10], fakes[:10], minibatch=5,
                                                          project_reals_pass=False)
    assert with_pass == without
    r = tswd.finalize_descriptors([torch.from_numpy(full.real[0].reshape(-1, 3, 7, 7).copy())])
    assert tswd.sliced_wasserstein(r, r, np.random.RandomState(4)) == 0.0


def test_torch_matches_numpy_reference_other_seed_non_square_batches():
    rs = np.random.RandomState(7)
    reals = rs.randint(0, 256, (12, 3, 32, 32)).astype(np.uint8)
    fakes = np.clip(reals.astype(np.int32) + rs.randint(-30, 31, reals.shape), 0, 255).astype(np.uint8)
    ref = NumpySWD(32, np.random.RandomState(11)).run(reals, fakes, minibatch=5)
    got = torch_swd_reference_order(reals, fakes, 5, np.random.RandomState(11))
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_transposed_layout_matters():
    """With the usual (row, col) layout the numbers differ: the test above is sensitive to it."""
    reals, fakes = _published_pair()
    orig = tswd.laplacian_patch_descriptors
    try:
        tswd.laplacian_patch_descriptors = lambda *a, **k: [d.transpose(2, 3).contiguous() for d in orig(*a, **k)]
        wrong = torch_swd_reference_order(reals, fakes, 20, np.random.RandomState(0))
    finally:
        tswd.laplacian_patch_descriptors = orig
    assert abs(wrong[0] - 38.0659) > 1e-2


def _ctx(seed=0, options=None, res=32):
    info = DataInfo(name="t", variant="default", split="test", size=8, resolution=res, cond_channels=1)
    return MetricContext(data=info, device=torch.device("cpu"), backbones=BackboneSettings(download=False),
                         cache_dir=None, data_key="t", seed=seed, options=options or {})


def test_metric_properties():
    """Same distribution (noise vs the same noise, different patch draws: the small-N noise floor)
    << a real shift (half the outputs flat grey)."""
    rs = np.random.RandomState(0)
    gt = torch.from_numpy(rs.uniform(-1, 1, (16, 3, 32, 32))).float()
    half_flat = gt.clone()
    half_flat[8:] = 0.0
    same, far = tswd.SlicedWassersteinDistance(_ctx()), tswd.SlicedWassersteinDistance(_ctx())
    for i in range(0, 16, 8):
        b = {"image": gt[i:i + 8]}
        same.update(b, MethodOutput(output=gt[i:i + 8]))
        far.update(b, MethodOutput(output=half_flat[i:i + 8]))
    s, f = same.compute(), far.compute()
    assert set(s) == {"swd", "swd_l32", "swd_l16"}
    assert f["swd"] > 4 * s["swd"]
    assert s["swd"] == pytest.approx((s["swd_l32"] + s["swd_l16"]) / 2)
    assert same.settings["n_images"] == 16 and same.settings["levels"] == "32,16"


def test_metric_identical_streams_gives_zero():
    """Same images and the same patch stream for both sets -> exactly 0 (known answer)."""
    x = np.random.RandomState(2).randint(0, 256, (6, 3, 32, 32)).astype(np.uint8)
    acc = tswd.SWDAccumulator(32, np.random.RandomState(1), np.random.RandomState(1), np.random.RandomState(3))
    acc.feed("real", torch.from_numpy(x))
    acc.feed("fake", torch.from_numpy(x))
    assert acc.distances() == [0.0, 0.0]


def test_small_sample_guards():
    acc = tswd.SWDAccumulator(32, *(np.random.RandomState(i) for i in range(3)))
    acc.feed("real", torch.zeros((2, 3, 32, 32), dtype=torch.uint8) + 5)
    acc.feed("fake", torch.zeros((1, 3, 32, 32), dtype=torch.uint8) + 5)
    with pytest.raises(ValueError, match="equal numbers"):
        acc.distances()
    with pytest.raises(ValueError, match="at least 16"):
        tswd.SWDAccumulator(8, *(np.random.RandomState(i) for i in range(3)))
    m = tswd.SlicedWassersteinDistance(_ctx(options={"max_images": 3}))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    m.update({"image": x}, MethodOutput(output=x.flip(0)))
    m.compute()
    assert m.settings["n_images"] == 3 and m.settings["images_skipped"] == 1
