"""Data-parallel training inside one trial: Ray Train ``TorchTrainer`` workers (DDP semantics).

``resources.workers: N`` runs a trial's training on N workers (``resources.cpu``/``gpu`` each),
launched from inside the Tune trial (the Ray Train V2 pattern, reference/harness.md C.1).

* Data: step ``s`` has one global batch of ``batch_size x N`` samples (``bench.trial.batch_indices``);
  rank ``r`` trains on its ``r``-th slice, so the union over workers is what one worker with the
  N-times batch would see. ``train.batch_size`` is per worker; the effective batch is recorded.
* Gradients: before every optimiser step the gradients of that optimiser's parameters are averaged
  over workers (an all-reduce per step, DDP's arithmetic without its bucketing/overlap). Methods
  keep their own ``train_step``; they only need to step their optimisers through ``optimizers()``.
  With mean-reduced losses, N workers x batch B then equal 1 worker x batch N*B up to float
  summation order (BatchNorm statistics stay per worker, as in plain DDP).
* Learning rate: ``train.lr_scaling: linear`` multiplies the learning rates by N (Goyal et al.);
  ``none`` keeps them.
* Only rank 0 logs to MLflow, writes checkpoints and evaluates; every rank reports to Ray Train at
  the same points (a report is a collective).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from bench.data_parallel import Shard
from bench.trial import TrialEnv, copy_checkpoint_out, run_trial


class TrainReporter:
    """The trial's reporter on a Ray Train worker: ``ray.train.report`` on every rank, checkpoints
    from rank 0 only; resumes from the Train run's latest checkpoint (same name + storage path)."""

    def __init__(self, shard: Shard):
        self.shard = shard

    def restore_dir(self) -> Optional[Path]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return copy_checkpoint_out(ckpt) if ckpt is not None else None

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[Path] = None) -> None:
        import ray.train

        ckpt = None
        if checkpoint_dir is not None and self.shard.is_main:
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(dict(metrics), checkpoint=ckpt)


def _worker_loop(config: Dict[str, Any]) -> None:
    import ray.train

    from bench.plugins import load_plugins
    from bench.sweep import TrialConfig

    load_plugins()
    ctx = ray.train.get_context()
    shard = Shard(ctx.get_world_rank(), ctx.get_world_size())
    cfg = TrialConfig.from_dict(config["trial"])
    line = (lambda s: print(s, flush=True)) if shard.is_main else (lambda s: None)
    run_trial(cfg, TrialEnv(**config["env"]), TrainReporter(shard), line=line, shard=shard)


def launch_data_parallel(config: Dict[str, Any], storage_path: str) -> None:
    """From inside a Tune trial: run the trial on ``resources.workers`` Ray Train workers."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = config["trial"]["resources"]
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=res["workers"], use_gpu=res["gpu"] > 0,
            resources_per_worker={"CPU": res["cpu"], **({"GPU": res["gpu"]} if res["gpu"] > 0 else {})}),
        # Same name on a retry or --resume: Ray Train restores its latest checkpoint.
        run_config=ray.train.RunConfig(name=f"ddp-{config['trial_key']}", storage_path=storage_path,
                                       callbacks=[TuneReportCallback()],
                                       failure_config=ray.train.FailureConfig(max_failures=0)))
    trainer.fit()
