"""MIDMs (Seo et al., AAAI 2023): matching interleaved diffusion models, on diffusers.

Pipeline (paper Fig. 2; official ``models/midms.py``, reference/methods.md 1.3):
exemplar and ground truth are encoded by the frozen first stage; ``F_X`` (condition) and ``F_Y``
(latents) features are correlated (cosine, softmax temperature ``tau``) and the exemplar latent is
soft-warped; the warp is noised to the noise level (a fraction of the DDIM schedule) and denoised
with DDIM, re-matching the x0 estimate to the exemplar through ``F_Y^iter`` before some steps,
gated by a forward-backward confidence mask; the result is decoded.

Training (official ``utils_training/optimize.py``): a warm-up phase trains the matching only
(diffusion UNet frozen, no diffusion steps), then joint training back-propagates through the
denoising steps into the UNet and the matching networks. Without a pretrained LDM the trial first
trains the autoencoder (``ae_fraction`` of the steps) and the UNet learns its prior with L_diff
during the warm-up. Loss weights are switches (0 = off): L_dom, L_cycle, L_src, L_perc, L_style,
L_diff (paper Eqs. 12-17; how each maps to the official terms is at ``MIDMsOptions``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import diffusers
import torch
import torch.nn.functional as F

from methods.base import ExemplarMethod, MethodContext, MethodOutput, scaled
from methods.common.contextual import contextual_loss
from methods.common.vgg import VGGFeatures
from methods.common.weights import private_rng
from methods.midms import autoencoder_stage as ae_stage
from methods.midms.components import (LatentDiffusionParts, build_first_stage, build_unet, load_pretrained_ldm,
                                      resolve_ldm_path, sampling_scheduler)
from methods.midms.matching import (MatchingNetworks, confidence_mask, correlation, soft_warp, warp_back)
from methods.midms.recipes import RECIPES
from methods.midms.sampling import SamplerResult, denoise_timesteps, interleaved_ddim, refine
from methods.registry import METHODS

VGG_LAYERS = ("relu1_2", "relu2_2", "relu3_2", "relu4_2", "relu5_2")  # CoCosNet's r12 .. r52
SRC_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)  # official loss_feat weights
# Official loss_context: 8 CX(r52) + 4 CX(r42) + 2 CX(avgpool2 r32) + 1 CX(avgpool4 r22).
STYLE_TERMS = (("relu5_2", 8.0, 1), ("relu4_2", 4.0, 1), ("relu3_2", 2.0, 2), ("relu2_2", 1.0, 4))
FIRST_STAGE_SEED_OFFSET = 7_919  # keeps the first stage's per-step seeds apart from the sampling generators'


@dataclass
class MIDMsOptions:
    # ---- latent diffusion model ------------------------------------------------------------------
    # A local diffusers-format LDM to fine-tune (official --diffusion_model_path, an LDM checkpoint):
    # one path, or {dataset name: path, "*": path}; None / datasets not listed train from scratch.
    pretrained_ldm: Optional[Union[str, Dict[str, str]]] = None
    # From-scratch first stage, LDM's vq-f4 (CelebA-HQ; README "f=4, VQ, Z=8192, d=3"): ch 128 x (1,2,4).
    ae_type: str = "vq"  # "vq" (VQModel) or "kl" (AutoencoderKL; LSUN-Churches' kl-f8 is ch_mult (1,2,4,4), d=4)
    ae_channels: int = 128  # vq-f4 ddconfig.ch, scaled by scale.width
    ae_channel_mult: Tuple[int, ...] = (1, 2, 4)  # vq-f4 ch_mult; downsampling f = 2^(len-1)
    ae_layers_per_block: int = 2  # vq-f4 num_res_blocks
    ae_latent_channels: int = 3  # vq-f4 z_channels / embed_dim
    ae_codebook_size: int = 8192  # vq-f4 n_embed
    ae_fraction: float = 0.3  # not official (MIDMs uses a pretrained stage): share of steps training it
    ae_lr: float = 1.0e-4  # not official: Adam(0.5, 0.9) as LDM's autoencoder training, ~its scaled rate
    ae_cache_dir: Optional[str] = None  # share the trained first stage between trials (content-keyed files)
    scale_by_std: bool = True  # scratch only: LDM's scale_by_std (1/std of the first post-stage latents)
    # From-scratch UNet, LDM celebahq-ldm-vq-4: model_channels 224 x (1,2,3,4), 2 res blocks,
    # attention_resolutions [8,4,2] (levels 1-3), num_head_channels 32.
    unet_channels: int = 224
    unet_channel_mult: Tuple[int, ...] = (1, 2, 3, 4)
    unet_layers_per_block: int = 2
    unet_attention_levels: Tuple[int, ...] = (1, 2, 3)
    unet_head_channels: int = 32
    # Noise schedule of a from-scratch LDM (celebahq-ldm-vq-4: T=1000, "linear" 0.0015 -> 0.0195,
    # which is diffusers' scaled_linear). A pretrained LDM brings its own.
    num_train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    beta_schedule: str = "scaled_linear"

    # ---- sampling ---------------------------------------------------------------------------------
    num_inference_steps: int = 16  # official ddim_num_steps (inference 16; training 4 x diffusion_iteratiom_num = 16)
    # trailing: the 25 % tail is t = 249/187/124/61, vs the official 249/187/125/63 (its 17-entry
    # "16-step" grid, quirk 8); leading spacing would start the 4-step tail at 187.
    timestep_spacing: str = "trailing"
    set_alpha_to_one: bool = True  # last step returns x0, as MIDMs outputs its last x0 estimate
    noise_level: float = 0.25  # paper's N = 25 % (Table 4): round(0.25 * 16) = 4 steps from t = 249
    # Official inference-only refinement: 200-step DDIM, eta 1, hijack_step 180 -> the last 20 steps
    # (round(0.1 * 200)) from t ~ 100. 0 = off. Not in the paper.
    refine_noise_level: float = 0.1
    refine_steps: int = 200
    refine_eta: float = 1.0

    # ---- matching ---------------------------------------------------------------------------------
    match_channels: int = 256  # official N_CH
    match_hidden: int = 64  # ShallowAdaptiveFeatureGenerator ndf
    spade_hidden: int = 128  # SPADE MLP hidden
    maskmix: bool = True  # official --maskmix: semantics concatenated before the matching trunk
    # Condition map -> latent size. Official: nearest (fine for its 15-ch distance-transform edges);
    # area keeps 1-px edge maps, which nearest downsampling mostly drops.
    cond_resize: str = "area"
    tau: float = 0.005  # softmax temperature (official soft_warp alpha / get_flow temp)

    # ---- components (Table 3) --------------------------------------------------------------------
    use_diffusion: bool = True  # False = "(-) Diffusion U-Net": decode the warp (no noising, no UNet)
    recurrent_matching: bool = True  # False = "(-) Recurrent matching": warp once, then plain DDIM
    rematch_steps: Tuple[int, ...] = (1, 2)  # official `idx in range(1, 3)`: re-match before steps 1 and 2
    confidence_masking: bool = True  # official --confidence_masking; False = "(-) Confidence masking"
    gamma: float = 0.5  # cycle-error threshold in normalised [-1, 1] units (official fb < 0.5)
    mask_majority_pool: bool = True  # official: 2x2 average, nearest up, > 0.5

    # ---- losses (Table 5; 0 = off) ----------------------------------------------------------------
    w_dom: float = 10.0  # L_dom (Eq. 12) = official 10 * loss_domain
    w_cycle: float = 1.0  # L_cycle (Eq. 13) = loss_fb + loss_fb_iterative (latent cycles)
    # L_src (Eq. 14) = loss_feat (weighted VGG r12..r52 L1 of the decoded GT self-warp vs GT) + the
    # warm-up MSE of the self-warped GT latent (part of the official original_loss).
    w_src: float = 1.0
    w_perc: float = 0.002  # L_perc (Eq. 15): official weight_perceptual 0.002 (CelebA/DeepFashion; LSUN 0.05)
    perc_layer: str = "relu4_2"  # official which_perceptual -2 = r42 (LSUN: -1 = relu5_2)
    w_style: float = 1.0  # L_style (Eq. 16): loss_context (joint phase only, as official)
    w_diff: float = 1.0  # L_diff (Eq. 17): eps MSE on the noised GT latent, t <= the sampler's first step

    # ---- schedule and optimisation ----------------------------------------------------------------
    # Official warmup_iter 10000 of ~14000 iterations (4 epochs x 28k CelebA-HQ images / 8 GPUs).
    warmup_fraction: float = 0.7
    unet_lr_scale: float = 1.0  # official lr_diff_backbone = lr = 3e-6 (the paper text says 1.5e-7 = x0.05)
    weight_decay: float = 0.05  # official AdamW weight decay

    def __post_init__(self):
        # The harness builds options straight from YAML: lists arrive for tuples and YAML 1.1 reads
        # "1e-4" as a string, so coerce by the declared type before validating.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("float",) and isinstance(v, (str, int)) and not isinstance(v, bool):
                try:
                    setattr(self, f.name, float(v))
                except ValueError:
                    raise ValueError(f"midms option {f.name}: expected a number, got {v!r}") from None
            elif f.type.startswith("Tuple") and isinstance(v, list):
                setattr(self, f.name, tuple(v))
        checks = [
            (self.ae_type in ("vq", "kl"), "ae_type must be 'vq' or 'kl'"),
            (self.cond_resize in ("area", "nearest", "bilinear"), "cond_resize must be area, nearest or bilinear"),
            (0.0 <= self.ae_fraction < 1.0, "ae_fraction must be in [0, 1)"),
            (0.0 <= self.warmup_fraction <= 1.0, "warmup_fraction must be in [0, 1]"),
            (0.0 < self.noise_level <= 1.0, "noise_level must be in (0, 1]"),
            (0.0 <= self.refine_noise_level <= 1.0, "refine_noise_level must be in [0, 1]"),
            (self.tau > 0 and self.gamma > 0, "tau and gamma must be > 0"),
            (self.perc_layer in VGG_LAYERS, f"perc_layer must be one of {list(VGG_LAYERS)}"),
            (all(getattr(self, w) >= 0 for w in ("w_dom", "w_cycle", "w_src", "w_perc", "w_style", "w_diff")),
             "loss weights must be >= 0"),
            (self.num_inference_steps >= 1, "num_inference_steps must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"midms options: {msg}")
        n = int(round(self.noise_level * self.num_inference_steps))
        if n < 1:
            raise ValueError(f"midms options: noise_level {self.noise_level} x num_inference_steps "
                             f"{self.num_inference_steps} rounds to 0 denoising steps")
        if self.use_diffusion and self.recurrent_matching:
            bad = [k for k in self.rematch_steps if not 1 <= k < n]
            if bad:
                raise ValueError(f"midms options: rematch_steps {bad} outside 1..{n - 1} (noise_level "
                                 f"{self.noise_level} gives {n} denoising steps; step 0 has no x0 estimate yet)")


def feature_normalize(f: torch.Tensor) -> torch.Tensor:
    return f / (f.norm(dim=1, keepdim=True) + 1e-6)


@METHODS.register("midms")
class MIDMsMethod(ExemplarMethod):
    Options = MIDMsOptions
    has_warp = True
    recipes = RECIPES

    def __init__(self, options: MIDMsOptions, ctx: MethodContext):
        super().__init__(options, ctx)
        o = options
        ldm_path = resolve_ldm_path(o.pretrained_ldm, ctx.data.name)
        parts = (load_pretrained_ldm(ldm_path, o.timestep_spacing, o.set_alpha_to_one, need_unet=o.use_diffusion)
                 if ldm_path else self._scratch_parts(o, ctx))
        self.pretrained = parts.pretrained
        self.provenance.update(parts.provenance)
        self.first_stage = parts.first_stage.requires_grad_(False)
        self.unet = parts.unet
        self.scheduler = parts.scheduler  # a config object, not a module: nothing to checkpoint
        factor = 2 ** (len(self.first_stage.config.block_out_channels) - 1)
        if ctx.resolution % factor:
            raise ValueError(f"midms: resolution {ctx.resolution} is not divisible by the first stage's "
                             f"downsampling factor {factor}")
        self.latent_hw = (ctx.resolution // factor, ctx.resolution // factor)
        latent_ch = self.first_stage.config.latent_channels
        # 0 = not measured yet (scale_by_std happens at the first step after the first stage trained).
        self.register_buffer("latent_scale", torch.tensor(float(parts.latent_scale or 0.0)))
        self.register_buffer("ae_done", torch.tensor(parts.pretrained))
        self.register_buffer("codebook_initialised", torch.tensor(parts.pretrained))
        self.matching = MatchingNetworks(
            latent_ch, ctx.data.cond_channels, scaled(o.match_channels, ctx.width, 8),
            scaled(o.match_hidden, ctx.width), scaled(o.spade_hidden, ctx.width),
            maskmix=o.maskmix, recurrent=o.use_diffusion and o.recurrent_matching)
        self.vgg = None
        if o.w_src > 0 or o.w_perc > 0 or o.w_style > 0:
            self.vgg = VGGFeatures(VGG_LAYERS, ctx.backbones, purpose="MIDMs' VGG19 losses (L_src, L_perc, L_style)")
            self.provenance["vgg19_loss"] = self.vgg.provenance
        # Phases over the trial's steps: [first stage][warm-up: matching only][joint].
        total = max(1, ctx.total_steps)
        self.ae_steps = 0 if self.pretrained else max(1, int(round(o.ae_fraction * total)))
        self.warmup_end = self.ae_steps + int(round(o.warmup_fraction * (total - self.ae_steps)))
        self.ae_cache = ae_stage.FirstStageCache(o.ae_cache_dir) if (o.ae_cache_dir and not self.pretrained) else None
        self._cache_checked = False
        self.last_trace: Dict[str, Any] = {}
        self.to(ctx.device)
        betas = (ctx.beta1, ctx.beta2)
        self.opt_match = torch.optim.AdamW(self.matching.parameters(), lr=ctx.lr_g, betas=betas,
                                           weight_decay=o.weight_decay)
        self.opt_unet = (torch.optim.AdamW(self.unet.parameters(), lr=ctx.lr_g * o.unet_lr_scale, betas=betas,
                                           weight_decay=o.weight_decay) if self.unet is not None else None)
        self.opt_ae = (None if self.pretrained else
                       torch.optim.Adam(self.first_stage.parameters(), lr=o.ae_lr, betas=(0.5, 0.9)))

    @staticmethod
    def _scratch_parts(o: MIDMsOptions, ctx: MethodContext) -> LatentDiffusionParts:
        ae = build_first_stage(o.ae_type, o.ae_channels, o.ae_channel_mult, o.ae_layers_per_block,
                               o.ae_latent_channels, o.ae_codebook_size, ctx.width, ctx.resolution)
        latent = ctx.resolution // 2 ** (len(o.ae_channel_mult) - 1)
        unet = (build_unet(o.unet_channels, o.unet_channel_mult, o.unet_layers_per_block, o.unet_attention_levels,
                           o.unet_head_channels, o.ae_latent_channels, latent, ctx.width)
                if o.use_diffusion else None)
        base = dict(num_train_timesteps=o.num_train_timesteps, beta_start=o.beta_start, beta_end=o.beta_end,
                    beta_schedule=o.beta_schedule, prediction_type="epsilon")
        scale = None if o.scale_by_std else 1.0
        prov = {"ldm.first_stage": f"scratch(seed={ctx.seed})"}
        if unet is not None:
            prov["ldm.unet"] = f"scratch(seed={ctx.seed})"
        return LatentDiffusionParts(first_stage=ae, unet=unet, latent_scale=scale, provenance=prov,
                                    scheduler=sampling_scheduler(base, o.timestep_spacing, o.set_alpha_to_one))

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        opts = {"match": self.opt_match, "unet": self.opt_unet, "ae": self.opt_ae}
        return {k: v for k, v in opts.items() if v is not None}

    # ---- helpers ----------------------------------------------------------------------------------
    def phase(self, step: int) -> str:
        if step < self.ae_steps:
            return "ae"
        return "warmup" if step < self.warmup_end else "joint"

    def _scale(self) -> torch.Tensor:
        # Before scale_by_std has measured anything (only an untrained model evaluates then), use 1.
        return torch.where(self.latent_scale > 0, self.latent_scale, torch.ones_like(self.latent_scale))

    def _latent(self, images: torch.Tensor) -> torch.Tensor:
        return ae_stage.encode(self.first_stage, images) * self._scale()

    def _image(self, latents: torch.Tensor) -> torch.Tensor:
        return ae_stage.decode(self.first_stage, latents / self._scale())

    def _semantics(self, cond: torch.Tensor) -> torch.Tensor:
        return F.interpolate(cond.float(), size=self.latent_hw, mode=self.options.cond_resize)

    def _timesteps(self) -> torch.Tensor:
        o = self.options
        return denoise_timesteps(self.scheduler, o.num_inference_steps, o.noise_level)

    def _initial_match(self, cond: torch.Tensor, exemplar_cond: torch.Tensor, z_ref: torch.Tensor):
        """F_X / F_Y features, the condition-side trunk output and the X <- Y correlation."""
        m = self.matching
        cond_l, ref_l = self._semantics(cond), self._semantics(exemplar_cond)
        fx, fy = m.f_x(cond_l), m.f_y(z_ref)
        tx = m.condition_side(fx, cond_l)
        return cond_l, fx, fy, tx, correlation(tx, m.image_side(fy, ref_l))

    def _diffuse(self, warped: torch.Tensor, z_ref: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor,
                 noise: torch.Tensor, cycles: Optional[List[torch.Tensor]] = None) -> SamplerResult:
        """Noise the warp and run the interleaved sampler; re-matching warps ``z_ref`` (in-domain:
        F_Y^iter(x0, F_X) against F_Y(exemplar), Eq. 8). Appends each re-match's latent cycle error
        (per sample) to ``cycles`` when given."""
        o, hw = self.options, self.latent_hw

        def rematch(x0: torch.Tensor, k: int):
            corr = correlation(self.matching.f_y_iter(x0, fx), fy)
            rewarp = soft_warp(z_ref, corr, o.tau, hw)
            if cycles is not None:
                cycles.append((warp_back(rewarp, corr, o.tau, hw) - z_ref).abs().flatten(1).mean(1))
            mask = confidence_mask(corr, hw, hw, o.tau, o.gamma, o.mask_majority_pool)[0] \
                if o.confidence_masking else None
            return rewarp, mask

        use = self.matching.f_y_iter is not None
        return interleaved_ddim(self.unet, self.scheduler, warped, noise, self._timesteps(),
                                rematch if use else None, o.rematch_steps if use else ())

    # ---- training ---------------------------------------------------------------------------------
    def train_step(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        phase = self.phase(step)
        self.last_trace = {"phase": phase, "losses": []}
        if phase == "ae":
            return self._first_stage_step(batch, step)
        o, hw = self.options, self.latent_hw
        self._measure_latent_scale(batch["image"])
        self.first_stage.requires_grad_(False)
        # The UNet learns during the warm-up only when it has no pretrained prior (official: frozen).
        unet_trains = self.unet is not None and (phase == "joint" or not self.pretrained)
        if self.unet is not None:
            self.unet.requires_grad_(unet_trains)
        image, exemplar = batch["image"], batch["exemplar"]
        with torch.no_grad():
            z_src, z_ref = self._latent(image), self._latent(exemplar)
        cond_l, fx, fy, tx, corr_ref = self._initial_match(batch["cond"], batch["exemplar_cond"], z_ref)
        fs = self.matching.f_y(z_src)
        corr_src = correlation(tx, self.matching.image_side(fs, cond_l))
        r_src = soft_warp(z_src, corr_src, o.tau, hw)
        r_ref = soft_warp(z_ref, corr_ref, o.tau, hw)

        losses: Dict[str, torch.Tensor] = {}
        if o.w_dom > 0:
            n_ref = feature_normalize(fy).detach()
            nx, ns = feature_normalize(fx), feature_normalize(fs)
            losses["L_dom"] = o.w_dom * (F.l1_loss(nx, ns) + F.l1_loss(n_ref * nx, n_ref * ns))
        cycle = F.l1_loss(warp_back(r_ref, corr_ref, o.tau, hw), z_ref) if o.w_cycle > 0 else None

        lat_ref, lat_src = r_ref, r_src
        if phase == "joint" and self.unet is not None:
            # Both branches in one batch: the exemplar warp and the GT self-warp (official src branch).
            b = z_ref.shape[0]
            cycles: List[torch.Tensor] = []
            res = self._diffuse(torch.cat([r_ref, r_src]), torch.cat([z_ref, z_src]), torch.cat([fx, fx]),
                                torch.cat([fy, fs]), torch.randn_like(torch.cat([r_ref, r_src])), cycles)
            lat_ref, lat_src = res.latent[:b], res.latent[b:]
            self.last_trace["steps"] = res.steps
            if cycle is not None:
                for c in cycles:  # official: one L1 for the exemplar branch, one for the GT branch
                    cycle = cycle + c[:b].mean() + c[b:].mean()
        if cycle is not None:
            losses["L_cycle"] = o.w_cycle * cycle

        f_gt = ({k: v.detach() for k, v in self.vgg(image).items()} if o.w_src > 0 or o.w_perc > 0 else {})
        if o.w_src > 0:
            f_src = self.vgg(self._image(lat_src))
            l_src = sum(w * F.l1_loss(f_src[k], f_gt[k]) for k, w in zip(VGG_LAYERS, SRC_WEIGHTS))
            if phase == "warmup":
                l_src = l_src + F.mse_loss(r_src, z_src)
            losses["L_src"] = o.w_src * l_src
        if o.w_perc > 0 or (o.w_style > 0 and phase == "joint"):
            f_out = self.vgg(self._image(lat_ref))
            if o.w_perc > 0:
                losses["L_perc"] = o.w_perc * F.l1_loss(f_out[o.perc_layer], f_gt[o.perc_layer])
            if o.w_style > 0 and phase == "joint":
                f_ex = self.vgg(exemplar)
                losses["L_style"] = o.w_style * sum(
                    w * contextual_loss(F.avg_pool2d(f_out[k], p) if p > 1 else f_out[k],
                                        (F.avg_pool2d(f_ex[k], p) if p > 1 else f_ex[k]).detach(),
                                        centre="pono", min_affinity=0.3)
                    for k, w, p in STYLE_TERMS)
        if o.w_diff > 0 and unet_trains:
            losses["L_diff"] = o.w_diff * self._diffusion_loss(z_src)

        total = sum(losses.values())
        opts = [self.opt_match] + ([self.opt_unet] if unet_trains else [])
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        total.backward()
        for opt in opts:
            opt.step()
        self.last_trace["losses"] = sorted(losses)
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["total"] = float(total.detach())
        return out

    def _diffusion_loss(self, z0: torch.Tensor) -> torch.Tensor:
        """Eq. 17 on the GT latent: eps-prediction MSE at t uniform in [0, first sampler timestep]
        (the only noise levels MIDMs evaluates; the official code uses one of its 4 steps)."""
        t_max = int(self._timesteps()[0])
        t = torch.randint(0, t_max + 1, (z0.shape[0],), device=z0.device)
        noise = torch.randn_like(z0)
        return F.mse_loss(self.unet(self.scheduler.add_noise(z0, noise, t), t).sample, noise)

    @torch.no_grad()
    def _measure_latent_scale(self, images: torch.Tensor) -> None:
        if float(self.latent_scale) > 0:
            return
        z = ae_stage.encode(self.first_stage, images)
        self.latent_scale.fill_(1.0 / float(z.flatten().std().clamp(min=1e-6)))

    def _cache_content(self, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        o, ctx = self.options, self.ctx
        ae_opts = {k: getattr(o, k) for k in ("ae_type", "ae_channels", "ae_channel_mult", "ae_layers_per_block",
                                              "ae_latent_channels", "ae_codebook_size", "ae_lr")}
        d = ctx.data
        return {"ae": ae_opts, "ae_steps": self.ae_steps, "width": ctx.width, "resolution": ctx.resolution,
                "seed": ctx.seed, "batch_size": int(batch["image"].shape[0]), "diffusers": diffusers.__version__,
                "data": {"name": d.name, "variant": d.variant, "split": d.split, "size": d.size, "params": d.params}}

    def _first_stage_step(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        key = None
        if self.ae_cache is not None:
            key = self.ae_cache.key(self._cache_content(batch))
            if not self._cache_checked:
                self._cache_checked = True
                cached = self.ae_cache.load(key)
                if cached is not None:
                    self.first_stage.load_state_dict(cached["state_dict"])
                    self.ae_done.fill_(True)
                    self.codebook_initialised.fill_(True)  # the trained stage's codebook
                    self.provenance["ldm.first_stage"] = f"cache:{self.ae_cache.path(key).name}"
        if bool(self.ae_done):
            # Cached stage: its steps pass, so phase boundaries stay those of an uncached trial.
            self.last_trace["ae_cache_hit"] = True
            return {"ae_cache_hit": 1.0}
        images = batch["image"]
        self.first_stage.requires_grad_(True)
        # The stage's random numbers (codebook init, KL posterior samples) come from a stream of its
        # own, seeded by (seed, step): the global stream the later phases draw from is then the same
        # whether this stage was trained here or loaded from the cache, so a trial's result does not
        # depend on which trial of a sweep filled the cache.
        devices = [self.ctx.device.index or 0] if self.ctx.device.type == "cuda" else []
        with private_rng(self.ctx.seed * 1_000_003 + step + FIRST_STAGE_SEED_OFFSET, devices):
            if ae_stage.is_vq(self.first_stage) and not bool(self.codebook_initialised):
                ae_stage.init_codebook_from_data(self.first_stage, images)
                self.codebook_initialised.fill_(True)
            loss, logs = ae_stage.reconstruction_loss(self.first_stage, images)
            self.opt_ae.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_ae.step()
        self.first_stage.requires_grad_(False)
        if step == self.ae_steps - 1:
            self.ae_done.fill_(True)
            if self.ae_cache is not None:
                self.ae_cache.save(key, self.first_stage, self._cache_content(batch))
        return logs

    # ---- inference --------------------------------------------------------------------------------
    def _generators(self, batch: Dict[str, torch.Tensor]) -> List[torch.Generator]:
        """One generator per sample, seeded by (run seed, sample index): outputs do not depend on
        batch composition."""
        b = batch["cond"].shape[0]
        idx = batch["index"].tolist() if "index" in batch else list(range(b))
        return [torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + int(i)) for i in idx]

    @torch.no_grad()
    def generate(self, batch: Dict[str, torch.Tensor]) -> MethodOutput:
        o, hw = self.options, self.latent_hw
        z_ref = self._latent(batch["exemplar"])
        _, fx, fy, _, corr = self._initial_match(batch["cond"], batch["exemplar_cond"], z_ref)
        warped = soft_warp(z_ref, corr, o.tau, hw)
        level = str(hw[0])
        warps = {level: self._image(warped).clamp(-1, 1)}
        trace: Dict[str, Any] = {"phase": "generate", "refined": False}
        latent = warped
        if self.unet is not None:
            gens = self._generators(batch)
            noise = torch.stack([torch.randn(warped.shape[1:], generator=g) for g in gens]).to(warped)
            res = self._diffuse(warped, z_ref, fx, fy, noise)
            latent, trace["steps"] = res.latent, res.steps
            if res.last_rewarp is not None:
                warps[f"{level}_rematch"] = self._image(res.last_rewarp).clamp(-1, 1)
            if o.refine_noise_level > 0:
                latent = refine(self.unet, self.scheduler, latent, o.refine_noise_level, o.refine_steps,
                                o.refine_eta, gens)
                trace["refined"] = True
        self.last_trace = trace
        return MethodOutput(output=self._image(latent).clamp(-1, 1), warps=warps)
