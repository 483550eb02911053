"""Synchronized BatchNorm for data-parallel trials on gloo (CPU): SPADE trained by 2 workers x batch
2 with train.sync_bn equals 1 worker x batch 4, and differs without it (per-worker statistics)."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.data_parallel import GlobalBatchNorm, average_gradients_before_step, broadcast_state, synchronize_batchnorm
from bench.sweep import expand, load_sweep
from bench.trial import batch_indices, build_method, make_dataset, seed_everything

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, STEPS = 4, 3
# Plain SPADE (the released ADE20K generator's configuration): its VAE mode draws z per sample, and
# the draws of 4 samples in one process differ from 2 + 2 in two, which would hide what is tested.
EXTRA: list = ["methods=[{name: spade, options: {use_vae: false}}]"]


def _trial():
    spec = load_sweep(str(REPO / "sweeps" / "quickstart.yaml"),
                      ["scale.resolution=32", "scale.width=0.0625", f"train.batch_size={GLOBAL_BATCH}", *EXTRA])
    return expand(spec)[0]  # SPADE's generator normalises with (param-free) BatchNorm


def _train(rank: int, world: int, sync: bool, out: str, port: int) -> None:
    torch.set_default_dtype(torch.float64)  # summation order is then far below the tolerance
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = _trial()
        seed_everything(cfg.seed)
        ds = make_dataset(cfg, "train")
        method = build_method(cfg, ds.info, torch.device("cpu"))
        if world > 1:
            if sync:
                assert synchronize_batchnorm(method, torch.device("cpu")) > 0
            broadcast_state(method)
            average_gradients_before_step(method, world)
        per = GLOBAL_BATCH // world
        method.train()
        for step in range(STEPS):
            idx = batch_indices(len(ds), GLOBAL_BATCH, cfg.seed, step)[rank * per:(rank + 1) * per]
            batch = torch.utils.data.default_collate([ds[i] for i in idx])
            batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
            method.train_step(batch, step)
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in method.state_dict().items()}, out)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, world: int, sync: bool):
    out = str(tmp_path / f"w{world}_{sync}.pt")
    if world == 1:
        mp.spawn(_train, args=(1, sync, out, 0), nprocs=1, join=True)
    else:
        mp.spawn(_train, args=(world, sync, out, _free_port()), nprocs=world, join=True)
    return torch.load(out, weights_only=True)


def _outputs(state) -> torch.Tensor:
    """The trained generator's images for a fixed global batch, BatchNorm on that batch's statistics.

    Outputs, not parameters, are compared: a conv bias right before a BatchNorm (or SPADE's
    discriminator's InstanceNorm) has an exactly zero gradient, so its computed gradient is rounding
    noise, and Adam's first steps turn noise into +-lr updates of a random sign. Those biases change
    nothing the normalisation lets through, so the outputs are where "the same training" shows."""
    torch.set_default_dtype(torch.float64)
    try:
        cfg = _trial()
        ds = make_dataset(cfg, "train")
        method = build_method(cfg, ds.info, torch.device("cpu"))
        method.load_state_dict(state)
        batch = torch.utils.data.default_collate([ds[i] for i in batch_indices(len(ds), GLOBAL_BATCH, 1, STEPS)])
        method.train()
        with torch.no_grad():
            return method.generator(batch["cond"].double(), None)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.timeout(600)
def test_two_workers_with_sync_bn_equal_one_worker_with_the_whole_batch(tmp_path):
    one = _outputs(_run(tmp_path, 1, False))
    synced = _outputs(_run(tmp_path, 2, True))
    plain = _outputs(_run(tmp_path, 2, False))
    d_sync, d_plain = float((one - synced).abs().max()), float((one - plain).abs().max())
    assert d_sync < 1e-5, d_sync
    assert d_plain > 1e-3, d_plain  # per-worker statistics train a different model


def test_global_batchnorm_matches_batchnorm_on_one_process():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.BatchNorm2d(3).double()
    ours = GlobalBatchNorm(3).double()
    ours.load_state_dict(ref.state_dict())
    # Without a process group it is BatchNorm itself; the all-reduce path is covered by the test above.
    y1, y2 = ref(x), ours(x)
    assert torch.allclose(y1, y2) and torch.allclose(ref.running_var, ours.running_var)
