"""One trial, start to end: data, method, training with checkpoints, evaluation, MLflow logging.

This module does not depend on Ray: ``run_trial`` takes a ``Reporter`` (Ray Tune's in a sweep, a
plain one when called directly, e.g. by the overhead benchmark). Everything a trial writes to
MLflow is idempotent, so a trial restarted from a checkpoint continues its run without
duplicating a step.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import random
import resource
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import yaml

from bench.data_parallel import Shard, average_gradients_before_step, broadcast_state, synchronize_batchnorm
from bench.evaluate import build_metrics, collapse_warnings, evaluate, select_metrics
from bench.grid import grid_rows, save_grid
from bench.init_from import apply_init_from, load_init_from
from bench.malloc import release_freed_memory
from bench.metrics.base import MetricContext
from bench.sweep import TrialConfig
from bench.tracking import TrialRun
from datasets.base import ExemplarDataset
from datasets.registry import DATASETS
from methods.base import BackboneSettings, ExemplarMethod, MethodContext, MethodOutput
from methods.common.weights import is_untrained
from methods.registry import METHODS

CHECKPOINT_FILE = "trial_state.pt"


@dataclass
class TrialEnv:
    """Where a trial logs and caches; not part of its identity."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cache_dir: str
    tags: Dict[str, str] = field(default_factory=dict)  # git sha, sweep file and hash, ...
    invocation: str = ""  # the bench.run call (a resumed invocation keeps its id)
    force: bool = False  # --force: a new run even when the trial already FINISHED


class Reporter:
    """How a trial talks to whoever runs it. The default does nothing (direct calls)."""

    def restore_dir(self) -> Optional[Path]:
        return None

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[Path] = None) -> None:
        pass


class Diverged(Exception):
    pass


# ---- data ------------------------------------------------------------------------------------
def batch_indices(n: int, batch_size: int, seed: int, step: int) -> List[int]:
    """Sample indices of training step ``step``: a pure function of (n, batch size, seed, step).

    The stream is epoch after epoch of seeded permutations, so a resumed trial sees exactly the
    batches it would have seen without the interruption (the data position is just ``step``).
    Data-parallel workers each take their slice of the global batch (``StepBatchSampler``).
    """
    start = step * batch_size
    out: List[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset: offset + batch_size - len(out)].tolist())
    return out


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of steps ``start..stop-1``; with a shard, this worker's slice of each global batch
    (a distributed sampler whose position is the step)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, shard: Shard = Shard()):
        self.n, self.bs, self.seed, self.start, self.stop, self.shard = n, batch_size, seed, start, stop, shard

    def __iter__(self) -> Iterator[List[int]]:
        r, w = self.shard.rank, self.shard.world
        for step in range(self.start, self.stop):
            yield batch_indices(self.n, self.bs * w, self.seed, step)[r * self.bs:(r + 1) * self.bs]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def make_dataset(cfg: TrialConfig, split: str) -> ExemplarDataset:
    return DATASETS.get(cfg.dataset.name)(cfg.dataset, split, cfg.scale.resolution, cfg.seed)


def eval_loader(ds: ExemplarDataset, cfg: TrialConfig):
    n = min(cfg.eval.num_samples, len(ds))
    subset = torch.utils.data.Subset(ds, list(range(n)))
    return torch.utils.data.DataLoader(subset, batch_size=cfg.eval.batch_size, shuffle=False,
                                       num_workers=cfg.train.num_workers)


# ---- helpers ---------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """Every RNG a trial uses, as plain tensors/lists (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.random.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "python": random.getstate()}
    if torch.cuda.is_available():  # noise drawn on the GPU comes from the per-device generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pick_device(cfg: TrialConfig) -> torch.device:
    if cfg.resources.gpu > 0 and torch.cuda.is_available():
        return torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU
    return torch.device("cpu")


def versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "ray", "mlflow", "numpy", "clean-fid", "lpips", "diffusers", "scikit-image"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def lr_multiplier(cfg: TrialConfig) -> float:
    """The learning-rate rule for data-parallel trials (recorded as a param)."""
    return float(cfg.resources.workers) if cfg.train.lr_scaling == "linear" else 1.0


def build_method(cfg: TrialConfig, data_info, device: torch.device) -> ExemplarMethod:
    cls = METHODS.get(cfg.method)
    options = cls.Options(**cfg.method_options) if cls.Options else None
    ctx = MethodContext(
        data=data_info, resolution=cfg.scale.resolution, width=cfg.scale.width, lr_g=cfg.train.lr_g,
        lr_d=cfg.train.lr_d, beta1=cfg.train.beta1, beta2=cfg.train.beta2, lr_scale=lr_multiplier(cfg), device=device,
        backbones=BackboneSettings(weights_dir=cfg.train.weights_dir, seed=cfg.seed,
                                   allow_untrained=cfg.train.allow_untrained_backbones),
        seed=cfg.seed, total_steps=cfg.train.steps, training=cfg.train.steps > 0)
    return cls(options, ctx)


def reset_peak_memory(device: torch.device) -> None:
    """Start the trial's memory peak from now: Ray reuses worker processes across trials, so the
    process-lifetime peak would mix trials. Linux resets VmHWM on "5" in /proc/self/clear_refs."""
    # Freed memory a previous trial left in the heap would otherwise stay resident and count.
    release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # other systems: the lifetime peak (ru_maxrss) is reported instead
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> Dict[str, float]:
    """Peak resident memory of the trial's process since ``reset_peak_memory`` (CPU), and peak GPU
    memory allocated by torch (CUDA)."""
    rss_kib = None
    try:
        with open("/proc/self/status") as fh:
            for row in fh:
                if row.startswith("VmHWM:"):
                    rss_kib = float(row.split()[1])
    except OSError:
        pass
    if rss_kib is None:
        rss_kib = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # Linux: KiB
    out = {"peak_rss_mb": rss_kib / 1024.0}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def _to(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def copy_checkpoint_out(ckpt) -> Path:
    """Copy a Ray checkpoint's files to a local temp dir (the checkpoint object is only valid inside
    the session that returned it)."""
    dest = Path(tempfile.mkdtemp(prefix="bench_restore_"))
    with ckpt.as_directory() as d:
        for src in Path(d).iterdir():
            if src.is_file():
                (dest / src.name).write_bytes(src.read_bytes())
    return dest


def _save_state(path: Path, method: ExemplarMethod, step: int, hooks: Optional[Dict[str, Any]] = None) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "state": method.training_state(), "rng": rng_state(), "hooks": hooks or {}}, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, method: ExemplarMethod) -> Tuple[int, Dict[str, Any]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    method.load_training_state(state["state"])
    set_rng_state(state["rng"])
    return int(state["step"]), state.get("hooks", {})


# ---- the trial -------------------------------------------------------------------------------
class _NoRun:
    """What data-parallel workers other than rank 0 log to: nothing."""

    run_id = None
    resumed = already_finished = False

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def run_trial(cfg: TrialConfig, env: TrialEnv, reporter: Reporter = Reporter(),
              line: Callable[[str], None] = print, shard: Shard = Shard()) -> Dict[str, Any]:
    """Train and evaluate one trial (or one data-parallel worker's part of it);
    returns {"status", "metrics", "run_id"}."""
    torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    device = pick_device(cfg)
    if shard.is_main:
        run = TrialRun(env.tracking_uri, env.experiment_id, env.parent_run_id, cfg.name, cfg.key,
                       tags={"bench.method": cfg.method, "bench.variant": cfg.variant,
                             "bench.dataset": cfg.dataset_label, "bench.seed": str(cfg.seed),
                             "bench.sweep": cfg.sweep, **env.tags}, invocation=env.invocation, force=env.force)
    else:
        run = _NoRun()
    if run.already_finished:
        line(f"[{cfg.name}] already FINISHED in run {run.run_id}: skipped")
        reporter.report({"status": "SKIPPED", "done_step": cfg.train.steps})
        return {"status": "SKIPPED", "metrics": {}, "run_id": run.run_id}
    t_start = time.time()
    reset_peak_memory(device)
    try:
        return _train_and_evaluate(cfg, env, run, reporter, device, line, t_start, shard)
    except Diverged as exc:
        run.set_tags({"bench.diverged": str(exc)})
        run.finish("DIVERGED")
        line(f"[{cfg.name}] DIVERGED: {exc}")
        reporter.report({"status": "DIVERGED"})
        return {"status": "DIVERGED", "metrics": {}, "run_id": run.run_id}
    except BaseException as exc:
        with tempfile.TemporaryDirectory() as d:
            tb = Path(d) / "traceback.txt"
            tb.write_text(traceback.format_exc())
            try:
                run.log_artifact(tb)
                run.set_tags({"bench.error": f"{type(exc).__name__}: {exc}"[:4000]})
                run.finish("FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise


def build_trial_metrics(cfg: TrialConfig, names: List[str], eval_ds: ExemplarDataset, device: torch.device,
                        env: TrialEnv) -> Dict[str, Any]:
    """The trial's metrics, built without moving any random stream: their backbones are cached per
    process, so drawing from the trial's streams here would make a trial's training depend on
    which trials a (reused) worker process ran before it."""
    mctx = MetricContext(
        data=eval_ds.info, device=device, cache_dir=Path(env.cache_dir),
        backbones=BackboneSettings(weights_dir=cfg.train.weights_dir, seed=cfg.seed,
                                   allow_untrained=cfg.eval.allow_untrained_backbones),
        data_key=f"{cfg.dataset_label}|{cfg.dataset.eval_split}|{cfg.dataset.root}|"
                 f"{sorted(cfg.dataset.options.items())}|n={min(cfg.eval.num_samples, len(eval_ds))}",
        seed=cfg.seed)
    streams = rng_state()
    try:
        metrics = {}
        for name in names:
            mctx.options = cfg.eval.metric_options.get(name, {})
            metrics.update(build_metrics([name], dataclasses.replace(mctx)))
        return metrics
    finally:
        set_rng_state(streams)


def _train_and_evaluate(cfg, env, run, reporter, device, line, t_start, shard: Shard):
    seed_everything(cfg.seed)
    eval_ds = make_dataset(cfg, cfg.dataset.eval_split)
    # An evaluation-only trial never reads the training split (it need not exist, e.g. a test-only copy).
    train_ds = make_dataset(cfg, cfg.dataset.train_split) if cfg.train.steps > 0 else None
    method = build_method(cfg, (train_ds if train_ds is not None else eval_ds).info, device)
    init_tags = {}
    if cfg.init_from:  # before the data-parallel broadcast, so every worker starts from these weights
        init_tags = apply_init_from(method, load_init_from(cfg.init_from, cfg.method, env.tracking_uri), cfg.init_from)
        line(f"[{cfg.name}] weights from {init_tags.get('bench.init_from.origin', cfg.init_from)}: "
             f"{init_tags['bench.init_from.networks']}")
    sync_bn = cfg.train.sync_bn if cfg.train.sync_bn is not None else bool(method.sync_batchnorm)
    if shard.world > 1:
        if sync_bn:  # before the broadcast: every worker starts from rank 0's statistics too
            synchronize_batchnorm(method, device)
        broadcast_state(method)
        average_gradients_before_step(method, shard.world)
        torch.manual_seed(cfg.seed * 1000 + shard.rank)  # per-worker noise (dropout, diffusion, ...)
    metric_names, skipped_metrics = select_metrics(cfg.eval.metrics, eval_ds.info, method.has_warp)
    metrics = build_trial_metrics(cfg, metric_names if shard.is_main else [], eval_ds, device, env)  # rank 0 evaluates
    trial = Trial(cfg, env, run, reporter, device, line, shard, method, metrics, eval_ds)

    # Params, tags and the resolved config, once (write-once params make this idempotent).
    params = cfg.identity()
    params["data"] = {"eval": eval_ds.info.params, "eval_size": min(cfg.eval.num_samples, len(eval_ds))}
    if train_ds is not None:
        params["data"].update(train=train_ds.info.params, train_size=len(train_ds))
    params["metrics_selected"] = ",".join(metric_names)
    if method.resolved:
        params["resolved"] = dict(method.resolved)
    params["parallel"] = {"workers": shard.world, "batch_per_worker": cfg.train.batch_size,
                          "effective_batch_size": cfg.train.batch_size * shard.world,
                          "lr_scaling": cfg.train.lr_scaling, "lr_multiplier": lr_multiplier(cfg),
                          "sync_bn": sync_bn and shard.world > 1}
    run.log_params(params)
    provenance = {f"bench.weights.{k}": v for k, v in method.provenance.items()}
    for mname, m in metrics.items():
        provenance.update({f"bench.weights.{mname}.{k}": v for k, v in m.provenance.items()})
    untrained = sorted(k.split("bench.weights.", 1)[1] for k, v in provenance.items() if is_untrained(v))
    tags = {"bench.trial_config_hash": cfg.key, "bench.device": str(device),
            "bench.untrained_backbones": ",".join(untrained) if untrained else "none",
            **{f"bench.version.{k}": v for k, v in versions().items()}, **provenance, **init_tags}
    if cfg.train.steps == 0:
        tags["bench.eval_only"] = "true"
    if skipped_metrics:
        tags["bench.metrics_unsupported"] = "; ".join(f"{k}: {v}" for k, v in skipped_metrics.items())
    use_amp = cfg.train.amp and device.type == "cuda"
    if cfg.train.amp:
        tags["bench.amp"] = "bf16 autocast" if use_amp else "requested but ignored: autocast is CUDA-only here"
        if not use_amp:
            line(f"[{cfg.name}] train.amp ignored on {device}: mixed precision runs on CUDA only")
    run.set_tags(tags)
    with tempfile.TemporaryDirectory() as d:
        cfg_file = Path(d) / "config.yaml"
        cfg_file.write_text(yaml.safe_dump({"trial_key": cfg.key, **cfg.to_dict()}, sort_keys=False))
        run.log_artifact(cfg_file)
        skipped = getattr(train_ds, "skipped", []) + getattr(eval_ds, "skipped", [])
        if skipped:
            sk = Path(d) / "skipped_samples.txt"
            sk.write_text("".join(f"{f}\t{why}\n" for f, why in skipped))
            run.log_artifact(sk)

    # Resume from the runner's checkpoint, if any.
    hooks = [LossLog(), PeriodicEvaluation(trial)] if shard.is_main else [LossLog()]
    start = 0
    restore = reporter.restore_dir()
    if restore is not None and (restore / CHECKPOINT_FILE).is_file():
        start, hook_states = _load_state(restore / CHECKPOINT_FILE, method)  # the number of steps done
        for h in hooks:
            h.load_state(hook_states.get(type(h).__name__, {}), restore)
        line(f"[{cfg.name}] resumed from step {start} (run {run.run_id})")
    elif run.resumed:
        line(f"[{cfg.name}] restarting from step 0 in its unfinished run {run.run_id}")
    method.train()
    train_loop(trial, train_ds, start, hooks, use_amp)

    if not shard.is_main:  # rank 0 evaluates and logs; the others report once more and leave
        reporter.report({"status": "WORKER_DONE", "step": cfg.train.steps, "steps": cfg.train.steps})
        return {"status": "FINISHED", "metrics": {}, "run_id": None}
    return finish_trial(trial, hooks[1], t_start)


# ---- the loop and its steps ------------------------------------------------------------------
@dataclass
class Trial:
    """What the loop's steps share for one trial."""

    cfg: TrialConfig
    env: TrialEnv
    run: Any  # TrialRun (rank 0) or _NoRun
    reporter: Reporter
    device: torch.device
    line: Callable[[str], None]
    shard: Shard
    method: ExemplarMethod
    metrics: Dict[str, Any]  # built once; periodic evaluations rebuild from the same (cached) backbones
    eval_ds: ExemplarDataset


class Hook:
    """One job of the training loop (logging, evaluation, ...), called after every step. Its state
    goes into the trial's checkpoints, so a resumed trial continues it (curves without a duplicate
    point, the best checkpoint so far)."""

    def after_step(self, t: Trial, step: int, losses: Dict[str, float], report: Dict[str, Any]) -> None:
        pass

    def state(self, directory: Path) -> Dict[str, Any]:
        """Plain data for the checkpoint file; large tensors go to files in ``directory``."""
        return {}

    def load_state(self, state: Dict[str, Any], directory: Path) -> None:
        pass


class LossLog(Hook):
    """Means of the losses over each ``train.log_every`` window, logged at the window's last step,
    with the speed; also what the progress line shows."""

    def __init__(self):
        self.window: Dict[str, List[float]] = {}
        self.t0, self.n = time.time(), 0

    def after_step(self, t, step, losses, report):
        for k, v in losses.items():
            self.window.setdefault(k, []).append(v)
        self.n += 1
        steps = t.cfg.train.steps
        if step % max(1, t.cfg.train.log_every) and step != steps:
            return
        means = {k: float(np.mean(v)) for k, v in self.window.items()}
        it_s = self.n / max(time.time() - self.t0, 1e-9)
        means.update(it_per_s=it_s, s_per_step=1.0 / max(it_s, 1e-9),
                     images_per_s=it_s * t.cfg.train.batch_size * t.shard.world)
        t.run.log_metrics(means, step)
        report.update(step=step, steps=steps, loss=_headline(means), it_per_s=it_s,
                      eta_s=(steps - step) / max(it_s, 1e-9), status="TRAINING")
        self.window, self.t0, self.n = {}, time.time(), 0


class PeriodicEvaluation(Hook):
    """``eval.every``: the trial's metrics every N steps, logged as ``eval/<metric>`` at their step
    (the curves), with the trial's random streams put back afterwards (training is the same with
    or without it). ``eval.select: best:<metric>`` keeps the weights, values and sample grid of the
    best evaluation; the final evaluation (at the last step) competes too."""

    BEST_FILE = "best_state.pt"

    def __init__(self, t: Trial):
        self.every = t.cfg.eval.every
        self.metric = t.cfg.eval.select[len("best:"):] if t.cfg.eval.select.startswith("best:") else None
        self.lower_better = True
        if self.metric:
            from bench.report.data import metric_info

            self.lower_better = metric_info(self.metric).better == "lower"
        self.best_step: Optional[int] = None
        self.best_values: Dict[str, float] = {}
        self.best_grid = None
        self._best_file = Path(tempfile.mkdtemp(prefix="bench_best_")) / self.BEST_FILE
        self.saved_dir: Optional[Path] = None  # the final evaluation's saved outputs (eval.save_outputs)

    def after_step(self, t, step, losses, report):
        if self.every and step % self.every == 0 and step < t.cfg.train.steps:
            values, grid = self.evaluate(t, step)
            self.consider(t, step, values, grid)

    def evaluate(self, t: Trial, step: int):
        """The metrics now, as ``eval/<metric>`` at ``step``; streams restored. The final evaluation
        (``step == train.steps``) uses the trial's metrics and keeps its saved outputs."""
        final, e = step == t.cfg.train.steps, t.cfg.eval
        scratch = writer = None
        if e.save_outputs != "none" and (final or e.score_from == "files"):
            from bench.outputs import OutputWriter

            scratch = Path(tempfile.mkdtemp(prefix="bench_outputs_"))
            writer = OutputWriter(scratch / "outputs", e.save_outputs, read_back=e.score_from == "files")
        streams = rng_state()
        try:
            metrics = t.metrics if final else build_trial_metrics(
                t.cfg, list(t.metrics), t.eval_ds, t.device, t.env)  # fresh accumulators, cached backbones
            values, grid = evaluate(t.method, eval_loader(t.eval_ds, t.cfg), metrics, t.device,
                                    t.cfg.eval.grid_samples, writer=writer)
        finally:
            set_rng_state(streams)
            if scratch is not None and not final:
                shutil.rmtree(scratch, ignore_errors=True)
        if final:
            self.saved_dir = scratch
        if self.every:
            t.run.log_metrics({f"eval/{k}": v for k, v in values.items()}, step)
        return values, grid

    def consider(self, t: Trial, step: int, values: Dict[str, float], grid) -> None:
        if self.metric is None or self.metric not in values:
            return
        v = values[self.metric]
        better = self.best_step is None or (v < self.best_values[self.metric] if self.lower_better
                                            else v > self.best_values[self.metric])
        if better:
            self.best_step, self.best_values, self.best_grid = step, dict(values), grid
            torch.save(t.method.training_state(), self._best_file)

    def restore_best(self, t: Trial) -> bool:
        """Load the best weights into the method when they are not the final ones."""
        if self.best_step is None or self.best_step == t.cfg.train.steps:
            return False
        t.method.load_training_state(torch.load(self._best_file, map_location="cpu", weights_only=True))
        return True

    def state(self, directory: Path) -> Dict[str, Any]:
        if self.best_step is None:
            return {}
        shutil.copyfile(self._best_file, directory / self.BEST_FILE)
        grid = None
        if self.best_grid is not None:
            batch, out = self.best_grid
            grid = {"batch": batch, "output": out.output, "warps": out.warps}
        return {"best_step": self.best_step, "best_values": self.best_values, "best_grid": grid}

    def load_state(self, state: Dict[str, Any], directory: Path) -> None:
        if state.get("best_step") is None or not (directory / self.BEST_FILE).is_file():
            return
        self.best_step, self.best_values = int(state["best_step"]), dict(state["best_values"])
        shutil.copyfile(directory / self.BEST_FILE, self._best_file)
        g = state.get("best_grid")
        self.best_grid = (g["batch"], MethodOutput(g["output"], g["warps"])) if g else None


def train_loop(t: Trial, train_ds, start: int, hooks: List[Hook], use_amp: bool) -> None:
    """Steps ``start..steps``: a train step, the hooks, and at report points one report to the
    runner (with a checkpoint every ``train.checkpoint_every`` steps and at the end)."""
    cfg, steps = t.cfg, t.cfg.train.steps
    if train_ds is None:
        return
    # The loader gets its own generator: creating an iterator draws a base seed from it, and from the
    # global RNG without one -- a draw the uninterrupted run makes at step 0 and a resumed run would
    # make at its start step, shifting every random number after it (exact resume would break).
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=StepBatchSampler(len(train_ds), cfg.train.batch_size, cfg.seed, start, steps, t.shard),
        num_workers=cfg.train.num_workers, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + start))
    step = start
    for batch in loader:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            losses = t.method.train_step(_to(batch, t.device), step)
        step += 1
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        if bad:
            t.run.log_metrics({k: v for k, v in losses.items() if math.isfinite(v)}, step)
            raise Diverged(f"non-finite loss {', '.join(bad)} at step {step}")
        report: Dict[str, Any] = {}
        for h in hooks:
            h.after_step(t, step, losses, report)
        if not report:  # reports happen at the log points, the same on every data-parallel rank
            continue
        checkpoint = None
        every = cfg.train.checkpoint_every
        if ((every and step % every == 0) or step == steps) and t.shard.is_main:
            checkpoint = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
            _save_state(checkpoint / CHECKPOINT_FILE, t.method, step,
                        {type(h).__name__: h.state(checkpoint) for h in hooks})
        t.reporter.report(report, checkpoint)
        if checkpoint is not None:
            shutil.rmtree(checkpoint, ignore_errors=True)


def finish_trial(t: Trial, periodic: PeriodicEvaluation, t_start: float) -> Dict[str, Any]:
    """The final evaluation; with ``eval.select: best:<m>`` the best evaluation's weights, values and
    grid when they beat it. Logs the metrics at the last step, the grid, the kept checkpoint."""
    cfg, run, steps = t.cfg, t.run, t.cfg.train.steps
    t_eval = time.time()
    values, grid = periodic.evaluate(t, steps)
    periodic.consider(t, steps, values, grid)
    params: Dict[str, Any] = {}
    if periodic.restore_best(t):
        values, grid = dict(periodic.best_values), periodic.best_grid
    if periodic.metric:
        params["eval.best_step"] = periodic.best_step if periodic.best_step is not None else steps
        t.line(f"[{cfg.name}] kept the weights of step {params['eval.best_step']} ({cfg.eval.select})")
    values["eval_seconds"] = time.time() - t_eval
    values["train_seconds"] = t_eval - t_start
    values.update(peak_memory_mb(t.device))
    run.log_metrics(values, steps)
    collapse = collapse_warnings(values)
    if collapse:
        run.set_tags({"bench.warning": "; ".join(collapse)})
        t.line(f"[{cfg.name}] warning: {'; '.join(collapse)}")
    settings = {f"metric.{n}.{k}": v for n, m in t.metrics.items() for k, v in m.settings.items()}
    settings["eval.scored_from"] = cfg.eval.score_from
    settings["eval.outputs_format"] = cfg.eval.save_outputs
    run.log_params({**settings, **params})
    with tempfile.TemporaryDirectory() as d:
        if grid is not None:
            run.log_artifact(save_grid(grid_rows(*grid), Path(d) / "samples" / "grid.png"), "samples")
        if steps > 0:  # an evaluation-only trial's weights are its init_from checkpoint (tagged)
            ckpt = Path(d) / "checkpoint.pt"
            _save_state(ckpt, t.method, params.get("eval.best_step", steps))
            run.log_artifact(ckpt, "checkpoints")
    saved = periodic.saved_dir
    if saved is not None:
        run.log_artifacts(saved / "outputs", "outputs")
        shutil.rmtree(saved, ignore_errors=True)
    run.finish("FINISHED")
    elapsed = time.time() - t_start
    t.reporter.report({"status": "FINISHED", "step": steps, "steps": steps, "wall_s": elapsed,
                       **{f"final/{k}": v for k, v in values.items()}})
    return {"status": "FINISHED", "metrics": values, "run_id": run.run_id, "wall_s": elapsed}


def _headline(means: Dict[str, float]) -> float:
    for k in ("G_total", "loss", "total"):
        if k in means:
            return means[k]
    vals = [v for k, v in means.items() if k not in ("it_per_s", "s_per_step", "images_per_s")]
    return float(sum(vals)) if vals else float("nan")

