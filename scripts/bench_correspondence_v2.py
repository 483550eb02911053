"""Benchmark of CoCosNet v2's correspondence on CPU: memory and time, and a learning check.

Part ``memory``: peak memory and time of the hierarchical PatchMatch correspondence (dense match
at R/8, GRU-assisted PatchMatch at R/4, R/2, R; official widths: 32 matching channels, K = 16,
5 iterations, GRU hidden 32) for one sample at 64^2, 128^2 and 256^2, against CoCosNet v1's
dense correlation at full resolution, (H W)^2 float32 values. Each size runs in a fresh child
process with glibc's mmap threshold pinned low, so freed blocks go back to the OS and the peak
resident-set growth (``ru_maxrss`` minus the resident size just before the call) measures the
correspondence's own allocations. Inputs (per-level features, exemplar) exist before the
baseline: v1 would need the same inputs.

Part ``learn``: trains the full method (default options, untrained VGG allowed) on the embedded
dataset at 64x64, width 0.125, batch 4, and reports each level's warp L1 against the exact
ground truth ``target`` (the exemplar's appearance on the condition's layout) on fixed test
samples at step 0 and after training. Pass: the finest warp's L1 drops by >= 30 %.

    .venv/bin/python scripts/bench_correspondence_v2.py --part all --steps 300 --out bench_v2.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

V1_BYTES_PER_VALUE = 4  # float32 correlation matrix


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def memory_child(size: int, train: bool, ckpt: bool = False, refine_grad: str = "official_nograd") -> dict:
    """Runs in a fresh process: one correspondence pass at ``size``^2, returns its measurements."""
    import random

    import torch

    from methods.cocosnet_v2.patchmatch import HierarchicalPatchMatch, normalize_pono_c

    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)  # the propagation orders (python's random, as the official code)
    feat = 32
    net = HierarchicalPatchMatch(feat, iterations=5, refinement="propagation+gru", hidden=32, motion_ch=64,
                                 refine_grad=refine_grad, grad_checkpoint=ckpt)
    sizes = [size // f for f in (8, 4, 2, 1)]
    fxs = [normalize_pono_c(torch.randn(1, feat, s, s)).requires_grad_(train) for s in sizes]
    fys = [normalize_pono_c(torch.randn(1, feat, s, s)).requires_grad_(train) for s in sizes]
    exemplar = torch.rand(1, 3, size, size) * 2 - 1
    def timed_pass():
        """One forward (and backward when training) pass; its wall and CPU seconds."""
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.set_grad_enabled(train):
            res = net(fxs, fys, exemplar)
            if train:
                sum(r.warp.sum() for r in res).backward()
        return time.perf_counter() - t0, time.process_time() - c0  # res is freed on return

    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_before = _rss_kib()
    wall, cpu = timed_pass()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # a second, warm run for the time (first-call allocations and kernel selection excluded)
    wall2, cpu2 = timed_pass()
    return {
        "size": size, "mode": ("train+ckpt" if ckpt else "train(fwd+bwd)") if train else "inference",
        "refine_grad": refine_grad,
        "levels": sizes,
        "peak_bytes": (peak - rss_before) * 1024,
        "baseline_slack_bytes": max(0, maxrss_before - rss_before) * 1024,  # > 0 would hide peaks
        "wall_s_cold": wall, "cpu_s_cold": cpu, "wall_s": wall2, "cpu_s": cpu2,
    }


def run_memory(sizes, train: bool, ckpt: bool = False, refine_grad: str = "official_nograd") -> list:
    rows = []
    for size in sizes:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
                   OMP_NUM_THREADS="1")
        cmd = ([sys.executable, __file__, "--child-size", str(size), "--refine-grad", refine_grad]
               + (["--child-train"] if train else []) + (["--child-ckpt"] if ckpt else []))
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        hw = size * size
        row["v1_dense_bytes"] = hw * hw * V1_BYTES_PER_VALUE
        row["ratio_to_v1"] = row["peak_bytes"] / row["v1_dense_bytes"]
        rows.append(row)
        print(f"{size:4d}^2 {row['mode']:15s} {refine_grad:15s} peak {row['peak_bytes'] / 2**20:9.1f} MiB | v1 dense "
              f"{row['v1_dense_bytes'] / 2**30:8.3f} GiB | ratio {100 * row['ratio_to_v1']:7.3f} % | "
              f"time {row['wall_s']:6.2f} s wall, {row['cpu_s']:6.2f} s cpu (cold {row['wall_s_cold']:.2f} s)"
              f" | baseline slack {row['baseline_slack_bytes'] / 2**20:.1f} MiB", flush=True)
    return rows


def run_learning(steps: int, variant: str, eval_samples: int, seed: int, log_every: int) -> dict:
    import random

    import torch
    import torch.nn.functional as F

    from datasets.base import DatasetSpec
    from datasets.embedded import EmbeddedDataset
    from methods.base import BackboneSettings, MethodContext
    from methods.cocosnet_v2.model import CoCosNetV2Method, CoCosNetV2Options

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    random.seed(seed)
    res = 64
    spec = DatasetSpec(name="embedded", variant=variant)
    train, test = EmbeddedDataset(spec, "train", res), EmbeddedDataset(spec, "test", res)
    ctx = MethodContext(data=train.info, resolution=res, width=0.125,  # the official optimiser (TTUR)
                        backbones=BackboneSettings(allow_untrained=True, download=False), seed=seed, total_steps=steps)
    method = CoCosNetV2Method(CoCosNetV2Options(), ctx)
    ev = [test[i] for i in range(eval_samples)]
    ev = {k: torch.stack([s[k] for s in ev]) for k in ev[0]}

    def warp_l1() -> dict:
        method.eval()
        random.seed(1234)  # the propagation order is random (python's random): same draws at every evaluation
        out = method.generate(ev)
        method.train()
        l1 = {}
        for key, w in out.warps.items():
            s = int(key)
            tgt = F.avg_pool2d(ev["target"], res // s) if s < res else ev["target"]
            l1[key] = float((w - tgt).abs().mean())
        return l1

    rng = torch.Generator().manual_seed(seed)
    history = [{"step": 0, "warp_l1": warp_l1()}]
    print(f"step 0 warp L1 vs target: {history[0]['warp_l1']}", flush=True)
    t0 = time.process_time()
    w0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train), (4,), generator=rng).tolist()
        items = [train[i] for i in idx]
        batch = {k: torch.stack([s[k] for s in items]) for k in items[0]}
        losses = method.train_step(batch, step)
        if step % log_every == 0 or step == steps:
            entry = {"step": step, "warp_l1": warp_l1(), "losses": losses}
            history.append(entry)
            print(f"step {step} warp L1 {entry['warp_l1']} | G_corr {losses.get('G_corr', 0):.2f} "
                  f"G_total {losses['G_total']:.2f} | {(time.process_time() - t0) / step:.2f} s cpu/step, "
                  f"{(time.perf_counter() - w0) / step:.2f} s wall/step", flush=True)
    first, last = history[0]["warp_l1"], history[-1]["warp_l1"]
    finest = str(res // CoCosNetV2Options().levels[-1])
    drop = 1 - last[finest] / first[finest]
    summary = {"variant": variant, "steps": steps, "eval_samples": eval_samples, "seed": seed,
               "cpu_s_per_step": (time.process_time() - t0) / steps,
               "wall_s_per_step": (time.perf_counter() - w0) / steps,
               "warp_l1_step0": first, "warp_l1_final": last,
               "finest_level": finest, "finest_drop": drop, "pass_30pct": drop >= 0.30, "history": history}
    print(f"finest ({finest}) warp L1: {first[finest]:.4f} -> {last[finest]:.4f} ({100 * drop:.1f} % lower; "
          f"{'PASS' if drop >= 0.30 else 'FAIL'} at the 30 % bar)", flush=True)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("memory", "learn", "all"), default="all")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--train-mode", action="store_true", help="also measure forward+backward memory")
    ap.add_argument("--grad-checkpoint", action="store_true",
                    help="with --train-mode: also measure it with per-iteration gradient checkpointing")
    ap.add_argument("--refine-grad", default="official_nograd", choices=("official_nograd", "differentiable"),
                    help="the refinement's gradients (checkpointing only acts with differentiable)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--variant", default="mask", choices=("mask", "edge", "keypoint"))
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=str, default=None, help="write all numbers to this JSON file")
    ap.add_argument("--child-size", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-train", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_size is not None:
        print(json.dumps(memory_child(args.child_size, args.child_train, args.child_ckpt, args.refine_grad)))
        return
    report: dict = {}
    if args.part in ("memory", "all"):
        report["memory"] = run_memory(args.sizes, train=False, refine_grad=args.refine_grad)
        r256 = [r for r in report["memory"] if r["size"] == 256]
        if r256:
            ok = r256[0]["ratio_to_v1"] <= 0.02
            print(f"256^2 target (<= 2 % of v1's dense memory): {'PASS' if ok else 'FAIL'}", flush=True)
        if args.train_mode:
            report["memory_train"] = run_memory(args.sizes, train=True, refine_grad=args.refine_grad)
            if args.grad_checkpoint:
                report["memory_train_ckpt"] = run_memory(args.sizes, train=True, ckpt=True, refine_grad=args.refine_grad)
    if args.part in ("learn", "all"):
        report["learning"] = run_learning(args.steps, args.variant, args.eval_samples, args.seed, args.log_every)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
