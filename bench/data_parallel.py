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


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch across the process group,
    on any backend: per-channel sums are all-reduced with ``torch.distributed.nn`` (which carries
    autograd, so the gradients through the statistics are global too). What
    ``torch.nn.SyncBatchNorm`` does on CUDA; it refuses CPU tensors ("expected input tensor to be on
    GPU"), so gloo (CPU) trials use this. Evaluation uses the running statistics, as BatchNorm does."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        n_local = x.numel() // x.shape[1]
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([float(n_local)])])
        stats = all_reduce(stats)  # sum over workers, differentiable
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean  # biased: what normalises (as BatchNorm)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def synchronize_batchnorm(module: torch.nn.Module, device: torch.device) -> int:
    """Make every BatchNorm of ``module`` use global-batch statistics across the process group
    (``train.sync_bn``): ``torch.nn.SyncBatchNorm`` on CUDA, ``GlobalBatchNorm`` elsewhere.
    Parameters, buffers and settings are kept. Returns how many were replaced."""
    count = 0

    def convert(m: torch.nn.Module) -> torch.nn.Module:
        nonlocal count
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
                m, (torch.nn.SyncBatchNorm, GlobalBatchNorm)):
            cls = torch.nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
            new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            new.load_state_dict(m.state_dict())
            if m.affine:  # the same Parameter objects: the method's optimisers already hold them
                new.weight, new.bias = m.weight, m.bias
            new.train(m.training)
            count += 1
            return new.to(next(iter(m.buffers()), torch.empty(0)).device)
        for name, child in m.named_children():
            setattr(m, name, convert(child))
        return m

    convert(module)
    return count
