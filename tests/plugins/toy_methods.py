"""A tiny real method for harness tests, registered as ``toy`` through BENCH_PLUGINS.

It learns a 2-layer conv net from (condition, exemplar) to the photo with an L1 loss, fast
enough for many trials per test. Switches make it fail or diverge at a chosen step, so the
harness's handling of both can be tested through the same code paths real methods use.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import ExemplarMethod, MethodOutput
from methods.registry import METHODS


@dataclass
class ToyOptions:
    width: int = 8  # hidden channels
    fail_at_step: int = -1  # raise RuntimeError at this step (-1: never)
    nan_at_step: int = -1  # return a NaN loss from this step on (-1: never)
    quality: float = 1.0  # scales the learned output towards grey: < 1 is a deliberately worse variant
    step_seconds: float = 0.0  # sleep per step, so a test can interrupt a trial mid-way
    kill_once_at_step: int = -1  # the worker process dies (os._exit) at this step, once ...
    kill_marker: str = ""  # ... as recorded by creating this file
    input_noise: float = 0.0  # Gaussian noise on the exemplar in training, drawn from torch's global RNG (as GANs/VAEs do)
    copy_exemplar: bool = False  # generate returns the exemplar itself: a collapsed model


@METHODS.register("toy")
class ToyMethod(ExemplarMethod):
    Options = ToyOptions

    def __init__(self, options: ToyOptions, ctx):
        super().__init__(options, ctx)
        c = ctx.data.cond_channels + 3
        self.net = nn.Sequential(nn.Conv2d(c, options.width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(options.width, 3, 3, padding=1))
        self.to(ctx.device)
        self.opt = torch.optim.Adam(self.parameters(), lr=ctx.official_optim(lr_g=1e-4)["lr_g"] * 10)

    def optimizers(self):
        return {"g": self.opt}

    def _forward(self, batch):
        return torch.tanh(self.net(torch.cat([batch["cond"], batch["exemplar"]], dim=1))) * self.options.quality

    def train_step(self, batch, step):
        if self.options.step_seconds:
            time.sleep(self.options.step_seconds)
        o = self.options
        if step == o.kill_once_at_step and o.kill_marker and not os.path.exists(o.kill_marker):
            open(o.kill_marker, "w").close()
            os._exit(1)  # a hard crash: no exception handling, no MLflow status update
        if step == self.options.fail_at_step:
            raise RuntimeError(f"toy failure at step {step}")
        if o.input_noise:
            batch = dict(batch, exemplar=batch["exemplar"] + o.input_noise * torch.randn_like(batch["exemplar"]))
        loss = F.l1_loss(self._forward(batch), batch["image"])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        value = float(loss.detach())
        if 0 <= self.options.nan_at_step <= step:
            value = float("nan")
        return {"l1_loss": value}

    @torch.no_grad()
    def generate(self, batch):
        if self.options.copy_exemplar:
            return MethodOutput(output=batch["exemplar"].clone())
        return MethodOutput(output=self._forward(batch))
