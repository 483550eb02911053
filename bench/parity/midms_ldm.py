"""Parity of MIDMs' latent-diffusion parts with the official code: the LDM UNet, the VQ-f4 first
stage and the DDIM schedules. ``CASES[name](fx) -> {official output name: full tensor}``;
``bench/parity/midms.py`` dispatches a fixture to the case its name ends with.

Each case builds our diffusers modules from the LDM config the fixture's weights were made for
(identified by their shapes among the known LDM configs -- the fixtures carry the official
checkpoint layout, not the config -- or, without weights, by the official ``--benchmark``), loads
the converted filled weights and runs in the fixture's dtype unless an output says otherwise.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Dict, Iterator, Mapping

import torch
from torch import nn

from bench.parity.fixtures import Fixture
from methods.common.convert import strip_prefix
from methods.midms import schedule as sch
from methods.midms.ldm_convert import (FIRST_STAGE_PREFIX, UNET_PREFIX, LDMSpec, ldm_config_for,
                                       ldm_config_for_benchmark)


@contextlib.contextmanager
def capture(modules: Mapping[str, nn.Module]) -> Iterator[Dict[str, torch.Tensor]]:
    """Record the output of each named module while the block runs."""
    seen: Dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
             for name, m in modules.items()]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _spec(fx: Fixture, network: str) -> LDMSpec:
    return LDMSpec.from_config(ldm_config_for(fx.data["manifest"][network]))


def unet_eps(fx: Fixture) -> Dict[str, torch.Tensor]:
    """eps of LDM's UNetModel (``diffusion_model(x_noisy, t)``) and every block's output in float64
    (the fixture's dtype); ``eps_float32_as_is`` in float32 (LDM's own dtype)."""
    spec = _spec(fx, "unet").unet
    unet = spec.load(strip_prefix(fx.state_dict("unet"), UNET_PREFIX)).eval()
    x, t = fx.inputs["x_noisy"], fx.inputs["t"]
    out: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        unet.type(fx.dtype)  # nn.Module.type: diffusers' .to(dtype) warns about fp32-pinned modules
        with capture(spec.block_modules(unet)) as blocks:
            out["eps"] = unet(x.to(fx.dtype), t).sample
        out.update({f"unet/{name}": v for name, v in blocks.items()})
        unet.float()
        out["eps_float32_as_is"] = unet(x.float(), t).sample
    return out


def vq_f4(fx: Fixture) -> Dict[str, torch.Tensor]:
    """LDM's VQ first stage: ``encode/h`` = quant_conv(encoder(image)) (what MIDMs warps), and the
    decode of that h (``decode_image/``) and of a given latent (``decode_latent/``):
    quantisation (codebook argmin indices, emb_loss) then decoder(post_quant_conv(quantised)).
    Intermediates are named by LDM module (``<stage>/encoder.down.0.block.-1``, ...)."""
    spec = _spec(fx, "first_stage").first_stage
    ae = spec.load(strip_prefix(fx.state_dict("first_stage"), FIRST_STAGE_PREFIX)).eval()
    ae.type(fx.dtype)

    def modules(stage: str) -> Dict[str, nn.Module]:
        names = [n.split("/", 1)[1] for n in fx.outputs if n.startswith(stage + "/")]
        return {f"{stage}/{n}": spec.module(ae, n) for n in names if n.startswith(("encoder.", "decoder."))}

    out: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        with capture(modules("encode")) as seen:
            out["encode/h"] = ae.encode(fx.inputs["image"].to(fx.dtype)).latents
        out.update(seen)
        for stage, z in (("decode_image", out["encode/h"]), ("decode_latent", fx.inputs["latent"].to(fx.dtype))):
            quantised, emb_loss, (_, _, indices) = ae.quantize(z)
            out[f"{stage}/quantized"] = quantised
            out[f"{stage}/codebook_indices"] = indices.reshape(z.shape[0], *z.shape[2:])
            out[f"{stage}/emb_loss"] = emb_loss
            with capture(modules(stage)) as seen:
                out[f"{stage}/x_rec"] = ae.decode(quantised, force_not_quantize=True).sample
            out.update(seen)
    return out


def ddim_schedule(fx: Fixture) -> Dict[str, torch.Tensor]:
    """LDM's schedule buffers (``ldm/``), the DDIM tables of every ``ddim<S>_eta<eta>/`` the fixture
    stores, and the timesteps of MIDMs' interleaved loop and of its final sampler."""
    schedule = sch.ldm_schedule(LDMSpec.from_config(ldm_config_for_benchmark(fx.run_options["benchmark"])).params)
    out: Dict[str, torch.Tensor] = {f"ldm/{k}": getattr(schedule, k) for k in (
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")}
    for name in sorted({n.split("/", 1)[0] for n in fx.outputs}):
        m = re.fullmatch(r"ddim(\d+)_eta([0-9.]+)", name)
        if m:
            t = sch.ddim_tables(schedule.alphas_cumprod, int(m[1]), float(m[2]))
            out.update({f"{name}/{k}": getattr(t, k) for k in (
                "ddim_timesteps", "time_range", "ddim_alphas", "ddim_alphas_prev", "ddim_sigmas",
                "ddim_sqrt_one_minus_alphas")})
    grid = sch.ddim_tables(schedule.alphas_cumprod, sch.INTERLEAVED_DDIM_STEPS, 0.0)
    steps = sch.interleaved_timesteps(grid, sch.interleaved_hijack_steps(sch.INTERLEAVED_DDIM_STEPS))
    out.update({"interleaved/t_list": steps.t_list, "interleaved/noised_at": steps.noised_at,
                "interleaved/denoise_step": steps.denoise_step})
    final = sch.final_sampler_steps(
        sch.ddim_tables(schedule.alphas_cumprod, sch.FINAL_SAMPLER_STEPS, sch.FINAL_SAMPLER_ETA),
        sch.FINAL_SAMPLER_HIJACK_STEP)
    out.update({"final_sampler/noised_at": final.noised_at, "final_sampler/steps": final.steps})
    return out


CASES: Dict[str, Callable[[Fixture], Dict[str, torch.Tensor]]] = {
    "unet_eps": unet_eps, "vq_f4": vq_f4, "ddim_schedule": ddim_schedule}
