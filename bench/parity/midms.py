"""Parity of MIDMs with the official code (KU-CVLAB/MIDMs @625d88a): ``run(fx)`` for every MIDMs
fixture. The latent-diffusion cases (``unet_eps``, ``vq_f4``, ``ddim_schedule``) are
``bench.parity.midms_ldm.CASES``; the pipeline cases are here:

* ``matching``: the warm-up forward (first matching, warps, their decodes, original_loss, loss_fb);
* ``confidence_mask``: get_flow / fbcheck / the mask on given correlation volumes;
* ``inference``: one full official inference pass (every step, every UNet call), with the stored
  random draws injected in call order and the stored ``rand_idx``;
* ``losses``: the loss terms of one ``train_epoch`` iteration at warm-up and interleaved, in train mode.

Our method is built from the converter's result (the filled official weights in MIDMs' checkpoint
layout through ``methods.midms.convert``) on the meta device and the converted weights assigned in
the fixture's dtype; only the resolution comes from the fixture's inputs (the release says 256).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from bench.parity import midms_ldm
from bench.parity.fixtures import Fixture
from methods.common.convert import Converted, add_prefix, build_converted
from methods.common.vgg_caffe import CONVS, CaffeVGG19
from methods.midms.convert import convert
from methods.midms.losses import VGG_LAYERS
from methods.midms.matching import confidence_mask, fbcheck, soft_warp
from methods.midms.model import MIDMsMethod, MIDMsOptions

Outputs = Dict[str, torch.Tensor]


def _official_state(fx: Fixture) -> Dict[str, torch.Tensor]:
    """The fixture's networks as one MIDMs checkpoint state dict (LDM parts behind ``diff_model.``)."""
    state: Dict[str, torch.Tensor] = {}
    nets = fx.data["manifest"]
    if "matching" in nets:
        state.update(fx.state_dict("matching"))
    for net in ("unet", "first_stage"):
        if net in nets:
            state.update(add_prefix(fx.state_dict(net), "diff_model."))
    return state


def converted_for(fx: Fixture) -> Converted:
    """The filled official weights through our converter (filling is the slow part: do it once)."""
    converted = convert({"MIDMs": _official_state(fx)}, fx.run_options)
    converted.context["resolution"] = int(fx.inputs["image"].shape[-1])
    return converted


def build(fx: Fixture, converted: Optional[Converted] = None) -> MIDMsMethod:
    """Our method from the converted filled weights, in the fixture's dtype: built on the meta
    device and the weights assigned as fresh copies (train-mode spectral norm updates its u/v in
    place, so two models must not share them). No optimisers, no loss VGG."""
    converted = converted or converted_for(fx)
    m = build_converted(MIDMsMethod, converted, training=False, device="meta")
    state = {k: v.to(fx.dtype, copy=True) if v.is_floating_point() else v.clone()
             for k, v in converted.state_dict.items()}
    m.load_state_dict(state, strict=False, assign=True)
    if m.unet is not None and not any(k.startswith("unet.") for k in state):
        m.unet = None  # the fixture has no UNet (it is not used)
    left = [n for n, t in list(m.named_parameters()) + list(m.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{fx.name}: no weights for {left[:5]} ({len(left)} tensors)")
    return m


def _batch(fx: Fixture) -> Dict[str, torch.Tensor]:
    i = fx.inputs
    return {"cond": i["label"], "exemplar_cond": i["label_ref"], "image": i["image"], "exemplar": i["ref"]}


def _corr5d(corr: torch.Tensor, hw) -> torch.Tensor:
    return corr.reshape(corr.shape[0], *hw, *hw)


class Draws:
    """The stored random draws, handed out in call order (``noise_fn``)."""

    def __init__(self, fx: Fixture, prefix: str):
        names = sorted(n for n in fx.outputs if n.startswith(prefix + "rng/torch/draw"))
        self.names = names
        self.values = [fx.outputs[n] for n in names]
        self.used = 0

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if self.used >= len(self.values):
            raise RuntimeError(f"more random draws requested than the fixture stores ({len(self.values)})")
        value = self.values[self.used]
        if tuple(value.shape) != tuple(like.shape):
            raise RuntimeError(f"draw {self.names[self.used]}: stored {tuple(value.shape)}, asked {tuple(like.shape)}")
        self.used += 1
        return value.to(like)

    def outputs(self) -> Outputs:
        if self.used != len(self.values):
            raise RuntimeError(f"{self.used} of the {len(self.values)} stored random draws were used")
        return dict(zip(self.names, self.values))


def _rand_idx(numpy_draws: List[dict]) -> int:
    return int(next(d["value"] for d in numpy_draws if d["fn"] == "np.random.randint"))


# ---- cases --------------------------------------------------------------------------------------------
def confidence_mask_case(fx: Fixture) -> Outputs:
    corr = fx.inputs["corr"]
    b, h, w = corr.shape[:3]
    o = MIDMsOptions()
    cm = confidence_mask(corr.reshape(b, h * w, -1), (h, w), tuple(corr.shape[3:]), o.tau, o.gamma, o.mask_check,
                         o.mask_majority_pool)
    fb_ts, fb_st = fbcheck(cm.flow)
    return {"map_trg": cm.flow.map_fwd, "map_src": cm.flow.map_bwd, "flow_trg": cm.flow.flow_fwd,
            "flow_src": cm.flow.flow_bwd, "fb_ts": fb_ts, "fb_st": fb_st, "fb_mask_raw": cm.raw, "mask": cm.mask}


def _warped_latents_swapped(fx: Fixture) -> bool:
    """Whether a fixture stores the two warped latents under each other's names -- decided from its
    own stored values, not from its file: its ``loss/original_loss`` is by definition
    mse(warped src latent, src latent), so the stored tensor that reproduces it is the warped src.
    (The shipped celebahqedge_matching.pt has them swapped; its decoded/warped_src agrees with the
    latent it calls warped_latent/ref.) A fixture that names them right is compared as it is."""
    o = fx.outputs
    names = ("warped_latent/src", "warped_latent/ref", "latent/src", "loss/original_loss")
    if not all(n in o and fx.meta[n].get("stride", 1) == 1 for n in names):
        return False
    loss = float(o["loss/original_loss"])
    mse = {n: float(F.mse_loss(o[n], o["latent/src"])) for n in names[:2]}
    tol = fx.tolerance("loss/original_loss")
    fits = {n: abs(v - loss) <= tol.atol + tol.rtol * abs(loss) for n, v in mse.items()}
    swapped = fits["warped_latent/ref"] and not fits["warped_latent/src"]
    if swapped:
        warnings.warn(f"{fx.path}: warped_latent/src and warped_latent/ref are stored under each other's names "
                      f"(loss/original_loss = mse(stored warped_latent/ref, latent/src)); compared accordingly")
    return swapped


@torch.no_grad()
def matching_case(fx: Fixture) -> Outputs:
    """``MIDMs.forward(..., iter=0, warmup_iter=1)`` in eval mode: the warm-up branch."""
    m = build(fx).eval()
    record: Outputs = {}
    batch = _batch(fx)
    m.loss_terms(batch, joint=False, noise_fn=None, needed=set(), record=record)
    hw = m.latent_hw
    out = {k: v for k, v in record.items() if not k.startswith(("loss/", "_"))}
    if _warped_latents_swapped(fx):
        out["warped_latent/src"], out["warped_latent/ref"] = record["warped_latent/ref"], record["warped_latent/src"]
    out["corr_src"], out["corr_ref"] = _corr5d(record["corr_src"], hw), _corr5d(record["corr_ref"], hw)
    ref_l = m._semantics(batch["exemplar_cond"])
    out["warped_ref_seg"] = soft_warp(ref_l, record["corr_ref"], m.options.tau, hw)
    out["decoded/warped_src"] = m._image(record["warped_latent/src"])
    out["decoded/warped_ref"] = m._image(record["warped_latent/ref"])
    out["loss/original_loss"] = record["loss/original_loss"]
    out["loss/loss_fb"] = record["loss/loss_fb_iterative"]  # the forward's own (warm-up) cycle
    return out


def _unet_calls(m: MIDMsMethod, calls: List[tuple]):
    return m.unet.register_forward_hook(lambda _m, args, out: calls.append((args[0], args[1], out.sample)))


@torch.no_grad()
def inference_case(fx: Fixture) -> Outputs:
    """``MIDMs.forward(..., mode='inference', iter=1, warmup_iter=0)`` as ``inference.py`` calls it:
    the ground-truth chain and the 'original' step run too (their draws come first)."""
    m = build(fx).eval()
    draws = Draws(fx, "")
    record: Outputs = {}
    calls: List[tuple] = []
    hook = _unet_calls(m, calls)
    try:
        latent, _ = m.translate(_batch(fx), draws, with_gt_chain=True,
                                original_idx=_rand_idx(fx.data["rng_log"]["numpy_draws"]), record=record)
    finally:
        hook.remove()
    out: Outputs = {"warped_ref": m._image(latent)}
    latents = [record["debug/pred_ref_x0"]]
    masks = []
    for idx in m.options.rematch_steps:
        latents += [record[f"debug/{idx}_pred_ref_x0_new"], record[f"debug/{idx}_pred_ref_x0"]]
        masks.append(record[f"debug/{idx}_fb_mask"])
    size = out["warped_ref"].shape[2:]
    stack = [m._image(z) for z in latents] + [F.interpolate(k, size=size).repeat(1, 3, 1, 1) for k in masks]
    out.update({f"debug_stack/{i}": v for i, v in enumerate(stack)})
    out["fb_mask"] = masks[-1]
    out.update({k: v for k, v in record.items() if k.startswith(("F_X/", "F_Y/", "trunk/", "theta/", "phi/", "steps/"))})
    out.update({f"F_Y_iter/iter_enc_call{i}": v for i, v in enumerate(record["_iter_enc_calls"])})
    for i, (x, t, eps) in enumerate(calls):
        out.update({f"unet_calls/{i:02d}/x": x, f"unet_calls/{i:02d}/t": t, f"unet_calls/{i:02d}/eps": eps})
    out.update(draws.outputs())
    return out


def _caffe_vgg(fx: Fixture) -> Callable[[torch.Tensor], Outputs]:
    """The official ``vggnet_fix`` (``vgg19_conv.pth``, filled) as our Caffe VGG19."""
    net = CaffeVGG19(CONVS.index("conv5_2") + 1)
    filled = fx.state_dict("vggnet_fix")
    net.load_state_dict({k: filled[k] for k in net.state_dict()})
    net.to(fx.dtype).eval()
    return lambda x: net(x, VGG_LAYERS)


@torch.no_grad()
def losses_case(fx: Fixture) -> Outputs:
    """One ``train_epoch`` iteration per phase (train mode, fresh weights each): the official loss
    terms, our total (the paper's weighted terms, = the official Loss), decodes, VGG features."""
    out: Outputs = {}
    log = fx.data["rng_log"]
    warmup_iter = int(fx.official_options["warmup_iter"])
    converted = converted_for(fx)
    for phase in ("warmup", "interleaved"):
        m = build(fx, converted).train()
        m.vgg = _caffe_vgg(fx)
        n_iter = int(log[phase]["n_iter"])
        joint, with_context = n_iter >= warmup_iter, n_iter > warmup_iter
        draws = Draws(fx, f"{phase}/")
        record: Outputs = {}
        original_idx = _rand_idx(log[phase]["numpy"]) if joint else None
        terms = m.loss_terms(_batch(fx), joint, draws, original_idx=original_idx, record=record)
        total = sum(m.weighted_losses(terms, joint, with_context).values())
        out[f"{phase}/loss/Loss"] = total
        out.update({f"{phase}/loss/{k}": v for k, v in terms.items()})
        out[f"{phase}/warped_src"], out[f"{phase}/warped_ref"] = record["warped_src"], record["warped_ref"]
        out[f"{phase}/corr_ref"] = _corr5d(record["corr_ref"], m.latent_hw)
        out.update({f"{phase}/{k}": v for k, v in record.items() if k.startswith("vgg/")})
        out.update(draws.outputs())
    return out


CASES: Dict[str, Callable[[Fixture], Outputs]] = {
    "matching": matching_case, "confidence_mask": confidence_mask_case, "inference": inference_case,
    "losses": losses_case,
}


def run(fx: Fixture) -> Outputs:
    for cases in (CASES, midms_ldm.CASES):
        for name, case in cases.items():
            if fx.case == name or fx.case.endswith("_" + name):
                return case(fx)
    raise KeyError(f"{fx.name}: no MIDMs parity case for {fx.case!r} (known: {sorted(CASES) + sorted(midms_ldm.CASES)})")
