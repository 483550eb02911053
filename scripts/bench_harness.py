"""Benchmark: what the harness costs (not a test; run it on a quiet machine).

Measures, on one SPADE trial of the embedded dataset sized to about ``--trial-seconds``:

1. direct    -- the same training and evaluation called directly (no Ray, no MLflow);
2. bench.run -- that trial as a one-trial sweep: the trial's wall time inside the harness (its
   MLflow run) and the whole command (fixed costs: Ray start/stop, MLflow setup);
3. concurrency -- two such trials on 2 cores, concurrently (cpu=1 each) vs one after another
   (cpu=2 each, max_concurrent=1).

Targets (issue 2): overhead <= 10% of a 60 s trial; 2 concurrent trials in <= 0.6x the sequential time.

    python scripts/bench_harness.py --trial-seconds 60
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.evaluate import build_metrics, evaluate  # noqa: E402
from bench.metrics.base import MetricContext  # noqa: E402
from bench.sweep import expand, spec_from_dict  # noqa: E402
from bench.trial import StepBatchSampler, build_method, eval_loader, make_dataset, seed_everything  # noqa: E402
from methods.base import BackboneSettings  # noqa: E402

METRICS = ["l1", "psnr", "ssim"]


def sweep_dict(name: str, steps: int, seeds, cpu: float, max_concurrent: int) -> dict:
    return {"name": name, "seeds": list(seeds),
            "methods": [{"name": "spade"}], "datasets": [{"name": "embedded", "variant": "mask"}],
            "train": {"steps": steps, "batch_size": 4, "log_every": 10, "checkpoint_every": max(1, steps // 4),
                      "allow_untrained_backbones": True},
            "eval": {"num_samples": 32, "batch_size": 8, "metrics": METRICS},
            "scale": {"resolution": 64, "width": 0.125},
            "resources": {"cpu": cpu, "max_concurrent": max_concurrent}}


def direct(steps: int, threads: int) -> float:
    """Train + evaluate exactly as a trial does, with no Ray and no MLflow."""
    cfg = expand(spec_from_dict(sweep_dict("direct", steps, [0], threads, 1)))[0]
    torch.set_num_threads(threads)
    t0 = time.time()
    seed_everything(cfg.seed)
    train_ds, eval_ds = make_dataset(cfg, "train"), make_dataset(cfg, "test")
    method = build_method(cfg, train_ds.info, torch.device("cpu"))
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=StepBatchSampler(len(train_ds), 4, 0, 0, steps))
    for step, batch in enumerate(loader):
        method.train_step(batch, step)
    ctx = MetricContext(data=eval_ds.info, device=torch.device("cpu"), backbones=BackboneSettings(),
                        cache_dir=Path(tempfile.mkdtemp()))
    evaluate(method, eval_loader(eval_ds, cfg), build_metrics(METRICS, ctx), torch.device("cpu"))
    return time.time() - t0


def via_bench_run(workdir: Path, sweep: dict, num_cpus: int = 2) -> dict:
    path = workdir / f"{sweep['name']}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "bench.run", str(path), "--workdir", str(workdir), "--no-report",
                          "--num-cpus", str(num_cpus)], cwd=REPO, capture_output=True, text=True)
    total = time.time() - t0
    if out.returncode:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name(sweep["name"])
    runs = client.search_runs([exp.experiment_id], "tags.`bench.role` = 'trial'")
    walls = [(r.info.end_time - r.info.start_time) / 1000 for r in runs]
    starts = [r.info.start_time for r in runs]
    ends = [r.info.end_time for r in runs]
    return {"command_s": total, "trial_s": walls, "trials_span_s": (max(ends) - min(starts)) / 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trial-seconds", type=float, default=60.0)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    probe = direct(10, 1)
    steps = max(10, int(10 * args.trial_seconds / probe))
    print(f"calibration: 10 steps + eval = {probe:.1f}s -> {steps} steps for ~{args.trial_seconds:.0f}s")

    d1 = direct(steps, 1)
    work = Path(tempfile.mkdtemp(prefix="bench_harness_"))
    one = via_bench_run(work / "one", sweep_dict("overhead", steps, [0], 1, 1)) if (work / "one").mkdir() is None else None
    overhead = one["trial_s"][0] - d1
    fixed = one["command_s"] - one["trial_s"][0]
    print(f"direct trial (1 thread):        {d1:7.1f} s")
    print(f"same trial under bench.run:     {one['trial_s'][0]:7.1f} s  -> per-trial overhead {overhead:+.1f} s "
          f"({100 * overhead / d1:+.1f}% of the trial; target <= 10%)")
    print(f"whole command:                  {one['command_s']:7.1f} s  -> fixed costs (Ray start/stop, MLflow) {fixed:.1f} s")

    (work / "conc").mkdir()
    conc = via_bench_run(work / "conc", sweep_dict("concurrent", steps, [0, 1], 1, 2))
    (work / "seq").mkdir()
    seq = via_bench_run(work / "seq", sweep_dict("sequential", steps, [0, 1], 2, 1))
    ratio = conc["trials_span_s"] / seq["trials_span_s"]
    # The same 1-cpu trial twice in a row, from the single-trial measurement above.
    same_res_ratio = conc["trials_span_s"] / (2 * one["trial_s"][0])
    print(f"2 trials concurrently (1 cpu each):   {conc['trials_span_s']:7.1f} s (command {conc['command_s']:.1f} s)")
    print(f"2 trials one after another (2 cpus):  {seq['trials_span_s']:7.1f} s (command {seq['command_s']:.1f} s)")
    print(f"concurrent / sequential = {ratio:.2f} (target <= 0.6; the sequential trials get both cores)")
    print(f"concurrent / (2 x the 1-cpu trial above) = {same_res_ratio:.2f} (same per-trial resources)")
    print(json.dumps({"steps": steps, "direct_s": d1, "harness_trial_s": one["trial_s"][0], "overhead_s": overhead,
                      "fixed_s": fixed, "concurrent_s": conc["trials_span_s"], "sequential_s": seq["trials_span_s"],
                      "ratio": ratio, "ratio_same_resources": same_res_ratio}))


if __name__ == "__main__":
    main()
