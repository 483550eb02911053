"""MIDMs' DDIM steps as the official ``models/diffusion/ddim.py`` takes them (LDM's DDIMSampler).

MIDMs does not run a sampler loop: it calls ``one_step_sample`` once per interleaved step and
chain, and after the last one (at inference) a 200-step stochastic sampler from ``hijack_step``
180. Both are here, on the official float32 tables (``DDIMTables``, ``QSchedule``):

* a *position* ``k`` indexes ``time_range`` (the DDIM timesteps, descending); the step at ``k``
  evaluates the UNet at ``time_range[k]`` with the coefficients of ``index = len - k - 1`` and
  goes to ``alphas_prev[index]`` (the next timestep);
* the first step of a chain noises its start ``x0`` with ``q_sample`` at ``time_range[k - 1]``,
  one grid step *above* the step it evaluates (official quirk: with the "16-step" grid, which has
  17 entries because 1000 // 16 = 62, the warp is noised at t = 311 and denoised at 249, 187, 125,
  63); later steps start from ``sqrt(a_prev) * x0 + dir_xt`` of the previous step, with ``x0``
  the (possibly re-matched) estimate -- Eq. 11 of the paper;
* eta = 0 steps draw no noise (official: a draw multiplied by sigma = 0); eta > 0 steps do.

Values: the table entries are float32 (official buffers); the per-step coefficients are formed in
the latent's dtype from them, as the official ``torch.full(..., alphas[index])`` does in the
default dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

# eps_fn(x, t) -> the UNet's noise prediction; t is a (B,) long tensor.
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# noise_fn(like) -> standard normal noise shaped like ``like`` (one call per draw that matters).
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class QSchedule:
    """LDM's ``q_sample`` buffers (float32), one entry per training timestep."""

    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor

    def q_sample(self, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        a = self.sqrt_alphas_cumprod[t].to(x0.device, x0.dtype)
        s = self.sqrt_one_minus_alphas_cumprod[t].to(x0.device, x0.dtype)
        return a * x0 + s * noise


@dataclass
class DDIMTables:
    """``DDIMSampler.make_schedule`` for one number of steps and eta (float32 buffers)."""

    timesteps: torch.Tensor  # ddim_timesteps, ascending (long)
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def t_at(self, position: int) -> int:
        """``time_range[position]`` (time_range = the timesteps descending)."""
        return int(self.timesteps[len(self) - 1 - position])


@dataclass
class Carry:
    """What the next step of a chain starts from: ``sqrt_a_prev * x0 + dir_xt`` (official ``ddim_param``)."""

    sqrt_a_prev: torch.Tensor
    dir_xt: torch.Tensor


@dataclass
class Step:
    x: torch.Tensor  # the UNet input
    t: int
    eps: torch.Tensor
    x_prev: torch.Tensor
    pred_x0: torch.Tensor
    carry: Carry


def _full(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0], 1, 1, 1), float(value), dtype=x.dtype, device=x.device)


def ddim_step(eps_fn: EpsFn, tables: DDIMTables, x: torch.Tensor, position: int,
              noise_fn: Optional[NoiseFn] = None) -> Step:
    """``p_sample_ddim`` at ``position``: x0 estimate, direction to x_t, and x_prev."""
    index = len(tables) - position - 1
    t = tables.t_at(position)
    eps = eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    a_t, a_prev = _full(x, tables.alphas[index]), _full(x, tables.alphas_prev[index])
    sigma = _full(x, tables.sigmas[index])
    sqrt_one_minus_at = _full(x, tables.sqrt_one_minus_alphas[index])
    pred_x0 = (x - sqrt_one_minus_at * eps) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma ** 2).sqrt() * eps
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if float(tables.sigmas[index]) != 0.0:
        if noise_fn is None:
            raise ValueError("midms: a stochastic DDIM step (eta > 0) needs a noise source")
        x_prev = x_prev + sigma * noise_fn(x)
    return Step(x=x, t=t, eps=eps, x_prev=x_prev, pred_x0=pred_x0, carry=Carry(a_prev.sqrt(), dir_xt))


def one_step_sample(eps_fn: EpsFn, q: QSchedule, tables: DDIMTables, x0: torch.Tensor, position: int,
                    carry: Optional[Carry], noise_fn: NoiseFn) -> Step:
    """``DDIMSampler.one_step_sample``: start from ``x0`` -- noised at ``time_range[position - 1]``
    when the chain has no ``carry`` yet, else ``carry.sqrt_a_prev * x0 + carry.dir_xt`` -- and take
    the step at ``position``."""
    if carry is None:
        if position < 1:
            raise ValueError("midms: a chain's first step needs position >= 1 (it is noised one step above)")
        x = q.q_sample(x0, tables.t_at(position - 1), noise_fn(x0))
    else:
        x = carry.sqrt_a_prev * x0 + carry.dir_xt
    return ddim_step(eps_fn, tables, x, position, noise_fn)


def sample_from(eps_fn: EpsFn, q: QSchedule, tables: DDIMTables, x0: torch.Tensor, start: int,
                noise_fn: NoiseFn, steps: Optional[List[Step]] = None) -> torch.Tensor:
    """``DDIMSampler.sample`` with ``hijack_feat=x0, hijack_step=start``: noise ``x0`` at
    ``time_range[start - 1]``, run every step from ``start`` to the end, return the last x0
    estimate (official: ``img = pred_x0``). MIDMs' inference refinement: 200 steps, eta 1, start
    180 -> noised at t = 101, steps 96 ... 1."""
    x = q.q_sample(x0, tables.t_at(start - 1), noise_fn(x0))
    pred_x0 = x0
    for position in range(start, len(tables)):
        step = ddim_step(eps_fn, tables, x, position, noise_fn)
        x, pred_x0 = step.x_prev, step.pred_x0
        if steps is not None:
            steps.append(step)
    return pred_x0


# ---- TEMPORARY: the official tables, until the midms-ldm branch's methods/midms/schedule.py lands ----
def ldm_schedule(beta_start: float, beta_end: float, num_timesteps: int):
    """LDM ``register_schedule('linear')``: betas = linspace(sqrt(start), sqrt(end))^2 in float64,
    buffers cast to float32. Returns (QSchedule, float32 alphas_cumprod)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64, device="cpu") ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    return QSchedule(ac.sqrt().float(), (1.0 - ac).sqrt().float()), ac.float()


def ddim_tables(alphas_cumprod: torch.Tensor, num_steps: int, eta: float) -> DDIMTables:
    """``DDIMSampler.make_schedule(num_steps, 'uniform', eta)`` on float32 ``alphas_cumprod``; the
    square roots are numpy's, as official (torch's CPU sqrt can differ from it by an ulp)."""
    total = alphas_cumprod.shape[0]
    ts = torch.arange(0, total, total // num_steps, device="cpu") + 1
    alphas = alphas_cumprod[ts]
    prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ts[:-1]]]).double()
    # official (1 - prev) / (1 - alphas): numpy / tensor is torch's __rtruediv__, a float32 reciprocal times
    ratio = ((1 - alphas).reciprocal().double() * (1 - prev) * (1 - alphas.double() / prev)).numpy()
    sigmas = torch.from_numpy(eta * np.sqrt(ratio)).float()
    return DDIMTables(ts, alphas, prev.float(), sigmas, torch.from_numpy(np.sqrt((1.0 - alphas).numpy())))
