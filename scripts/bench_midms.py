"""Benchmark MIDMs at smoke scale on CPU (64x64 embedded edge data, width 0.125, 1 thread).

Measures
  1. inference time per image: the interleaved steps (re-matching + confidence masks) against
     plain DDIM over the same steps (both without the refinement), and the whole ``generate``
     (with the official refinement: 20 more stochastic steps);
  2. training step time of each phase (first stage, warm-up, joint);
  3. a short training run: output L1 (the project's ``l1`` metric: uint8, 0-255 units) against
     the exact ground truth on held-out samples at step 0 and at each phase boundary.

  python scripts/bench_midms.py [--steps 240] [--out results/bench_midms.json]

The LDM is trained from scratch inside the run (no pretrained weights offline) and the VGG losses
use a seeded random-init VGG19; figures are wiring/efficiency checks, not paper numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.metrics.base import to_uint8_hwc  # noqa: E402
from bench.metrics.pixel import pixel_scores  # noqa: E402
from datasets.base import DatasetSpec  # noqa: E402
from datasets.embedded import EmbeddedDataset  # noqa: E402
from methods.base import BackboneSettings, MethodContext  # noqa: E402
from methods.midms.model import MIDMsMethod, MIDMsOptions  # noqa: E402

RES, WIDTH = 64, 0.125


def collate(ds, indices):
    return torch.utils.data.default_collate([ds[i] for i in indices])


def make(info, total_steps: int, lr: float, ae_lr: float, **kw) -> MIDMsMethod:
    torch.manual_seed(0)
    ctx = MethodContext(data=info, resolution=RES, width=WIDTH, lr_g=lr, beta1=0.9, beta2=0.999,
                        backbones=BackboneSettings(allow_untrained=True, download=False), seed=0,
                        total_steps=total_steps)
    return MIDMsMethod(MIDMsOptions(ae_lr=ae_lr, **kw), ctx)


def timed_pair(fn_a, fn_b, repeats: int):
    """Min seconds of ``fn_a`` and ``fn_b``, run alternately so load from other processes on a
    shared machine hits both alike (the minimum is the least-disturbed run)."""
    fn_a(), fn_b()  # warm-up (allocations, lazy init)
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    return min(ta), min(tb)


@torch.no_grad()
def inference_times(m: MIDMsMethod, batch, repeats: int) -> dict:
    """Seconds per image (batch of 1), the minimum over ``repeats`` alternating runs."""
    m.eval()
    one = {k: v[:1] for k, v in batch.items()}

    def run(fn, rematch: bool = True, refine: bool = True):
        """``fn(one)`` with re-matching and/or the refinement switched off for the call."""
        saved = m.matching.f_y_iter, m.options.refine_noise_level
        m.matching.f_y_iter = saved[0] if rematch else None
        m.options.refine_noise_level = saved[1] if refine else 0.0
        try:
            return fn(one)
        finally:
            m.matching.f_y_iter, m.options.refine_noise_level = saved

    translate = lambda batch: m.translate(batch, m._noise(batch))  # noqa: E731
    interleaved, plain_s = timed_pair(lambda: run(translate, refine=False),
                                      lambda: run(translate, rematch=False, refine=False), repeats)
    gen_full, gen_no_refine = timed_pair(lambda: run(m.generate), lambda: run(m.generate, refine=False), repeats)
    return {"denoising_steps": len(m.options.positions()), "sampler_interleaved_s": interleaved,
            "sampler_plain_ddim_s": plain_s, "interleave_overhead": interleaved / plain_s - 1.0,
            "generate_no_refine_s": gen_no_refine, "generate_with_refine_s": gen_full}


@torch.no_grad()
def eval_l1(m: MIDMsMethod, eval_batches) -> dict:
    m.eval()
    out_l1, warp_l1 = [], []
    for batch in eval_batches:
        out = m.generate(batch)
        gt = to_uint8_hwc(batch["target"])
        out_l1 += pixel_scores(to_uint8_hwc(out.output), gt)["l1"]
        warp_l1 += pixel_scores(to_uint8_hwc(out.warps[str(m.latent_hw[0])]), gt)["l1"]
    m.train()
    return {"output_l1": float(np.mean(out_l1)), "warp_l1": float(np.mean(warp_l1))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=240, help="training steps of the short run (0: timings only)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4, help="lr_g (matching and UNet), as the smoke profiles")
    ap.add_argument("--ae-lr", type=float, default=1e-4)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10, help="timing repeats (minimum)")
    ap.add_argument("--out", default="results/bench_midms.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    train = EmbeddedDataset(DatasetSpec(name="embedded", variant="edge"), "train", RES)
    test = EmbeddedDataset(DatasetSpec(name="embedded", variant="edge"), "test", RES)
    eval_batches = [collate(test, range(i, min(i + 8, args.eval_samples))) for i in range(0, args.eval_samples, 8)]
    ref_l1 = float(np.mean(sum((pixel_scores(to_uint8_hwc(b["exemplar"]), to_uint8_hwc(b["target"]))["l1"]
                                for b in eval_batches), [])))
    report = {"setup": {"resolution": RES, "width": WIDTH, "threads": 1, "batch_size": args.batch_size,
                        "steps": args.steps, "lr": args.lr, "ae_lr": args.ae_lr, "eval_samples": args.eval_samples,
                        "torch": torch.__version__},
              "exemplar_vs_target_l1": ref_l1}

    m = make(train.info, args.steps, args.lr, args.ae_lr)
    rng = np.random.default_rng(0)
    phase_times = {"ae": [], "warmup": [], "joint": []}
    curve = [{"step": 0, "phase": "init", **eval_l1(m, eval_batches)}]
    print(json.dumps(curve[-1]), flush=True)
    boundaries = {m.ae_steps, m.warmup_end, args.steps}
    t_run = time.perf_counter()
    for step in range(args.steps):
        batch = collate(train, rng.integers(0, len(train), args.batch_size).tolist())
        t = time.perf_counter()
        losses = m.train_step(batch, step)
        phase_times[m.last_trace["phase"]].append(time.perf_counter() - t)
        if not all(np.isfinite(v) for v in losses.values()):
            raise SystemExit(f"non-finite loss at step {step}: {losses}")
        if step + 1 in boundaries:
            curve.append({"step": step + 1, "phase": m.phase(step), **eval_l1(m, eval_batches),
                          "losses": {k: round(v, 4) for k, v in losses.items()}})
            print(json.dumps(curve[-1]), flush=True)
    report["train_seconds"] = time.perf_counter() - t_run
    report["step_seconds"] = {k: {"median": statistics.median(v), "min": min(v), "n": len(v)}
                              for k, v in phase_times.items() if v}
    report["l1_curve"] = curve
    report["inference_per_image"] = inference_times(m, eval_batches[0], args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("step_seconds", "inference_per_image", "exemplar_vs_target_l1")},
                     indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
