"""LDM's noise schedule and the DDIM tables of LDM's ``DDIMSampler``, exactly as MIDMs uses them,
and the timesteps MIDMs' interleaved loop and its final sampler visit.

The schedule is diffusers' ``DDIMScheduler`` wherever its math is LDM's, with LDM's quirks on top:

- betas: LDM's ``'linear'`` schedule is ``linspace(sqrt(start), sqrt(end))**2`` -- diffusers'
  ``scaled_linear`` -- but computed in float64 and stored as float32; the cumulative product is
  taken in float64 before the cast (``register_schedule``). diffusers takes it in float32 (2.7e-7
  apart at t = 999 for celebahq-ldm-vq-4), so the scheduler gets LDM's table (``ldm_scheduler``).
- DDIM timesteps (``make_ddim_timesteps('uniform')``): ``range(0, T, T // S) + 1`` -- diffusers'
  ``leading`` spacing with ``steps_offset`` 1 -- plus the entries the integer stride leaves before
  T: with S = 16, c = 62 gives 17 entries (1 ... 993). MIDMs indexes this 17-entry table.
- DDIM tables (``DDIMSampler.make_schedule``): float32 buffers; sigma is computed (mostly) in
  float64 from the float32 alphas and rounded to float32; ``sqrt(1 - a_t)`` is computed in float32.
- Square roots are numpy's, as in LDM (``np.sqrt``): they are correctly rounded, torch's vectorised
  CPU sqrt is not always (1 ulp off for ~20 % of float32 and ~1.4 % of float64 inputs on an AVX2
  build), which moves the stored float32 tables by one ulp (6e-8) in places.

The DDIM update itself is LDM's ``p_sample_ddim`` on these tables (``DDIMTables.coefficients``
gives its four per-step numbers in the sample's dtype: LDM takes sqrt(a_t) and sqrt(a_prev) in the
sample's dtype, of the float32 table values). ``DDIMScheduler.step`` takes them in float32 and
computes sigma in float32, ~1e-8 (relative) apart: too far for the float64 parity fixtures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DDIMScheduler

# MIDMs' own sampling constants (models/midms.py): the interleaved one-step sampler runs on a
# 16-step eta-0 grid (inference: ddim_num_steps 16; training: diffusion_iteratiom_num 4 x 4); at
# inference the result is then re-noised and finished by a 200-step eta-1 sampler from hijack_step 180.
INTERLEAVED_DDIM_STEPS = 16
FINAL_SAMPLER_STEPS = 200
FINAL_SAMPLER_ETA = 1.0
FINAL_SAMPLER_HIJACK_STEP = 180

# LDM DDPM's defaults (ldm/models/diffusion/ddpm.py) for keys a config leaves out.
LDM_DEFAULTS = {"timesteps": 1000, "beta_schedule": "linear", "linear_start": 1e-4, "linear_end": 2e-2,
                "cosine_s": 8e-3}


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root in ``t``'s dtype (numpy's, what LDM calls; see the docstring)."""
    return torch.from_numpy(np.sqrt(t.detach().cpu().numpy())).to(t.device)


def ldm_betas(beta_schedule: str, timesteps: int, linear_start: float, linear_end: float,
              cosine_s: float = 8e-3) -> torch.Tensor:
    """LDM's ``make_beta_schedule`` in float64."""
    if beta_schedule == "linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    if beta_schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if beta_schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64) ** 0.5
    raise ValueError(f"LDM beta_schedule {beta_schedule!r}: expected linear, cosine, sqrt_linear or sqrt")


@dataclass(frozen=True)
class LDMSchedule:
    """``LatentDiffusion.register_schedule``'s buffers (float32, as LDM stores them)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "LDMSchedule":
        betas = betas.to(torch.float64)
        ac = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        f32 = lambda t: t.to(torch.float32)  # noqa: E731 - LDM's to_torch
        return cls(betas=f32(betas), alphas_cumprod=f32(ac), alphas_cumprod_prev=f32(prev),
                   sqrt_alphas_cumprod=f32(_sqrt(ac)), sqrt_one_minus_alphas_cumprod=f32(_sqrt(1.0 - ac)))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def q_sample(self, x0: torch.Tensor, t: Union[int, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        """LDM's ``q_sample``: sqrt(a_t) x0 + sqrt(1 - a_t) noise with its float32 square roots
        (promoted to ``x0``'s dtype, as LDM's float32 buffers times a float64 tensor are); ``t`` one
        timestep for the batch or one per sample."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        t = torch.as_tensor(t, dtype=torch.long).to(self.betas.device).reshape(-1)
        a = self.sqrt_alphas_cumprod[t].to(x0).reshape(shape)
        s = self.sqrt_one_minus_alphas_cumprod[t].to(x0).reshape(shape)
        return a * x0 + s * noise


def ldm_schedule(config: Mapping) -> LDMSchedule:
    """The schedule of an LDM config's ``model.params`` (``timesteps``, ``beta_schedule``,
    ``linear_start``, ``linear_end``, ``cosine_s``; LDM's defaults for missing keys)."""
    c = {**LDM_DEFAULTS, **{k: config[k] for k in LDM_DEFAULTS if k in config}}
    if config.get("given_betas") is not None:
        return LDMSchedule.from_betas(torch.as_tensor(config["given_betas"], dtype=torch.float64))
    return LDMSchedule.from_betas(ldm_betas(c["beta_schedule"], int(c["timesteps"]), float(c["linear_start"]),
                                            float(c["linear_end"]), float(c["cosine_s"])))


def ldm_scheduler(schedule: LDMSchedule, **config) -> DDIMScheduler:
    """A diffusers ``DDIMScheduler`` with LDM's schedule: its betas, and LDM's float64-accumulated
    ``alphas_cumprod`` in place of diffusers' float32 one. ``config`` adds sampling settings
    (timestep_spacing, set_alpha_to_one, ...); LDM's DDIM grid is ``leading`` + ``steps_offset`` 1."""
    sched = DDIMScheduler(**{"num_train_timesteps": schedule.num_train_timesteps,
                             "trained_betas": schedule.betas.to(torch.float64).numpy(), "clip_sample": False,
                             "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1, **config})
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()
    sched.final_alpha_cumprod = (torch.tensor(1.0) if sched.config.set_alpha_to_one
                                 else sched.alphas_cumprod[0])
    return sched


def ddim_timesteps(num_train_timesteps: int, num_steps: int, discretize: str = "uniform") -> torch.Tensor:
    """LDM's ``make_ddim_timesteps('uniform')`` (ascending, int64): diffusers' leading grid with
    steps_offset 1, plus the entries a stride of T // S leaves below T (quirk: 17 for S = 16)."""
    if discretize == "uniform":
        c = num_train_timesteps // num_steps
        sched = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing="leading", steps_offset=1)
        sched.set_timesteps(num_steps)
        grid = sched.timesteps.flip(0)
        extra = torch.arange(c * num_steps, num_train_timesteps, c, dtype=grid.dtype) + 1
        return torch.cat([grid, extra]).to(torch.int64)
    raise ValueError(f"ddim_discretize {discretize!r}: only LDM's 'uniform' (MIDMs' choice) is supported")


@dataclass(frozen=True)
class DDIMCoefficients:
    """The four numbers of one LDM ``p_sample_ddim`` step, in the sample's dtype:
    ``pred_x0 = (x - sqrt_one_minus_at * eps) / a_t.sqrt()``,
    ``dir_xt = (1 - a_prev - sigma_t**2).sqrt() * eps``,
    ``x_prev = a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * noise``."""

    a_t: torch.Tensor
    a_prev: torch.Tensor
    sigma_t: torch.Tensor
    sqrt_one_minus_at: torch.Tensor


@dataclass(frozen=True)
class DDIMTables:
    """``DDIMSampler.make_schedule``'s tables (float32; index i = ``ddim_timesteps[i]``) and the
    descending ``time_range`` the sampler walks (``np.flip(ddim_timesteps)``)."""

    ddim_timesteps: torch.Tensor
    ddim_alphas: torch.Tensor
    ddim_alphas_prev: torch.Tensor
    ddim_sigmas: torch.Tensor
    ddim_sqrt_one_minus_alphas: torch.Tensor

    @property
    def time_range(self) -> torch.Tensor:
        return self.ddim_timesteps.flip(0)

    @property
    def total_steps(self) -> int:
        return int(self.ddim_timesteps.shape[0])

    def index(self, position: int) -> int:
        """The table index of ``time_range[position]`` (LDM: ``total_steps - position - 1``)."""
        return self.total_steps - position - 1

    def coefficients(self, index: int, like: torch.Tensor) -> DDIMCoefficients:
        """Step ``index``'s numbers as 0-d tensors of ``like``'s dtype and device (LDM fills them with
        ``torch.full`` in the default dtype, the sample's)."""
        cast = lambda t: t[index].to(like)  # noqa: E731
        return DDIMCoefficients(cast(self.ddim_alphas), cast(self.ddim_alphas_prev), cast(self.ddim_sigmas),
                                cast(self.ddim_sqrt_one_minus_alphas))


def ddim_tables(alphas_cumprod: torch.Tensor, num_steps: int, eta: float, discretize: str = "uniform") -> DDIMTables:
    """``DDIMSampler.make_schedule(num_steps, discretize, eta)`` for LDM's float32 ``alphas_cumprod``."""
    ac = alphas_cumprod.to(torch.float32)
    ts = ddim_timesteps(int(ac.shape[0]), num_steps, discretize)
    alphas = ac[ts]
    alphas_prev = torch.cat([ac[:1], ac[ts[:-1]]])
    # LDM: eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) with a_prev a float64 numpy
    # array of the float32 values and a_t a float32 tensor: numpy defers the division to torch's
    # __rdiv__, i.e. (1 - a_t).reciprocal() in float32 times (1 - a_prev), the rest in float64.
    a, ap = alphas.to(torch.float64), alphas_prev.to(torch.float64)
    sigmas = eta * _sqrt((1.0 - alphas).reciprocal().to(torch.float64) * (1 - ap) * (1 - a / ap))
    return DDIMTables(ddim_timesteps=ts, ddim_alphas=alphas, ddim_alphas_prev=alphas_prev,
                      ddim_sigmas=sigmas.to(torch.float32), ddim_sqrt_one_minus_alphas=_sqrt(1.0 - alphas))


# ---- the timesteps MIDMs visits ---------------------------------------------------------------------
def interleaved_hijack_steps(num_steps: int, num_interleaved: Optional[int] = None) -> List[int]:
    """MIDMs' ``t_list``: positions in ``time_range`` of the interleaved steps. Official:
    ``sort(np.random.choice(S // 4, S // 4, replace=False)) + S // 4 * 3`` -- a sorted permutation,
    so always the last quarter of the S-step grid ([12, 13, 14, 15] for S = 16; the random draw
    only advances numpy's generator). ``num_interleaved`` other than S // 4 gives the last that
    many positions (the paper's other noise levels)."""
    n = num_steps // 4 if num_interleaved is None else int(num_interleaved)
    if not 1 <= n < num_steps:
        raise ValueError(f"interleaved steps: {n} of a {num_steps}-step grid (need 1 .. {num_steps - 1})")
    return list(range(num_steps - n, num_steps))


@dataclass(frozen=True)
class InterleavedSteps:
    """Per interleaved step k (``one_step_ddim_sampling(hijack_step=t_list[k])``): the UNet runs at
    ``denoise_step[k] = time_range[t]`` with table index ``index[k]``; ``noised_at[k] =
    time_range[t - 1]`` is where the first step's ``q_sample`` noises the warp (quirk: one grid
    step above where the UNet evaluates it, t = 311 vs 249; later steps rebuild x_t from the
    previous step's ``(sqrt(a_prev), dir_xt)`` and the re-matched x0 instead)."""

    t_list: torch.Tensor
    noised_at: torch.Tensor
    denoise_step: torch.Tensor
    index: torch.Tensor


def interleaved_timesteps(tables: DDIMTables, t_list: Sequence[int]) -> InterleavedSteps:
    tr = tables.time_range
    t = torch.as_tensor(list(t_list), dtype=torch.int64)
    if len(t) and (int(t.min()) < 1 or int(t.max()) >= tables.total_steps):
        raise ValueError(f"t_list {t.tolist()}: positions must be in 1 .. {tables.total_steps - 1}")
    return InterleavedSteps(t_list=t, noised_at=tr[t - 1], denoise_step=tr[t], index=tables.total_steps - t - 1)


@dataclass(frozen=True)
class FinalSteps:
    """The official inference-only final sampler (``ddim_sampling`` with ``hijack_step``): the input
    is ``q_sample``d to ``noised_at = time_range[hijack_step - 1]`` (quirk: one grid step above the
    first step run), then every ``time_range`` entry <= ``time_range[hijack_step]`` is a DDIM step
    (``steps``, with table indices ``index``): 101, then 96 ... 1 for 200 steps and hijack 180."""

    noised_at: torch.Tensor  # shape [1]
    steps: torch.Tensor
    index: torch.Tensor


def final_sampler_steps(tables: DDIMTables, hijack_step: int) -> FinalSteps:
    tr = tables.time_range
    if not 1 <= hijack_step < tables.total_steps:
        raise ValueError(f"hijack_step {hijack_step}: must be in 1 .. {tables.total_steps - 1}")
    positions = torch.nonzero(tr <= tr[hijack_step]).flatten()
    return FinalSteps(noised_at=tr[hijack_step - 1:hijack_step].clone(), steps=tr[positions],
                      index=tables.total_steps - positions - 1)


__all__ = ["DDIMCoefficients", "DDIMTables", "FINAL_SAMPLER_ETA", "FINAL_SAMPLER_HIJACK_STEP", "FINAL_SAMPLER_STEPS",
           "FinalSteps", "INTERLEAVED_DDIM_STEPS", "InterleavedSteps", "LDMSchedule", "LDM_DEFAULTS",
           "ddim_tables", "ddim_timesteps", "final_sampler_steps", "interleaved_hijack_steps", "interleaved_timesteps",
           "ldm_betas", "ldm_schedule", "ldm_scheduler"]
