"""MIDMs' DDIM steps as the official ``models/diffusion/ddim.py`` takes them (LDM's DDIMSampler).

MIDMs does not run a sampler loop: it calls ``one_step_sample`` once per interleaved step and
chain, and after the last one (at inference) a 200-step stochastic sampler from ``hijack_step``
180. Both are here, on the official float32 tables of ``schedule.py`` (``LDMSchedule`` for
``q_sample``, ``DDIMTables`` for the steps):

* a *position* ``k`` indexes ``time_range`` (the DDIM timesteps, descending); the step at ``k``
  evaluates the UNet at ``time_range[k]`` with the coefficients of ``index = len - k - 1`` and
  goes to ``alphas_prev[index]`` (the next timestep);
* the first step of a chain noises its start ``x0`` with ``q_sample`` at ``time_range[k - 1]``,
  one grid step *above* the step it evaluates (official quirk: with the "16-step" grid, which has
  17 entries because 1000 // 16 = 62, the warp is noised at t = 311 and denoised at 249, 187, 125,
  63; ``noise_above=False`` noises at ``time_range[k]``, the paper's Eq. 7); later steps start from ``sqrt(a_prev) * x0 + dir_xt`` of the previous step, with ``x0``
  the (possibly re-matched) estimate -- Eq. 11 of the paper;
* eta = 0 steps draw no noise (official: a draw multiplied by sigma = 0); eta > 0 steps do.

Values: the table entries are float32 (official buffers); the per-step coefficients are formed in
the latent's dtype from them (``DDIMTables.coefficients``), as the official ``torch.full(...,
alphas[index])`` does in the default dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from methods.midms.schedule import DDIMTables, LDMSchedule

# eps_fn(x, t) -> the UNet's noise prediction; t is a (B,) long tensor.
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# noise_fn(like) -> standard normal noise shaped like ``like`` (one call per draw that matters).
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


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


def ddim_step(eps_fn: EpsFn, tables: DDIMTables, x: torch.Tensor, position: int,
              noise_fn: Optional[NoiseFn] = None) -> Step:
    """``p_sample_ddim`` at ``position``: x0 estimate, direction to x_t, and x_prev."""
    index = tables.index(position)
    t = int(tables.time_range[position])
    eps = eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    c = tables.coefficients(index, x)
    pred_x0 = (x - c.sqrt_one_minus_at * eps) / c.a_t.sqrt()
    dir_xt = (1.0 - c.a_prev - c.sigma_t ** 2).sqrt() * eps
    x_prev = c.a_prev.sqrt() * pred_x0 + dir_xt
    if float(tables.ddim_sigmas[index]) != 0.0:
        if noise_fn is None:
            raise ValueError("midms: a stochastic DDIM step (eta > 0) needs a noise source")
        x_prev = x_prev + c.sigma_t * noise_fn(x)
    return Step(x=x, t=t, eps=eps, x_prev=x_prev, pred_x0=pred_x0, carry=Carry(c.a_prev.sqrt(), dir_xt))


def _noised(q: LDMSchedule, tables: DDIMTables, x0: torch.Tensor, position: int, noise_fn: NoiseFn,
            above: bool) -> torch.Tensor:
    """``x0`` noised for a chain whose first step is at ``position``: official ``time_range[position
    - 1]`` (one grid step above, ``above``) or the paper's ``time_range[position]`` (Eq. 7)."""
    if above and position < 1:
        raise ValueError("midms: a chain's first step needs position >= 1 (it is noised one step above)")
    return q.q_sample(x0, int(tables.time_range[position - 1 if above else position]), noise_fn(x0))


def one_step_sample(eps_fn: EpsFn, q: LDMSchedule, tables: DDIMTables, x0: torch.Tensor, position: int,
                    carry: Optional[Carry], noise_fn: NoiseFn, noise_above: bool = True) -> Step:
    """``DDIMSampler.one_step_sample``: start from ``x0`` -- noised (``_noised``) when the chain has
    no ``carry`` yet, else ``carry.sqrt_a_prev * x0 + carry.dir_xt`` -- and take the step at
    ``position``."""
    if carry is None:
        x = _noised(q, tables, x0, position, noise_fn, noise_above)
    else:
        x = carry.sqrt_a_prev * x0 + carry.dir_xt
    return ddim_step(eps_fn, tables, x, position, noise_fn)


def sample_from(eps_fn: EpsFn, q: LDMSchedule, tables: DDIMTables, x0: torch.Tensor, start: int,
                noise_fn: NoiseFn, steps: Optional[List[Step]] = None, noise_above: bool = True) -> torch.Tensor:
    """``DDIMSampler.sample`` with ``hijack_feat=x0, hijack_step=start``: noise ``x0`` (``_noised``),
    run every step from ``start`` to the end, return the last x0 estimate (official: ``img =
    pred_x0``). MIDMs' inference refinement: 200 steps, eta 1, start 180 -> noised at t = 101,
    steps 96 ... 1."""
    x = _noised(q, tables, x0, start, noise_fn, noise_above)
    pred_x0 = x0
    for position in range(start, tables.total_steps):
        step = ddim_step(eps_fn, tables, x, position, noise_fn)
        x, pred_x0 = step.x_prev, step.pred_x0
        if steps is not None:
            steps.append(step)
    return pred_x0

