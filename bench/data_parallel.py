"""Data-parallel arithmetic on an initialised ``torch.distributed`` process group, for one trial's
workers: which slice of each global batch a worker takes (``Shard``), one starting point
(``broadcast_state``) and gradients averaged before every optimiser step. No Ray and no trial
logic here: ``bench.trial`` uses these, and ``bench.distributed`` launches the workers that run it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def broadcast_state(module: torch.nn.Module) -> None:
    """Start every worker from rank 0's parameters and buffers."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def average_gradients_before_step(method, world: int) -> None:
    """Wrap each optimiser's ``step`` to all-reduce (mean) its parameters' gradients first."""
    for opt in method.optimizers().values():
        original = opt.step

        def step(*args, _opt=opt, _original=original, **kwargs):
            params = [p for g in _opt.param_groups for p in g["params"]]
            for p in params:
                if p.grad is None:  # keep every worker's all-reduce sequence identical
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
                offset += n
            return _original(*args, **kwargs)

        opt.step = step
