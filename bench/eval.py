"""``python -m bench.eval``: evaluate existing weights, without training, with the harness' metrics.

Three sources::

    python -m bench.eval --run <MLflow run id> [--metrics fid_sources,swd] [--dataset ade20k] [--num-samples N]
    python -m bench.eval --checkpoint model.pt --method cocosnet --dataset ade20k --root /data/ADE [--option k=v ...]
    python -m bench.eval --sweep sweeps/quickstart.yaml [--metrics ...]    # every FINISHED trial of the sweep

Each evaluation is an evaluation-only trial (``train.steps: 0``, ``init_from`` the source's
weights) run as a Ray task (a local Ray, or ``--address``), logged as its own MLflow run:
a child of the source trial run (``mlflow.parentRunId``), tagged ``bench.role=evaluation`` and
``bench.evaluates=<source run id or checkpoint path>``. The same evaluation twice is done once
(its trial key). ``bench.report`` of the sweep shows metrics an evaluation added to a trial in
that trial's row; ``--checkpoint`` runs go to the experiment ``--experiment`` (default
``evaluations``), which ``bench.report`` tables like a sweep.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from bench.config import ConfigError
from bench.sweep import TrialConfig

ROLE = "evaluation"
EVALUATES_TAG = "bench.evaluates"


@dataclasses.dataclass(frozen=True)
class Job:
    cfg: TrialConfig
    source: str  # the source run id, or the checkpoint file
    parent_run_id: str  # the MLflow run the evaluation is a child of
    experiment_id: str


def evaluation_config(source: TrialConfig, init_from: str, metrics: Optional[List[str]], dataset: Optional[str],
                      root: Optional[str], num_samples: Optional[int]) -> TrialConfig:
    """The source trial as an evaluation-only trial of ``init_from``, with the requested changes."""
    from bench.sweep import _resolved_dataset
    from datasets.base import DatasetSpec

    ev = source.eval
    if metrics:
        ev = dataclasses.replace(ev, metrics=list(metrics))
    if num_samples:
        ev = dataclasses.replace(ev, num_samples=int(num_samples))
    ev = dataclasses.replace(ev, every=0, select="final")  # one evaluation of the given weights
    ds = source.dataset
    if dataset or root:
        name, _, variant = (dataset or source.dataset_label).partition("-")
        ds = _resolved_dataset(DatasetSpec(name=name, variant=variant or None, root=root or ds.root))
    train = dataclasses.replace(source.train, steps=0)
    return dataclasses.replace(source, train=train, eval=ev, dataset=ds, init_from=init_from)


# ---- sources -------------------------------------------------------------------------------------
def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def trial_of_run(uri: str, run_id: str) -> Tuple[TrialConfig, object]:
    """The trial config a run logged (its ``config.yaml`` artifact), and the run."""
    import tempfile

    import yaml

    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow's own exception types
        raise LookupError(f"no MLflow run {run_id} in {uri} ({type(exc).__name__})") from None
    with tempfile.TemporaryDirectory() as d:
        try:
            path = client.download_artifacts(run_id, "config.yaml", d)
        except Exception:  # noqa: BLE001
            raise LookupError(f"run {run_id} ({run.info.run_name}) has no config.yaml: not a bench trial run") from None
        raw = yaml.safe_load(Path(path).read_text())
    raw.pop("trial_key", None)
    return TrialConfig.from_dict(raw), run


def jobs_from_runs(uri: str, run_ids: List[str], args) -> List[Job]:
    jobs = []
    for rid in run_ids:
        cfg, run = trial_of_run(uri, rid)
        if run.info.status != "FINISHED":
            raise LookupError(f"run {rid} ({run.info.run_name}) is {run.info.status}, not FINISHED")
        ev = evaluation_config(cfg, f"run:{rid}", args.metrics, args.dataset, args.root, args.num_samples)
        jobs.append(Job(ev, rid, rid, run.info.experiment_id))
    return jobs


def jobs_from_sweep(uri: str, sweep_file: str, args) -> List[Job]:
    """Every FINISHED trial run of the sweep's experiment, with the sweep's eval section now (e.g.
    metrics added since) unless --metrics says otherwise."""
    from bench.report.data import finished_trials, resolve_experiment, search_frame, tag
    from bench.sweep import load_sweep

    spec = load_sweep(sweep_file)
    name = resolve_experiment(sweep_file)
    df = search_frame(name, uri)
    ok, _ = finished_trials(df) if not df.empty else (df, [])
    if ok.empty:
        raise LookupError(f"sweep {name!r} has no FINISHED trial runs in {uri}")
    metrics = args.metrics or spec.eval.metrics
    args = argparse.Namespace(**{**vars(args), "metrics": metrics})
    jobs = jobs_from_runs(uri, [r for r, role in zip(ok["run_id"], tag(ok, "bench.role")) if role == "trial"], args)
    return jobs


def job_from_checkpoint(uri: str, args) -> Job:
    """A converted official checkpoint or a trial's checkpoint.pt, with a method and a dataset."""
    from bench.sweep import expand, spec_from_dict
    from bench.tracking import ensure_experiment, parent_run

    if not args.method or not args.dataset:
        raise ConfigError("--checkpoint needs --method and --dataset (name or name-variant)")
    name, _, variant = args.dataset.partition("-")
    options = {}
    for text in args.option or []:
        from bench.config import parse_override

        keys, value = parse_override(text)
        options[".".join(keys)] = value
    raw = {"name": args.experiment, "methods": [{"name": args.method, "options": options,
                                                 "init_from": str(Path(args.checkpoint).resolve())}],
           "datasets": [{"name": name, **({"variant": variant} if variant else {}),
                         **({"root": args.root} if args.root else {})}],
           "train": {"steps": 0}, "eval": {"metrics": args.metrics or ["l1", "psnr", "ssim"],
                                           **({"num_samples": args.num_samples} if args.num_samples else {})},
           "scale": {"resolution": args.resolution}, "resources": {"cpu": 1}}
    cfg = expand(spec_from_dict(raw, "--checkpoint"))[0]
    workdir = Path(args.workdir).resolve()
    exp = ensure_experiment(uri, args.experiment, workdir / "mlartifacts")
    parent = parent_run(uri, exp, args.experiment, {})
    return Job(cfg, str(Path(args.checkpoint).resolve()), parent, exp)


# ---- running -------------------------------------------------------------------------------------
def _evaluate_remote(cfg_dict: Dict, env_dict: Dict) -> Dict:
    """One evaluation in a Ray worker."""
    from bench.plugins import load_plugins
    from bench.trial import TrialEnv, run_trial

    load_plugins()
    cfg = TrialConfig.from_dict(cfg_dict)
    res = run_trial(cfg, TrialEnv(**env_dict), line=lambda s: print(s, flush=True))
    return {"status": res["status"], "run_id": res["run_id"], "metrics": res.get("metrics", {})}


def run_jobs(jobs: List[Job], uri: str, workdir: Path, address: Optional[str], num_cpus: Optional[int],
             log=print) -> List[Dict]:
    """Every job as a Ray task (each with its trial's CPUs/GPUs); the results in job order."""
    import ray

    from bench.runner import RunOptions, init_ray
    from bench.trial import TrialEnv

    owns = init_ray(RunOptions(workdir=workdir, address=address, num_cpus=num_cpus), log)
    try:
        remote = ray.remote(_evaluate_remote)
        refs = []
        for job in jobs:
            env = TrialEnv(tracking_uri=uri, experiment_id=job.experiment_id, parent_run_id=job.parent_run_id,
                           cache_dir=str(workdir / ".cache" / "bench"),
                           tags={"bench.role": ROLE, EVALUATES_TAG: job.source})
            r = job.cfg.resources
            refs.append(remote.options(num_cpus=r.cpu, num_gpus=r.gpu, max_retries=0)
                        .remote(job.cfg.to_dict(), dataclasses.asdict(env)))
        out = []
        for job, ref in zip(jobs, refs):
            try:
                out.append(ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - one failed evaluation never loses the others
                out.append({"status": "FAILED", "run_id": None, "metrics": {}, "error": f"{exc}".splitlines()[-1]})
        return out
    finally:
        if owns:
            ray.shutdown()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", nargs="+", help="MLflow run id(s) of finished trials")
    src.add_argument("--checkpoint", help="a checkpoint file (python -m bench.convert output or a trial's checkpoint.pt)")
    src.add_argument("--sweep", help="a sweep file: every FINISHED trial run of its experiment")
    p.add_argument("--metrics", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                   help="comma-separated metrics (default: the source trial's, or the sweep's)")
    p.add_argument("--dataset", help="dataset or dataset-variant to evaluate on (default: the source's)")
    p.add_argument("--root", help="the dataset's root folder")
    p.add_argument("--num-samples", type=int, help="evaluation samples (default: the source's)")
    p.add_argument("--method", help="--checkpoint: the method the weights are for")
    p.add_argument("--option", action="append", help="--checkpoint: a method option key=value (repeatable)")
    p.add_argument("--resolution", type=int, default=256, help="--checkpoint: image side (default: 256)")
    p.add_argument("--experiment", default="evaluations", help="--checkpoint: MLflow experiment (default: evaluations)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--workdir", default=".", help="where mlflow.db and .cache are (default: .)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench.metrics import METRICS
    from bench.plugins import load_plugins
    from bench.tracking import default_tracking_uri

    import datasets  # noqa: F401
    import methods  # noqa: F401

    load_plugins()
    workdir = Path(args.workdir).resolve()
    uri = args.tracking_uri or default_tracking_uri(workdir)
    if (uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file() and not args.checkpoint):
        print(f"error: no MLflow store at {uri} (--workdir / --tracking-uri name the store the runs are in)",
              file=sys.stderr)
        return 2
    try:
        for m in args.metrics or []:
            if m != "all":
                METRICS.get(m)
        if args.run:
            jobs = jobs_from_runs(uri, args.run, args)
        elif args.sweep:
            jobs = jobs_from_sweep(uri, args.sweep, args)
        else:
            jobs = [job_from_checkpoint(uri, args)]
    except (ConfigError, LookupError, KeyError, ValueError) as exc:
        print(f"error: {str(exc).strip(chr(39))}", file=sys.stderr)
        return 2
    print(f"evaluating {len(jobs)} trial{'s' if len(jobs) != 1 else ''} (tracking {uri})")
    results = run_jobs(jobs, uri, workdir, args.address, args.num_cpus)
    failed = 0
    for job, res in zip(jobs, results):
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(res["metrics"].items())
                          if not k.endswith(("_seconds", "_mb")))
        print(f"{job.cfg.name} <- {job.source}: {res['status']}" + (f" run {res['run_id']}" if res["run_id"] else "")
              + (f"  {shown}" if shown else "") + (f"  ({res['error']})" if res.get("error") else ""))
        failed += res["status"] not in ("FINISHED", "SKIPPED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
