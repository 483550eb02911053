"""Benchmark of the evaluation metrics on CPU (not a test).

1. Throughput of every metric (images/s through ``update``, plus the one-off ``compute`` time) at
   64^2 and 256^2 with synthetic images and label maps, seeded random-init backbones (no weights
   are available offline; the architectures, hence the costs, are the real ones). FID/KID are run
   twice: the second run reuses the cached real-image features, as the next trial of a sweep does.
2. SWD: the torch implementation vs the independent numpy implementation of the PGGAN reference
   in tests/test_metrics_swd.py, on the same images in the reference driver's RNG order: time,
   speed-up and the largest difference of the values. The driver's reals-vs-reals pass is exactly 0,
   so the torch side only draws its directions; the "like for like" line gives the numpy reference
   the same shortcut.
3. ``--frechet``: FID and KID statistics of 2048-d features, clean-fid's ``frechet_distance`` /
   ``kernel_distance`` vs ``bench.metrics.frechet`` / ``kernel_distance`` on the same "real-looking"
   features (non-negative, correlated, power-law spectrum) for N samples per set (N < 2048:
   rank-deficient covariances; N > 2048: full rank): seconds, ratio, relative difference, and the
   harness's FID + KID pair from features (``fid_from_features`` + ``kid_from_features``), timed
   with our statistics on 1 BLAS thread (the default, ``blas_threads.py``) and on ``--threads``.
   clean-fid runs once per case (its sqrtm takes 10 s to minutes), ours best of ``--repeats``.

    .venv/bin/python scripts/bench_metrics.py [--threads 1] [--json out.json]
    .venv/bin/python scripts/bench_metrics.py --frechet [--frechet-n 200 1000 2993] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys

_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--threads", type=int, default=1)
_threads = _pre.parse_known_args()[0].threads
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy/torch load
    os.environ[_var] = str(_threads)

import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.metrics import METRICS  # noqa: E402
from bench.metrics import fid as fid_mod  # noqa: E402
from bench.metrics import swd as tswd  # noqa: E402
from bench.metrics.base import MetricContext  # noqa: E402
from bench.metrics.feature_cache import FeatureBank  # noqa: E402
from datasets.base import DataInfo  # noqa: E402
from methods.base import BackboneSettings, MethodOutput  # noqa: E402

METRIC_NAMES = ["fid_sources", "kid_sources", "swd", "lpips_gt", "lpips_diversity", "sem_consistency",
                "sem_consistency_global", "style_relevance", "style_relevance_global"]


def synthetic(n: int, size: int, seed: int, classes: int = 6) -> Dict[str, torch.Tensor]:
    """Smooth random images in [-1, 1] and blocky label maps."""
    g = torch.Generator().manual_seed(seed)
    img = F.interpolate(torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, size=(size, size), mode="bicubic",
                        align_corners=False).clamp(-1, 1)
    lab = torch.randint(0, classes, (n, 1, 4, 4), generator=g).float()
    return {"image": img, "label": F.interpolate(lab, size=(size, size), mode="nearest")[:, 0].long()}


def run_metric(name: str, size: int, n: int, batch: int, cache_dir: Path) -> Dict[str, float]:
    info = DataInfo(name="bench", variant="default", split="test", size=n, resolution=size, cond_channels=1,
                    num_classes=6)
    ctx = MetricContext(data=info, device=torch.device("cpu"), cache_dir=cache_dir, data_key=f"bench|{size}|{n}",
                        backbones=BackboneSettings(allow_untrained=True, download=False, seed=0), seed=0,
                        options={"k": 2} if name == "lpips_diversity" else {})
    metric = METRICS.get(name)(ctx)
    real, fake, ex = synthetic(n, size, 1), synthetic(n, size, 2), synthetic(n, size, 3)
    k = getattr(metric, "exemplars_per_input", 1)
    images = 0
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        sl = slice(i, i + batch)
        b = {"image": real["image"][sl], "label": real["label"][sl], "exemplar": ex["image"][sl],
             "exemplar_label": ex["label"][sl]}
        if k > 1:
            outs = [MethodOutput(output=torch.roll(fake["image"][sl], j, dims=0)) for j in range(k)]
            metric.update_multi(b, outs)
            images += k * b["image"].shape[0]
        else:
            metric.update(b, MethodOutput(output=fake["image"][sl]))
            images += b["image"].shape[0]
    t1 = time.perf_counter()
    metric.compute()
    t2 = time.perf_counter()
    return {"images": images, "update_s": t1 - t0, "images_per_s": images / (t1 - t0), "compute_s": t2 - t1}


def load_numpy_reference():
    spec = importlib.util.spec_from_file_location("swd_ref", ROOT / "tests" / "test_metrics_swd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_swd(size: int, n: int, repeats: int) -> Dict[str, object]:
    ref = load_numpy_reference()
    rs = np.random.RandomState(1)
    reals = rs.randint(0, 256, (n, 3, size, size)).astype(np.uint8)
    fakes = ((reals.astype(np.int32) + np.roll(reals, 1, axis=3)) // 2).astype(np.uint8)
    t_np, t_np_lean, t_torch = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        v_np = ref.NumpySWD(size, np.random.RandomState(0)).run(reals, fakes, 20)
        t_np.append(time.perf_counter() - t)
        t = time.perf_counter()
        v_np_lean = ref.NumpySWD(size, np.random.RandomState(0)).run(reals, fakes, 20, project_reals_pass=False)
        t_np_lean.append(time.perf_counter() - t)
        assert v_np_lean == v_np
        t = time.perf_counter()
        v_t = ref.torch_swd_reference_order(reals, fakes, 20, np.random.RandomState(0))
        t_torch.append(time.perf_counter() - t)
    # the harness's own path: the metric class, no reals-vs-reals pass, separate RNG streams
    t_metric = []
    for _ in range(repeats):
        info = DataInfo(name="bench", variant="default", split="test", size=n, resolution=size, cond_channels=1)
        ctx = MetricContext(data=info, device=torch.device("cpu"), cache_dir=Path("."), data_key="bench",
                            backbones=BackboneSettings(allow_untrained=True, download=False))
        m = tswd.SlicedWassersteinDistance(ctx)
        r_pm1 = torch.from_numpy(reals).float() / 127.5 - 1
        f_pm1 = torch.from_numpy(fakes).float() / 127.5 - 1
        t = time.perf_counter()
        for i in range(0, n, 20):
            m.update({"image": r_pm1[i:i + 20]}, MethodOutput(output=f_pm1[i:i + 20]))
        m.compute()
        t_metric.append(time.perf_counter() - t)
    diff = np.abs(np.asarray(v_t, np.float64) - np.asarray(v_np, np.float64))
    return {"size": size, "images_per_set": n, "numpy_s": min(t_np), "torch_s": min(t_torch),
            "numpy_lean_s": min(t_np_lean), "lean_speedup": min(t_np_lean) / min(t_torch),
            "metric_path_s": min(t_metric), "metric_path_speedup": min(t_np) / min(t_metric),
            "speedup": min(t_np) / min(t_torch), "values_torch": [float(v) for v in v_t],
            "values_numpy": [float(v) for v in v_np], "max_abs_diff": float(diff.max()),
            "max_rel_diff": float((diff / np.abs(np.asarray(v_np, np.float64))).max())}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def real_looking(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Non-negative correlated float32 features with a power-law spectrum (as tests/test_frechet.py)."""
    rs = np.random.RandomState(seed)
    mix = rs.randn(d, d) * (np.arange(1, d + 1) ** -0.7)[:, None]
    return np.maximum(rs.randn(n, d) @ mix + shift, 0).astype(np.float32)


def _best(fn, repeats: int):
    best, value = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def bench_frechet(n: int, repeats: int, threads: int, d: int = 2048) -> Dict[str, object]:
    import warnings

    from cleanfid.fid import frechet_distance as cf_frechet, kernel_distance as cf_kernel

    from bench.metrics import blas_threads, frechet, kernel_distance

    fake, real = real_looking(n, d, 1), real_looking(n, d, 2, shift=0.05)
    mu1, s1 = np.mean(fake, axis=0), np.cov(fake, rowvar=False)
    mu2, s2 = np.mean(real, axis=0), np.cov(real, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        t_cf, v_cf = _best(lambda: cf_frechet(mu1, s1, mu2, s2), 1)
    t_ours, v_ours = _best(lambda: frechet.frechet_distance(mu1, s1, mu2, s2), repeats)

    def cf_kid():
        np.random.seed(0)
        return cf_kernel(fake, real)

    def our_kid():
        np.random.seed(0)
        return kernel_distance.kernel_distance(fake, real)

    t_cf_kid, k_cf = _best(cf_kid, 1)
    t_kid, k_ours = _best(our_kid, repeats)
    pair = lambda: (fid_mod.fid_from_features(fake, real), fid_mod.kid_from_features(fake, real))  # noqa: E731
    t_pair, _ = _best(pair, repeats)
    old = blas_threads.STATISTICS_THREADS
    blas_threads.STATISTICS_THREADS = threads
    try:
        t_pair_threads, _ = _best(pair, repeats)
    finally:
        blas_threads.STATISTICS_THREADS = old
    return {"n_per_set": n, "dim": d, "rank_deficient": n <= d,
            "cleanfid_fid_s": t_cf, "ours_fid_s": t_ours, "fid_speedup": t_cf / t_ours,
            "fid_cleanfid": float(v_cf), "fid_ours": v_ours, "fid_rel_diff": abs(v_ours - v_cf) / abs(v_cf),
            "cleanfid_kid_s": t_cf_kid, "ours_kid_s": t_kid, "kid_speedup": t_cf_kid / t_kid,
            "kid_cleanfid": float(k_cf), "kid_ours": k_ours, "kid_rel_diff": abs(k_ours - k_cf) / abs(k_cf),
            "pair_s": t_pair, "pair_s_threads": t_pair_threads, "threads": threads}


def main(argv: List[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (set before import)")
    ap.add_argument("--n64", type=int, default=32, help="images per metric at 64^2")
    ap.add_argument("--n256", type=int, default=16, help="images per metric at 256^2")
    ap.add_argument("--swd-n", type=int, nargs=2, default=[64, 40], help="SWD images per set at 64^2, 256^2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-metrics", action="store_true")
    ap.add_argument("--frechet", action="store_true", help="only the FID/KID statistics section (3.)")
    ap.add_argument("--frechet-n", type=int, nargs="+", default=[200, 1000, 2993],
                    help="samples per set for --frechet (2048-d features)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
               "torch": torch.__version__, "numpy": np.__version__, "load_avg_start": os.getloadavg()}
    print(f"machine: {machine}")
    results: Dict[str, object] = {"machine": machine, "metrics": {}, "swd": [], "frechet": []}

    if args.frechet:
        import scipy

        machine["scipy"] = scipy.__version__
        print(f"\nFID / KID statistics of 2048-d features: clean-fid vs ours (clean-fid once, ours best of "
              f"{args.repeats}; BLAS threads: clean-fid {args.threads}, ours 1):")
        for n in args.frechet_n:
            r = bench_frechet(n, args.repeats, args.threads)
            results["frechet"].append(r)
            kind = "rank-deficient" if r["rank_deficient"] else "full rank"
            print(f"  N={n:>5} per set ({kind}):\n"
                  f"    FID  clean-fid {r['cleanfid_fid_s']:8.2f} s   ours {r['ours_fid_s']:6.3f} s   "
                  f"{r['fid_speedup']:7.1f}x   rel diff {r['fid_rel_diff']:.1e}  ({r['fid_ours']:.6g})\n"
                  f"    KID  clean-fid {r['cleanfid_kid_s']:8.2f} s   ours {r['ours_kid_s']:6.3f} s   "
                  f"{r['kid_speedup']:7.1f}x   rel diff {r['kid_rel_diff']:.1e}  ({r['kid_ours']:.6g})\n"
                  f"    FID + KID pair from features (harness functions): {r['pair_s']:.3f} s "
                  f"(statistics on {args.threads} BLAS thread(s): {r['pair_s_threads']:.3f} s)", flush=True)
        results["machine"]["load_avg_end"] = os.getloadavg()
        print(f"\nload average at end: {results['machine']['load_avg_end']}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return

    print("\nSWD, torch vs the numpy PGGAN reference (same images, same RNG order, best of "
          f"{args.repeats}):")
    for size, n in zip((64, 256), args.swd_n):
        r = bench_swd(size, n, args.repeats)
        results["swd"].append(r)
        print(f"  {size:>3}^2 x {n} img/set: numpy {r['numpy_s']:.3f} s, torch {r['torch_s']:.3f} s, "
              f"speed-up {r['speedup']:.1f}x, max |diff| {r['max_abs_diff']:.2e} (rel {r['max_rel_diff']:.1e}); "
              f"torch {['%.4f' % v for v in r['values_torch']]}\n"
              f"           like for like (numpy also skips projecting its all-zero reals-vs-reals pass): "
              f"numpy {r['numpy_lean_s']:.3f} s, speed-up {r['lean_speedup']:.1f}x\n"
              f"           harness path (metric class, no reals-vs-reals pass): {r['metric_path_s']:.3f} s, "
              f"{r['metric_path_speedup']:.1f}x vs the numpy reference run")

    if not args.skip_metrics:
        print("\nper-metric throughput (update images/s; compute = the one-off final step):")
        with tempfile.TemporaryDirectory() as d:
            for size, n in ((64, args.n64), (256, args.n256)):
                for name in METRIC_NAMES:
                    runs = [name] if name not in ("fid_sources", "kid_sources") else [name, name + " (cached reals)"]
                    for label in runs:
                        # each run is a fresh trial process: nothing in memory; the second FID/KID
                        # run finds the first run's real-image features on disk
                        FeatureBank._shared.clear()
                        fid_mod._FAKE_MEMO.clear()
                        r = run_metric(name, size, n, 8, Path(d) / name)
                        results["metrics"][f"{label}@{size}"] = r
                        print(f"  {label:32s} {size:>3}^2  n={r['images']:>3}  {r['images_per_s']:8.2f} img/s  "
                              f"compute {r['compute_s']:7.2f} s")
    results["machine"]["load_avg_end"] = os.getloadavg()
    print(f"\nload average at end: {results['machine']['load_avg_end']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
