"""``python -m bench.run SWEEP.yaml [key=value ...]``: run every trial of a sweep on Ray Tune.

Examples::

    python -m bench.run sweeps/quickstart.yaml
    python -m bench.run sweeps/quickstart.yaml train.steps=50 resources.gpu=0.5
    python -m bench.run sweeps/ablation_v2.yaml --profile smoke --dry-run
    python -m bench.run sweeps/quickstart.yaml --resume          # after Ctrl-C or a killed driver
    python -m bench.run --list
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def list_registered() -> List[str]:
    import datasets  # noqa: F401
    import methods  # noqa: F401
    from bench.metrics import METRICS
    from bench.plugins import load_plugins
    from datasets.registry import DATASETS
    from methods.registry import METHODS

    load_plugins()
    return ([f"method {n}" for n in METHODS.names()] + [f"dataset {n}" for n in DATASETS.names()]
            + [f"metric {n}" for n in METRICS.names()]
            + [f"recipe {n}:{key}" for n in METHODS.names() for key in METHODS.get(n).recipes])


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="?", help="sweep YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=50")
    p.add_argument("--list", action="store_true", help="print every registered method, dataset, metric and "
                   "official per-dataset recipe (method:dataset)")
    p.add_argument("--dry-run", action="store_true", help="print the expanded trials and the preflight's verdict, "
                   "then exit (2 when a trial cannot run)")
    p.add_argument("--no-preflight", action="store_true", help="skip the checks that every trial can start "
                   "(data, options, weights, metrics, resources) before Ray starts")
    p.add_argument("--profile", help="a profile defined in the sweep (e.g. smoke)")
    p.add_argument("--force", action="store_true", help="re-run trials that already FINISHED")
    p.add_argument("--resume", action="store_true", help="continue the last interrupted run of this sweep")
    p.add_argument("--address", help="Ray cluster address (auto, host:port, ray://host:10001); default: "
                   "RAY_ADDRESS, else a local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--num-gpus", type=int, help="GPUs of the local Ray instance (default: detected)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--workdir", default=".", help="where mlflow.db, mlartifacts/ and results/ go (default: .)")
    p.add_argument("--no-report", action="store_true", help="do not build the sweep's report at the end")
    return p.parse_intermixed_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(list_registered()))
        return 0
    if not args.sweep:
        print("error: give a sweep file (or --list); see --help", file=sys.stderr)
        return 2
    from bench.config import ConfigError
    from bench.sweep import expand, file_hash, load_sweep

    try:
        spec = load_sweep(args.sweep, args.overrides, args.profile)
        trials = expand(spec)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for t in trials:
            print(f"{t.name}  key={t.key}  steps={t.train.steps} res={t.scale.resolution} "
                  f"width={t.scale.width} cpu={t.resources.cpu} gpu={t.resources.gpu}"
                  + (f" recipe={t.recipe}" if t.recipe else "") + (f" init_from={t.init_from}" if t.init_from else ""))
        print(f"{len(trials)} trials")
    from bench.tracking import default_tracking_uri

    if not args.no_preflight:
        verdict = _preflight(args, spec, trials, default_tracking_uri(Path(args.workdir)))
        print(verdict.report(args.sweep), file=sys.stdout if verdict.ok or args.dry_run else sys.stderr)
        if not verdict.ok:
            return 2
    if args.dry_run:
        return 0
    from bench.runner import RunOptions, run_sweep

    extra = {"bench.profile": args.profile or "", "bench.overrides": " ".join(args.overrides)}
    opts = RunOptions(workdir=Path(args.workdir), tracking_uri=args.tracking_uri, address=args.address,
                      num_cpus=args.num_cpus, num_gpus=args.num_gpus, force=args.force, resume=args.resume,
                      sweep_file=str(args.sweep), sweep_hash=file_hash(args.sweep), extra_tags=extra)
    try:
        code = run_sweep(spec.name, trials, opts)
    except KeyboardInterrupt:  # before Tune took over the signal (e.g. while Ray starts): no traceback
        print(f"interrupted; resume with: python -m bench.run {args.sweep} --resume", file=sys.stderr)
        return 130
    if not args.no_report:
        code = _report(spec.name, opts, code)
    return code


def _preflight(args, spec, trials, default_uri: str):
    """Every trial checked before Ray starts; resources against this machine unless the sweep goes to
    an existing cluster (then ``run_sweep`` asks the cluster right after connecting)."""
    import os

    from bench.preflight import local_resources, preflight
    from bench.sweep import sweep_line_finder

    attached = args.address or os.environ.get("RAY_ADDRESS")
    resources = None if attached else local_resources(args.num_cpus, args.num_gpus)
    return preflight(spec, trials, args.sweep, sweep_line_finder(args.sweep), args.tracking_uri or default_uri,
                     resources)


def _report(name: str, opts, code: int) -> int:
    """Build the sweep's report when the report module is available (it is its own issue)."""
    try:
        from bench import report
    except ImportError:
        return code
    try:
        out = report.build_report(name, tracking_uri=opts.tracking_uri, workdir=opts.workdir)
        print(f"report: {out}")
    except Exception as exc:  # noqa: BLE001 - a report failure must not hide the sweep's result
        print(f"report failed: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
