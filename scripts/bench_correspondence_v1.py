"""CoCosNet v1 dense correspondence: cost on CPU, and a learning check on the embedded dataset.

Two sub-commands:

``memory``  Peak memory and time (CPU and wall) of the v1 dense correspondence step for ONE sample,
            run in a fresh subprocess per configuration (so peaks do not mix): 3x3-unfolded
            256-channel descriptors (official width), channel centring + L2 norm, the full N x N
            cosine matrix, softmax(alpha M) and the warp of the pooled exemplar (inference,
            no_grad, as in ``generate``); training adds the cycle warp (L_reg) and the backward
            pass. Sizes are the *matching grid*
            side G (N = G^2 positions; v1 matches at 1/4 of the image side, so G = 16, 32, 64, 128
            correspond to 64^2, 128^2, 256^2, 512^2 images, or to full-resolution matching of
            16^2 .. 128^2 images). Peak = VmHWM after the step minus VmRSS before it (the
            high-water mark is reset through /proc/self/clear_refs). For grids too large to run,
            the memory is computed, not run: the number of N x N float32 buffers alive at the
            peak is read off the largest measured run and multiplied out.

``learn``   Trains ``cocosnet`` on the embedded dataset (64x64, width 0.125, batch 4, CPU, one
            thread) with the smoke-profile options of ``sweeps/ablation_v1_losses.yaml`` (the
            Table-4 "full" model) and reports the warp L1 vs the exact ground truth ``target``
            (area-downsampled to the warp's 16x16) on 32 test samples, at step 0 and every
            ``--eval-every`` steps, with two references: the un-warped pooled exemplar, and the
            exemplar warped by the dataset's true correspondence (``corr``). Passes when the final
            warp L1 is at least 30 % below its step-0 value.

    python scripts/bench_correspondence_v1.py memory --grids 16 32 64 128 --extrapolate 256
    python scripts/bench_correspondence_v1.py learn --steps 300
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(1)  # the machine is shared; also makes timings comparable


# ---- memory / time of the correspondence step --------------------------------------------------
def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _one_step(grid: int, train: bool, channels: int, kernel: int, alpha: float) -> Dict[str, float]:
    """Runs in a child process: one correspondence step for one sample; returns peak MB and seconds."""
    import torch.nn.functional as F

    from methods.cocosnet.correspondence import match_scores
    from methods.common.correspondence import soft_warp, soft_weights

    torch.manual_seed(0)
    theta = torch.randn(1, channels, grid, grid, requires_grad=train)
    phi = torch.randn(1, channels, grid, grid, requires_grad=train)
    exemplar = torch.rand(1, 3, 4 * grid, 4 * grid) * 2 - 1
    src = F.avg_pool2d(exemplar, 4)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _proc_kb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.set_grad_enabled(train):
        scores = match_scores(theta, phi, kernel, "channel")
        warp = soft_warp(soft_weights(scores, alpha), src, (grid, grid))
        if train:  # training also runs the cycle warp (L_reg) and the backward pass
            cycle = soft_warp(soft_weights(scores.transpose(1, 2), alpha), warp, (grid, grid))
            (F.l1_loss(cycle, src) + warp.square().mean()).backward()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _proc_kb("VmHWM")
    return {"peak_mb": (peak - before) / 1024, "seconds": seconds, "cpu_seconds": cpu}


def run_memory(args) -> None:
    rows: List[Dict[str, float]] = []
    for grid in args.grids:
        for train in (False, True):
            cmd = [sys.executable, __file__, "_child", str(grid), str(int(train)), str(args.channels),
                   str(args.kernel), str(args.alpha)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out = json.loads(res.stdout.strip().splitlines()[-1])
            n = grid * grid
            matrix_mb = n * n * 4 / 2 ** 20
            row = {"grid": grid, "N": n, "mode": "train" if train else "infer", "matrix_mb": matrix_mb,
                   "peak_mb": out["peak_mb"], "seconds": out["seconds"], "cpu_seconds": out["cpu_seconds"],
                   "matrices_at_peak": out["peak_mb"] / matrix_mb}
            rows.append(row)
            print(f"grid {grid:>4}^2 (N={n:>6}) {row['mode']:>5}: peak {out['peak_mb']:10.1f} MB "
                  f"({row['matrices_at_peak']:.2f} x the {matrix_mb:.1f} MB NxN matrix), "
                  f"{out['cpu_seconds']:.3f} CPU-s, {out['seconds']:.3f} wall-s", flush=True)
    # Peak memory = a N^2 (score / softmax matrices and their gradients) + b N (descriptors: 9 x 256
    # channels per position, their centred / normalised copies), fitted through the two largest runs.
    g1, g2 = sorted(args.grids)[-2:]
    for grid in args.extrapolate:
        n = grid * grid
        matrix_gib = n * n * 4 / 2 ** 30
        for mode in ("infer", "train"):
            (n1, p1), (n2, p2) = [(r["N"], r["peak_mb"]) for g in (g1, g2) for r in rows
                                  if r["grid"] == g and r["mode"] == mode]
            a = (p2 / n2 - p1 / n1) / (n2 - n1)  # MB per N^2
            b = p1 / n1 - a * n1  # MB per N
            gib = (a * n * n + b * n) / 1024
            print(f"grid {grid:>4}^2 (N={n:>6}) {mode:>5}: COMPUTED, not run: one NxN float32 matrix = "
                  f"{matrix_gib:.1f} GiB; fitted peak {a * 2 ** 20 / 4:.2f} NxN matrices + {b * 1024:.1f} KB "
                  f"per position (from {g1}^2, {g2}^2) = {gib:.1f} GiB per sample")
            rows.append({"grid": grid, "N": n, "mode": mode, "matrix_mb": matrix_gib * 1024,
                         "peak_mb": gib * 1024, "computed": True})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


# ---- learning check -----------------------------------------------------------------------------
def run_learn(args) -> None:
    import torch.nn.functional as F
    import yaml

    from datasets.base import DatasetSpec
    from datasets.embedded import EmbeddedDataset
    from methods.base import BackboneSettings, MethodContext
    from methods.registry import METHODS
    import methods  # noqa: F401

    sweep = yaml.safe_load((ROOT / "sweeps" / "ablation_v1_losses.yaml").read_text())
    entry = next(m for m in sweep["methods"] if m["name"] == "cocosnet")
    options = dict(entry.get("options") or {})
    options.update(entry["variants"][args.variant] or {})
    res, width, bs = 64, 0.125, 4
    train_ds = EmbeddedDataset(DatasetSpec(name="embedded", variant=args.data_variant), "train", res)
    test_ds = EmbeddedDataset(DatasetSpec(name="embedded", variant=args.data_variant), "test", res)
    cls = METHODS.get("cocosnet")
    ctx = MethodContext(data=train_ds.info, resolution=res, width=width, lr_g=1e-4, lr_d=4e-4, beta1=0.0,
                        beta2=0.9, backbones=BackboneSettings(allow_untrained=True, download=False),
                        seed=args.seed, total_steps=args.steps)
    torch.manual_seed(args.seed)
    model = cls(cls.Options(**options), ctx)
    print(f"options ({args.variant}): {options}")
    print(f"provenance: {model.provenance}")
    evalb = torch.utils.data.default_collate([test_ds[i] for i in range(args.eval_samples)])

    def warp_l1() -> float:
        model.eval()
        out = model.generate(evalb)
        model.train()
        (warp,) = out.warps.values()
        gt = F.interpolate(evalb["target"], size=warp.shape[-2:], mode="area")
        return float((warp - gt).abs().mean())

    gt16 = F.interpolate(evalb["target"], size=(16, 16), mode="area")
    unwarped = float((F.avg_pool2d(evalb["exemplar"], 4) - gt16).abs().mean())
    oracle_full = F.grid_sample(evalb["exemplar"], evalb["corr"].permute(0, 2, 3, 1), mode="nearest",
                                align_corners=False)
    oracle = float((F.avg_pool2d(oracle_full, 4) - gt16).abs().mean())
    print(f"references on {args.eval_samples} test samples: un-warped exemplar L1 {unwarped:.4f}; "
          f"true-correspondence warp L1 {oracle:.4f}")
    loader = torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    history = [(0, warp_l1())]
    print(f"step {0:>5}: warp L1 {history[-1][1]:.4f}", flush=True)
    step, wall, cpu, it = 0, 0.0, 0.0, iter(loader)
    while step < args.steps:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        # train_step alone, wall and CPU time: the machine is shared, so CPU seconds are the
        # load-independent figure (one thread: CPU time ~ wall time on an idle core).
        w0, c0 = time.perf_counter(), time.process_time()
        losses = model.train_step(batch, step)
        wall, cpu = wall + time.perf_counter() - w0, cpu + time.process_time() - c0
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            history.append((step, warp_l1()))
            print(f"step {step:>5}: warp L1 {history[-1][1]:.4f}  (train_step {cpu / step:.2f} CPU-s, "
                  f"{wall / step:.2f} wall-s; G_total {losses['G_total']:.3f}, "
                  f"D_total {losses.get('D_total', float('nan')):.3f})", flush=True)
    first, last = history[0][1], history[-1][1]
    drop = 1 - last / first
    verdict = "PASS" if drop >= 0.30 else "FAIL"
    print(f"{verdict}: warp L1 {first:.4f} -> {last:.4f} ({100 * drop:.1f} % lower; needed >= 30 %)")
    if args.json:
        Path(args.json).write_text(json.dumps({"history": history, "unwarped": unwarped, "oracle": oracle,
                                               "drop": drop, "options": options, "cpu_s_per_step": cpu / step,
                                               "wall_s_per_step": wall / step}, indent=2))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        grid, train, channels, kernel, alpha = sys.argv[2:7]
        print(json.dumps(_one_step(int(grid), bool(int(train)), int(channels), int(kernel), float(alpha))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--grids", type=int, nargs="+", default=[16, 32, 64, 128])
    m.add_argument("--extrapolate", type=int, nargs="*", default=[256])
    m.add_argument("--channels", type=int, default=256)  # official inter_channels
    m.add_argument("--kernel", type=int, default=3)  # official match_kernel
    m.add_argument("--alpha", type=float, default=100.0)
    m.add_argument("--json", default=None)
    ln = sub.add_parser("learn")
    ln.add_argument("--steps", type=int, default=300)
    ln.add_argument("--eval-every", type=int, default=50)
    ln.add_argument("--eval-samples", type=int, default=32)
    ln.add_argument("--variant", default="full")  # a variant name of the sweep's cocosnet entry
    ln.add_argument("--data-variant", default="mask")
    ln.add_argument("--seed", type=int, default=0)
    ln.add_argument("--json", default=None)
    args = p.parse_args()
    run_memory(args) if args.cmd == "memory" else run_learn(args)


if __name__ == "__main__":
    main()
