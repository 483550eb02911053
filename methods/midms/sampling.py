"""MIDMs' interleaved DDIM sampling (Eqs. 7, 9, 11) on top of diffusers' ``DDIMScheduler``.

Every denoising update is ``scheduler.step`` itself: interleaving only *adds* the re-matching
correction to its output, so with re-matching off the loop is exactly diffusers' DDIM from the
same noised latent (tests/test_midms.py checks bit-equality).

Eq. 11 at step n: ``r^n = sqrt(a_prev) * (M * R_new + (1 - M) * x0) + sqrt(1 - a_prev) * eps``.
diffusers returns ``prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps`` (eta = 0), hence
``r^n = prev + sqrt(a_prev) * M * (R_new - x0)``.

Noise level -> timestep: the scheduler's ``num_inference_steps``-step schedule is set, and the last
``n = round(noise_level * num_inference_steps)`` timesteps are denoised (diffusers' img2img
"strength", rounded rather than floored so 20/25/30/35 % stay distinct on the 16-step grid). The
warped latent is noised to the first of them. With the defaults (T = 1000, 16 steps, trailing
spacing): 20 % -> 3 steps from t = 187, 25 % -> 4 steps from t = 249 (the official start, whose
steps are 249/187/125/63), 30 % -> 5 from 311, 35 % -> 6 from 374.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from diffusers import DDIMScheduler, UNet2DModel


def denoise_timesteps(scheduler: DDIMScheduler, num_inference_steps: int, noise_level: float) -> torch.Tensor:
    """The timesteps MIDMs denoises for ``noise_level`` (see the module docstring)."""
    if not 0.0 < noise_level <= 1.0:
        raise ValueError(f"midms: noise_level must be in (0, 1], got {noise_level}")
    scheduler.set_timesteps(num_inference_steps)
    n = int(round(noise_level * num_inference_steps))
    if n < 1:
        raise ValueError(f"midms: noise_level {noise_level} with {num_inference_steps} DDIM steps leaves no "
                         f"step to denoise (round({noise_level} * {num_inference_steps}) = 0)")
    return scheduler.timesteps[num_inference_steps - n:].clone()


def alpha_prev(scheduler: DDIMScheduler, t: int) -> torch.Tensor:
    """``alpha_cumprod`` of the step ``scheduler.step`` goes to from ``t`` (mirrors its step 1-2)."""
    prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod


# A re-matcher gets the current x0 estimate and the step index; returns the re-warped latent and
# the confidence mask (None: replace everywhere, i.e. no confidence masking).
Rematcher = Callable[[torch.Tensor, int], Tuple[torch.Tensor, Optional[torch.Tensor]]]


@dataclass
class StepRecord:
    t: int
    rematched: bool
    mask_fraction: Optional[float] = None  # share of confident positions when masking ran


@dataclass
class SamplerResult:
    latent: torch.Tensor  # the final DDIM sample
    steps: List[StepRecord] = field(default_factory=list)
    last_rewarp: Optional[torch.Tensor] = None  # the last re-matched warp (latent), if any


def interleaved_ddim(unet: UNet2DModel, scheduler: DDIMScheduler, warped: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor, rematch: Optional[Rematcher] = None,
                     rematch_steps: Sequence[int] = ()) -> SamplerResult:
    """Noise ``warped`` to ``timesteps[0]`` and run DDIM (eta = 0) over ``timesteps``.

    Before step ``k`` in ``rematch_steps`` (k >= 1), the previous step's x0 estimate is re-matched
    and the latent recomposed (Eq. 11). ``scheduler.set_timesteps`` must have been called (it is,
    by ``denoise_timesteps``).
    """
    b = warped.shape[0]
    x = scheduler.add_noise(warped, noise, timesteps[:1].repeat(b))
    result = SamplerResult(latent=x)
    x0 = a_prev = None
    for k, t in enumerate(timesteps):
        record = StepRecord(t=int(t), rematched=False)
        if rematch is not None and k in rematch_steps:
            rewarp, mask = rematch(x0, k)
            delta = rewarp - x0 if mask is None else mask * (rewarp - x0)
            x = x + a_prev.to(x.dtype).sqrt() * delta
            record.rematched = True
            record.mask_fraction = None if mask is None else float(mask.detach().mean())
            result.last_rewarp = rewarp
        eps = unet(x, t).sample
        out = scheduler.step(eps, t, x)
        x, x0 = out.prev_sample, out.pred_original_sample
        a_prev = alpha_prev(scheduler, t)
        result.steps.append(record)
    result.latent = x
    return result


def refine(unet: UNet2DModel, scheduler: DDIMScheduler, latent: torch.Tensor, noise_level: float,
           num_inference_steps: int, eta: float, generators: List[torch.Generator]) -> torch.Tensor:
    """The official inference-only refinement: re-noise the result to ``noise_level`` of a
    ``num_inference_steps``-step schedule and finish with stochastic DDIM (``eta``; official 200
    steps, eta 1, last 20 steps from t ~ 100). Noise comes from one generator per sample."""
    sched = DDIMScheduler.from_config(scheduler.config)
    timesteps = denoise_timesteps(sched, num_inference_steps, noise_level)
    noise = torch.stack([torch.randn(latent.shape[1:], generator=g) for g in generators]).to(latent)
    x = sched.add_noise(latent, noise, timesteps[:1].repeat(latent.shape[0]))
    for t in timesteps:
        eps = unet(x, t).sample
        x = sched.step(eps, t, x, eta=eta, generator=generators).prev_sample
    return x
