"""Runs a sweep's trials on Ray Tune and keeps MLflow in step.

The driver: creates the MLflow store, experiment and the sweep's parent run before any trial
starts; skips trials that already have a FINISHED run (unless forced); runs the rest as a grid
of Tune trials (local Ray by default, an existing cluster with ``address``); prints one progress
line per trial report; and ends with a summary table built from MLflow, the source of truth.
"""
from __future__ import annotations

import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from bench.progress import ProgressPrinter, summary_table
from bench.sweep import TrialConfig
from bench.sweep_lock import SweepLock, SweepLocked
from bench.tracking import (DEFAULT_ARTIFACTS, default_tracking_uri, end_parent, ensure_experiment, finished_keys,
                            parent_run, trial_runs)
from bench.trial import Reporter, TrialEnv, copy_checkpoint_out, run_trial

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunOptions:
    workdir: Path  # where mlflow.db, mlartifacts/, results/ and .cache/ live
    tracking_uri: Optional[str] = None  # default: sqlite:///<workdir>/mlflow.db
    address: Optional[str] = None  # Ray cluster ("auto", "ray://host:port"); None: RAY_ADDRESS or local
    num_cpus: Optional[int] = None  # local Ray only
    num_gpus: Optional[int] = None  # local Ray only
    force: bool = False  # re-run trials that already finished
    resume: bool = False  # continue the last interrupted invocation of this sweep (Tuner.restore)
    sweep_file: str = ""
    sweep_hash: str = ""
    extra_tags: Dict[str, str] = field(default_factory=dict)


class TuneReporter(Reporter):
    """Reports through ``tune.report``; checkpoints become ``tune.Checkpoint``s in storage_path."""

    def restore_dir(self) -> Optional[Path]:
        from ray import tune

        ckpt = tune.get_checkpoint()
        return copy_checkpoint_out(ckpt) if ckpt is not None else None

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[Path] = None) -> None:
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(dict(metrics), checkpoint=ckpt)


def tune_trainable(config: Dict[str, Any]) -> None:
    """The Ray Tune function trainable: one trial of the grid."""
    import logging
    import warnings

    from ray import tune

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for noisy in ("ray.train", "ray.tune"):  # "Checkpoint successfully created" on every report
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from bench.plugins import load_plugins

    load_plugins()
    cfg = TrialConfig.from_dict(config["trial"])
    env = TrialEnv(**config["env"])
    if cfg.resources.workers > 1:
        from bench.distributed import launch_data_parallel

        if not env.force and finished_keys(env.tracking_uri, env.experiment_id, [cfg.key]):
            print(f"[{cfg.name}] already FINISHED: skipped", flush=True)
            tune.report({"status": "SKIPPED"})
            return
        launch_data_parallel({"trial": config["trial"], "env": config["env"], "trial_key": cfg.key},
                             storage_path=config["storage_path"])
        return
    run_trial(cfg, env, TuneReporter(), line=lambda s: print(s, flush=True))


def _trial_name(trial) -> str:
    t = trial.config.get("trial", {})
    return f"{t.get('method')}/{t.get('variant')}/{t.get('dataset', {}).get('name')}/s{t.get('seed')}"


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def init_ray(opts: RunOptions, log=print) -> bool:
    """Start or attach to Ray; False when Ray was already initialised by the caller (tests,
    notebooks), who then also owns its shutdown."""
    import ray

    if ray.is_initialized():
        return False

    # Trials keep the launch directory as cwd (relative paths in sweeps mean what the user thinks).
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Make this checkout importable in every worker, wherever Ray starts it.
    paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    runtime_env = {"env_vars": worker_env(paths)}
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Attaching to a cluster: passing num_cpus/num_gpus is an error there (harness.md C.1).
        log(f"connecting to Ray cluster at {address}")
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        quiet_local_ray()
        ray.init(num_cpus=opts.num_cpus or os.cpu_count() or 1, num_gpus=opts.num_gpus,
                 runtime_env=runtime_env, include_dashboard=False, log_to_driver=True,
                 configure_logging=True, logging_level="WARNING")
    sigterm_stops_like_ctrl_c()
    return True


def sigterm_stops_like_ctrl_c() -> None:
    """SIGTERM (kill, timeout, a batch scheduler) stops the sweep the way Ctrl-C does: Tune saves
    its state, the summary names the interrupted trials and how to resume. Otherwise the handler
    Ray's core worker installs in the driver during ray.init prints a native stack dump
    ("*** SIGTERM received at time=...") and aborts the driver, its MLflow runs left RUNNING."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set signal handlers (and Tune's is set there too)

    def on_sigterm(signum, frame):
        on_sigint = signal.getsignal(signal.SIGINT)  # Tune's graceful stop while a sweep runs
        if callable(on_sigint):
            on_sigint(signal.SIGINT, frame)
        else:  # SIGINT ignored or default: still stop
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


def _not_token_auth_notice(record) -> bool:
    """Ray 2.60 turns token authentication on for every new local instance and says so at WARNING
    level: noise for the instance bench starts itself. Ray's other auth messages still pass."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def quiet_local_ray() -> None:
    """Keep Ray's behaviour for a new local instance and drop two things it would print."""
    import logging

    # Not RAY_AUTH_MODE=token (which also skips the notice): `import ray` has already cached the
    # "disabled" default in this process, and the driver then fails to authenticate to its own GCS.
    token_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if _not_token_auth_notice not in token_logger.filters:
        token_logger.addFilter(_not_token_auth_notice)
    # When the first driver connects, Ray prestarts one worker per CPU. Trials need the sweep's
    # runtime_env, so those workers never run anything: they are killed as idle a second after
    # they register, and that kill sometimes aborts one mid-start-up, whose SIGABRT stack dump
    # ("Mutex corrupt: waiting writer with no waiters") reaches the terminal through log_to_driver.
    # Ray's raylet reads RAY_<setting> from its environment; a user's own value wins.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


def worker_env(pythonpath: List[str]) -> Dict[str, str]:
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(pythonpath)), "RAY_CHDIR_TO_TRIAL_DIR": "0",
           "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    for var in ("BENCH_PLUGINS", "BENCH_WEIGHTS_DIR", "BENCH_OFFLINE", "TORCH_HOME"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    return env


def run_sweep(name: str, trials: List[TrialConfig], opts: RunOptions, log=print) -> int:
    """Run (or resume) a sweep; returns the exit code (0 when every trial FINISHED, 2 when it could
    not start: another driver runs it, or the cluster cannot fit a trial)."""
    workdir = opts.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        lock = SweepLock(opts.tracking_uri or default_tracking_uri(workdir), name, workdir).acquire()
    except SweepLocked as exc:
        log(f"error: {exc}")
        return 2
    try:
        return _run_sweep(name, trials, opts, workdir, log)
    finally:
        lock.release()


def _run_sweep(name: str, trials: List[TrialConfig], opts: RunOptions, workdir: Path, log) -> int:
    from ray import tune

    # An existing cluster is asked what it has right after connecting, before any MLflow run exists
    # or any trial is launched: a trial that fits nowhere would wait forever (a local Ray's
    # resources were checked by the preflight, before Ray started).
    attached = opts.address or os.environ.get("RAY_ADDRESS")
    owns_ray_early = False
    if attached and trials:
        import ray

        from bench.preflight import Verdict, check_resources

        owns_ray_early = init_ray(opts, log)
        problems = check_resources(trials, ray.cluster_resources(), where=f"the cluster at {attached}")
        if problems:
            log(Verdict(problems=problems).report(opts.sweep_file or name))
            if owns_ray_early:
                ray.shutdown()
            return 2
    uri = opts.tracking_uri or default_tracking_uri(workdir)
    storage = workdir / "results" / "ray"
    storage.mkdir(parents=True, exist_ok=True)
    experiment_id = ensure_experiment(uri, name, workdir / DEFAULT_ARTIFACTS)
    sha = git_sha()
    sweep_tags = {"bench.git_sha": sha, "bench.sweep_file": opts.sweep_file, "bench.sweep_hash": opts.sweep_hash,
                  **opts.extra_tags}
    parent_id = parent_run(uri, experiment_id, name, sweep_tags)
    env = TrialEnv(tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent_id,
                   cache_dir=str(workdir / ".cache" / "bench"), tags=sweep_tags,
                   invocation=uuid.uuid4().hex[:16], force=opts.force)

    todo = list(trials)
    if not opts.force:
        done = finished_keys(uri, experiment_id, [t.key for t in trials])
        todo = [t for t in trials if t.key not in done]
        if done:
            log(f"skipped {len(trials) - len(todo)} finished")
    log(f"MLflow: {uri}  experiment {name!r} (id {experiment_id}), parent run {parent_id}")

    latest = storage / f"{name}.latest"
    t0 = time.time()
    if todo:
        owns_ray = init_ray(opts, log) or owns_ray_early
        try:
            res = todo[0].resources
            if res.workers > 1:
                # A data-parallel trial's own process only launches its Ray Train workers, which
                # request cpu/gpu each; it holds no CPU (Tune needs some resource: 1 MiB of memory).
                resources = tune.PlacementGroupFactory([{"CPU": 0, "memory": 2 ** 20}])
            else:
                resources = {"cpu": res.cpu, "gpu": res.gpu}
            trainable = tune.with_resources(tune_trainable, resources)
            progress = ProgressPrinter(log)
            run_config = tune.RunConfig(
                storage_path=str(storage), verbose=0, callbacks=[progress],
                failure_config=tune.FailureConfig(max_failures=todo[0].resources.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
            tuner = None
            if opts.resume and latest.is_file():
                path = latest.read_text().strip()
                if tune.Tuner.can_restore(path):
                    log(f"resuming {path}")
                    tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True,
                                                  resume_unfinished=True)
                    local = getattr(tuner, "_local_tuner", None)  # None in Ray-client mode
                    if local is not None:  # the pickled callbacks print for the old invocation
                        local.get_run_config().callbacks = [progress]
            if tuner is None:
                if opts.resume:
                    log("nothing to restore: running the unfinished trials")
                exp_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
                latest.write_text(str(storage / exp_name))
                run_config.name = exp_name
                space = {"trial": tune.grid_search([t.to_dict() for t in todo]), "env": env.__dict__,
                         "storage_path": str(storage)}
                max_conc = todo[0].resources.max_concurrent or None
                tuner = tune.Tuner(
                    trainable, param_space=space, run_config=run_config,
                    tune_config=tune.TuneConfig(max_concurrent_trials=max_conc,
                                                # a worker process serves trial after trial: torch,
                                                # MLflow and backbones are imported/loaded once
                                                reuse_actors=True,
                                                trial_name_creator=_trial_name,
                                                trial_dirname_creator=lambda tr: f"trial_{tr.trial_id}"))
            tuner.fit()
        except KeyboardInterrupt:
            log("interrupted")
        finally:
            import ray

            if owns_ray:
                ray.shutdown()
    elif owns_ray_early:  # connected to check resources, then found nothing left to run
        import ray

        ray.shutdown()

    # The summary comes from MLflow: it knows about skipped, resumed and failed trials alike.
    runs = trial_runs(uri, experiment_id, [t.key for t in trials])
    rows, failed = [], []
    for t in trials:
        run = runs.get(t.key)
        status = run.data.tags.get("bench.status", run.info.status) if run else "NOT RUN"
        if run and run.info.status == "RUNNING":
            status = "INTERRUPTED"
        wall = (run.info.end_time - run.info.start_time) / 1000 if run and run.info.end_time else None
        rows.append((t.name, status, wall, dict(run.data.metrics) if run else {}))
        if status != "FINISHED":
            failed.append((t.name, status))
    log(summary_table(rows))
    untrained = sorted({name for run in runs.values()
                        for name in run.data.tags.get("bench.untrained_backbones", "none").split(",")} - {"none", ""})
    if untrained:
        log(f"note: some numbers above come from untrained (random-init) backbones ({', '.join(untrained)}); "
            "they are labelled in MLflow (tag bench.untrained_backbones) and not comparable with published ones")
    ok = not failed
    end_parent(uri, parent_id, ok)
    log(f"sweep {name!r}: {len(trials) - len(failed)}/{len(trials)} trials FINISHED in {time.time() - t0:.0f}s")
    if failed:
        log("not finished: " + ", ".join(f"{n} ({s})" for n, s in failed))
        # A stopped sweep's cut trials can end INTERRUPTED or FAILED (a worker killed mid-step
        # raises in its trial); --resume continues both (Tuner.restore with resume_errored).
        if any(s in ("INTERRUPTED", "NOT RUN", "FAILED") for _, s in failed):
            log(f"resume with: python -m bench.run {opts.sweep_file} --resume   "
                f"(continues interrupted trials, retries failed ones)")
    from bench.tracking import browse_message

    log(browse_message(uri, experiment_id))
    return 0 if ok else 1
