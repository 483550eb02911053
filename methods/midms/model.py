"""MIDMs (Seo et al., AAAI 2023): matching interleaved diffusion models, as the official code
(KU-CVLAB/MIDMs ``models/midms.py``, ``utils_training/optimize.py``) runs them, on diffusers models.

Pipeline (paper Fig. 2): exemplar and ground truth are encoded by the frozen first stage; ``F_X``
(condition, resized to the latent with nearest) and ``F_Y`` (latents) features go through the
shared trunk, are correlated (cosine, clamped, softmax temperature ``tau``) and the exemplar
latent is soft-warped. The warp is then denoised by one-step DDIM calls on the official grid
(noised at t = 311, steps 249/187/125/63), re-matching the x0 estimate to the exemplar through
``F_Y^iter`` before steps 1 and 2 and blending it in where the confidence mask (official
``fbcheck``) says so. At inference the result is re-noised to t = 101 and finished with 20
stochastic (eta 1) DDIM steps, then decoded.

Training (``train_epoch``): a warm-up trains the matching only (diffusion UNet frozen, no diffusion
step), then the UNet is unfrozen and gradients flow through the steps. The losses are the official
terms (``methods/midms/losses.py``) under the paper's names, each with a weight that is also its
ablation switch (0 = off): L_dom, L_cycle, L_src, L_perc, L_style, L_diff. Without pretrained
weights the trial first trains the autoencoder (``ae_fraction`` of the steps) and the UNet learns its
prior during the warm-up (LDM's eps loss) -- MIDMs itself always fine-tunes a pretrained LDM.
"""
from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import diffusers
import torch
import torch.nn.functional as F

from methods.base import ExemplarMethod, MethodContext, MethodOutput, scaled
from methods.common.vgg_caffe import BACKBONES as VGG_BACKBONES, VGG19Features
from methods.common.weights import private_rng
from methods.midms import autoencoder_stage as ae_stage
from methods.midms import losses as L
from methods.midms.components import (LatentDiffusionParts, build_first_stage, build_unet, load_pretrained_ldm,
                                      resolve_ldm_path)
from methods.midms.matching import (MASK_CHECKS, MatchingNetworks, centre_normalise, confidence_mask, correlation,
                                    soft_warp)
from methods.midms.recipes import RECIPES
from methods.midms.sampling import Carry, NoiseFn, Step, one_step_sample, sample_from
from methods.midms.schedule import DDIMTables, LDMSchedule, ddim_tables, interleaved_hijack_steps, ldm_schedule
from methods.registry import METHODS

FIRST_STAGE_SEED_OFFSET = 7_919  # keeps the first stage's per-step seeds apart from the sampling generators'
# Official optimiser (train.py): AdamW lr 3e-6 for both groups, torch's default betas, wd 0.05.
OFFICIAL_LR, OFFICIAL_BETAS = 3e-6, (0.9, 0.999)

Record = Optional[Dict[str, torch.Tensor]]


def _put(record: Record, name: str, value) -> None:
    if record is not None and value is not None:
        record[name] = value.detach() if torch.is_tensor(value) else value


@dataclass
class MIDMsOptions:
    # ---- latent diffusion model ------------------------------------------------------------------
    # A local diffusers-format LDM to fine-tune (official --diffusion_model_path, an LDM checkpoint):
    # one path, or {dataset name: path, "*": path}; None / datasets not listed train from scratch.
    pretrained_ldm: Optional[Union[str, Dict[str, str]]] = None
    # The LDM comes with the method's checkpoint (init_from, e.g. a converted official release):
    # built at the options' sizes, never trained as a first stage, UNet frozen in the warm-up.
    ldm_from_checkpoint: bool = False
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
    # Noise schedule (LDM "linear": betas = linspace(sqrt(start), sqrt(end), T)^2; celebahq-ldm-vq-4
    # 0.0015 -> 0.0195, T = 1000). A diffusers-format pretrained LDM brings its own.
    num_train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195

    # ---- sampling ---------------------------------------------------------------------------------
    # Official ddim_num_steps: 16 at inference, 4 x diffusion_iteratiom_num = 16 in training. Its
    # "uniform" grid has 17 entries (1000 // 16 = 62: t = 1, 63, ..., 993).
    num_inference_steps: int = 16
    # The paper's N = 25 % (Table 4): the last round(0.25 * 16) = 4 grid positions before the final
    # one are denoised (official t_list [12..15]: t = 249, 187, 125, 63), the warp noised one grid
    # step above the first (t = 311). 20 % -> 3 steps from 187 (noised at 249); 30 % -> 5 from 311.
    noise_level: float = 0.25
    # Official inference-only refinement: a 200-step DDIM with eta 1 from hijack_step 180, i.e. the
    # last round(0.1 * 200) = 20 steps (96 ... 1) after re-noising to t = 101. 0 = off. Not in the paper.
    refine_noise_level: float = 0.1
    refine_steps: int = 200
    refine_eta: float = 1.0
    # Where a chain's start is noised: "grid_above" = official, one grid step above its first step
    # (t = 311 for a first step at 249; the refinement 101 for 96); "first_step" = the paper's Eq. 7
    # (noised at the timestep the first step evaluates).
    noise_at: str = "grid_above"

    # ---- matching ---------------------------------------------------------------------------------
    match_channels: int = 256  # official N_CH
    match_hidden: int = 64  # ShallowAdaptiveFeatureGenerator ndf
    spade_hidden: int = 128  # SPADE MLP hidden
    maskmix: bool = True  # official --maskmix: semantics concatenated before the matching trunk
    # Condition map -> latent size. Official: nearest. "area" keeps 1-px edge maps that nearest
    # downsampling mostly drops (the embedded edge data); not official.
    cond_resize: str = "nearest"
    tau: float = 0.005  # softmax temperature (official soft_warp alpha / get_flow temp)

    # ---- components (Table 3) --------------------------------------------------------------------
    use_diffusion: bool = True  # False = "(-) Diffusion U-Net": decode the warp (no noising, no UNet)
    recurrent_matching: bool = True  # False = "(-) Recurrent matching": warp once, then plain DDIM
    rematch_steps: Tuple[int, ...] = (1, 2)  # official `idx in range(1, 3)`: re-match before steps 1 and 2
    confidence_masking: bool = True  # official --confidence_masking; False = "(-) Confidence masking"
    # "fbcheck": the official check (samples the forward flow at the forward position; see
    # matching.fbcheck); "cycle": the paper's forward-backward cycle (Eq. 10).
    mask_check: str = "fbcheck"
    gamma: float = 0.5  # error threshold in normalised [-1, 1] units (official fb < 0.5)
    mask_majority_pool: bool = True  # official: 2x2 average, nearest up, > 0.5

    # ---- losses (Table 5; 0 = off; losses.py has the official terms) -------------------------------
    w_dom: float = 10.0  # L_dom (Eq. 12) = official 10 * loss_domain
    w_cycle: float = 1.0  # L_cycle (Eq. 13) = loss_fb + loss_fb_iterative (latent cycles)
    # Official quirk: in the warm-up the forward returns its latent cycle as loss_fb_iterative and
    # train_epoch adds the same cycle again as loss_fb, so it counts twice. False counts it once.
    warmup_cycle_twice: bool = True
    # L_src (Eq. 14) = loss_feat (weighted VGG r12..r52 L1 of the decoded GT chain vs GT) + the
    # warm-up original_loss (MSE of the self-warped GT latent).
    w_src: float = 1.0
    w_perc: float = 0.002  # L_perc (Eq. 15): official weight_perceptual 0.002 (CelebA/DeepFashion; LSUN 0.05)
    perc_layer: str = "relu4_2"  # official which_perceptual -2 = r42 (LSUN: -1 = relu5_2)
    w_style: float = 1.0  # L_style (Eq. 16): loss_context (after the warm-up, as official)
    # L_diff: "x0" = official original_loss after the warm-up: MSE of the x0 prediction of one
    # one-step DDIM call from the GT latent (noised one grid step above, as every first step) at a
    # random step of the chain. "eps" = the paper's Eq. 17: eps-MSE at t uniform up to the noising
    # level. A from-scratch UNet learns its prior in the warm-up with the eps loss in both cases.
    w_diff: float = 1.0
    diff_loss: str = "x0"
    vgg_backbone: str = "caffe"  # official models/vgg19_conv.pth (vgg_normal_correct); or "torchvision"

    # ---- schedule and optimisation ----------------------------------------------------------------
    # Official warmup_iter 10000 of ~14000 iterations (4 epochs x 28k CelebA-HQ images / 8 GPUs).
    warmup_fraction: float = 0.7
    unet_lr_scale: float = 1.0  # official lr_diff_backbone = lr = 3e-6 (the paper text says 1.5e-7 = x0.05)
    weight_decay: float = 0.05  # official AdamW weight decay
    # Official MultiStepLR, stepped per epoch: x lr_gamma at each milestone epoch (none of them is
    # reached in the official 4 epochs; epochs here = samples seen / dataset size).
    lr_milestones: Tuple[int, ...] = (10, 12, 14, 24)
    lr_gamma: float = 0.3

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
            (self.mask_check in MASK_CHECKS, f"mask_check must be one of {list(MASK_CHECKS)}"),
            (self.diff_loss in ("x0", "eps"), "diff_loss must be 'x0' or 'eps'"),
            (self.noise_at in ("grid_above", "first_step"), "noise_at must be 'grid_above' or 'first_step'"),
            (self.vgg_backbone in VGG_BACKBONES, f"vgg_backbone must be one of {list(VGG_BACKBONES)}"),
            (0.0 <= self.ae_fraction < 1.0, "ae_fraction must be in [0, 1)"),
            (0.0 <= self.warmup_fraction <= 1.0, "warmup_fraction must be in [0, 1]"),
            (0.0 < self.noise_level <= 1.0, "noise_level must be in (0, 1]"),
            (0.0 <= self.refine_noise_level < 1.0, "refine_noise_level must be in [0, 1)"),
            (self.tau > 0 and self.gamma > 0, "tau and gamma must be > 0"),
            (self.perc_layer in L.VGG_LAYERS, f"perc_layer must be one of {list(L.VGG_LAYERS)}"),
            (all(getattr(self, w) >= 0 for w in ("w_dom", "w_cycle", "w_src", "w_perc", "w_style", "w_diff")),
             "loss weights must be >= 0"),
            (self.num_inference_steps >= 2, "num_inference_steps must be >= 2"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"midms options: {msg}")
        n = len(self.positions())
        if self.use_diffusion and self.recurrent_matching:
            bad = [k for k in self.rematch_steps if not 1 <= k < n]
            if bad:
                raise ValueError(f"midms options: rematch_steps {bad} outside 1..{n - 1} (noise_level "
                                 f"{self.noise_level} gives {n} denoising steps; step 0 has no x0 estimate yet)")

    def positions(self) -> List[int]:
        """The grid positions the interleaved chain denoises: the official t_list generalised to
        the last n = round(noise_level * S) positions before the grid's final one (S = 16, 25 %:
        [12, 13, 14, 15])."""
        n = int(round(self.noise_level * self.num_inference_steps))
        try:
            return interleaved_hijack_steps(self.num_inference_steps, n)
        except ValueError as exc:
            raise ValueError(f"midms options: noise_level {self.noise_level} x num_inference_steps "
                             f"{self.num_inference_steps}: {exc}") from None

    def refine_start(self) -> int:
        """Official hijack_step of the refinement sampler: 200 - round(0.1 * 200) = 180."""
        return self.refine_steps - int(round(self.refine_noise_level * self.refine_steps))


@dataclass
class Matching:
    """The first matching: features, correlations (flat, query = condition) and warps."""

    fx: torch.Tensor  # F_X(condition) (official trg_matching_feats)
    fy: torch.Tensor  # F_Y(exemplar latent) (ref_matching_feats)
    corr_ref: torch.Tensor
    warped_ref: torch.Tensor
    fs: Optional[torch.Tensor] = None  # F_Y(ground-truth latent) (src_matching_feats), training only
    corr_src: Optional[torch.Tensor] = None
    warped_src: Optional[torch.Tensor] = None


@dataclass
class Chains:
    """The result of the interleaved steps."""

    x0_ref: torch.Tensor  # the translation's last x0 estimate (official pred_ref_x0)
    x0_src: Optional[torch.Tensor] = None  # the ground-truth chain's (pred_src_x0)
    original_x0: Optional[torch.Tensor] = None  # the one-step x0 from the GT latent (original_loss)
    rematch_cycles: List[torch.Tensor] = dataclasses.field(default_factory=list)  # official loss_fb increments
    last_rewarp: Optional[torch.Tensor] = None
    mask_fractions: List[float] = dataclasses.field(default_factory=list)


@METHODS.register("midms")
class MIDMsMethod(ExemplarMethod):
    Options = MIDMsOptions
    has_warp = True
    recipes = RECIPES
    pretrained_exclude = ("vgg.",)  # the loss VGG is loaded by the method itself

    def __init__(self, options: MIDMsOptions, ctx: MethodContext):
        super().__init__(options, ctx)
        o = options
        ldm_path = None if o.ldm_from_checkpoint else resolve_ldm_path(o.pretrained_ldm, ctx.data.name)
        parts = self._pretrained_parts(ldm_path, o) if ldm_path else self._built_parts(o, ctx)
        self.pretrained = parts.pretrained or o.ldm_from_checkpoint
        self.provenance.update(parts.provenance)
        self.first_stage = parts.first_stage.requires_grad_(False)
        self.unet = parts.unet
        self.schedule, self.ddim, self.ddim_refine = self._schedules(parts, o)
        factor = 2 ** (len(self.first_stage.config.block_out_channels) - 1)
        if ctx.resolution % factor:
            raise ValueError(f"midms: resolution {ctx.resolution} is not divisible by the first stage's "
                             f"downsampling factor {factor}")
        self.latent_hw = (ctx.resolution // factor, ctx.resolution // factor)
        latent_ch = self.first_stage.config.latent_channels
        # 0 = not measured yet (scale_by_std happens at the first step after the first stage trained).
        self.register_buffer("latent_scale", torch.tensor(float(parts.latent_scale or 0.0)))
        self.register_buffer("ae_done", torch.tensor(self.pretrained))
        self.register_buffer("codebook_initialised", torch.tensor(self.pretrained))
        self.matching = MatchingNetworks(
            latent_ch, ctx.data.cond_channels, scaled(o.match_channels, ctx.width, 8),
            scaled(o.match_hidden, ctx.width), scaled(o.spade_hidden, ctx.width),
            maskmix=o.maskmix, recurrent=o.use_diffusion and o.recurrent_matching)
        self.vgg = None
        if ctx.training and (o.w_src > 0 or o.w_perc > 0 or o.w_style > 0):
            self.vgg = VGG19Features(o.vgg_backbone, L.VGG_LAYERS, ctx.backbones,
                                     purpose="MIDMs' VGG19 losses (L_src, L_perc, L_style)")
            self.provenance["vgg19_loss"] = self.vgg.provenance
        # Phases over the trial's steps: [first stage][warm-up: matching only][joint].
        total = max(1, ctx.total_steps)
        self.ae_steps = 0 if self.pretrained else max(1, int(round(o.ae_fraction * total)))
        self.warmup_end = self.ae_steps + int(round(o.warmup_fraction * (total - self.ae_steps)))
        self.ae_cache = ae_stage.FirstStageCache(o.ae_cache_dir) if (o.ae_cache_dir and not self.pretrained) else None
        self._cache_checked = False
        self.last_trace: Dict[str, Any] = {}
        self.to(ctx.device)
        self.opt_match = self.opt_unet = self.opt_ae = None
        if ctx.training:
            optim = ctx.official_optim(lr_g=OFFICIAL_LR, beta1=OFFICIAL_BETAS[0], beta2=OFFICIAL_BETAS[1])
            betas = (optim["beta1"], optim["beta2"])
            self.opt_match = torch.optim.AdamW(self.matching.parameters(), lr=optim["lr_g"], betas=betas,
                                               weight_decay=o.weight_decay)
            if self.unet is not None:
                self.opt_unet = torch.optim.AdamW(self.unet.parameters(), lr=optim["lr_g"] * o.unet_lr_scale,
                                                  betas=betas, weight_decay=o.weight_decay)
            if not self.pretrained:
                self.opt_ae = torch.optim.Adam(self.first_stage.parameters(), lr=o.ae_lr, betas=(0.5, 0.9))
            self.resolved.update({"optimizer": "AdamW", "lr_match": optim["lr_g"],
                                  "lr_unet": optim["lr_g"] * o.unet_lr_scale, "beta1": betas[0], "beta2": betas[1],
                                  "weight_decay": o.weight_decay,
                                  "lr_schedule": f"MultiStepLR(epochs {list(o.lr_milestones)}, gamma {o.lr_gamma})"})

    # ---- construction -------------------------------------------------------------------------------
    @staticmethod
    def _built_parts(o: MIDMsOptions, ctx: MethodContext) -> LatentDiffusionParts:
        """The LDM at the options' sizes (x width): trained from scratch, or filled by a checkpoint."""
        ae = build_first_stage(o.ae_type, o.ae_channels, o.ae_channel_mult, o.ae_layers_per_block,
                               o.ae_latent_channels, o.ae_codebook_size, ctx.width, ctx.resolution)
        latent = ctx.resolution // 2 ** (len(o.ae_channel_mult) - 1)
        unet = (build_unet(o.unet_channels, o.unet_channel_mult, o.unet_layers_per_block, o.unet_attention_levels,
                           o.unet_head_channels, o.ae_latent_channels, latent, ctx.width)
                if o.use_diffusion else None)
        origin = "checkpoint" if o.ldm_from_checkpoint else f"scratch(seed={ctx.seed})"
        prov = {"ldm.first_stage": origin}
        if unet is not None:
            prov["ldm.unet"] = origin
        # MIDMs never applies LDM's scale_factor (it calls first_stage_model.encode/decode itself).
        scale = 1.0 if (o.ldm_from_checkpoint or not o.scale_by_std) else None
        return LatentDiffusionParts(first_stage=ae, unet=unet, latent_scale=scale, provenance=prov, scheduler=None)

    @staticmethod
    def _pretrained_parts(path: str, o: MIDMsOptions) -> LatentDiffusionParts:
        # Only the returned scheduler's betas are read (_schedules): its sampling settings do not matter.
        return load_pretrained_ldm(path, "leading", False, need_unet=o.use_diffusion)

    @staticmethod
    def _schedules(parts: LatentDiffusionParts, o: MIDMsOptions) -> Tuple[LDMSchedule, DDIMTables, DDIMTables]:
        """LDM's schedule (q_sample) and the two official DDIM tables (interleaved: S steps, eta 0;
        refinement: ``refine_steps``, ``refine_eta``): a pretrained LDM's own betas, else the
        options' LDM "linear" schedule."""
        with torch.device("cpu"):  # small tables, computed with numpy: also when the model is built on meta
            if parts.scheduler is not None:
                schedule = _schedule_of(parts.scheduler.config)
            else:
                schedule = ldm_schedule({"timesteps": o.num_train_timesteps, "linear_start": o.beta_start,
                                         "linear_end": o.beta_end})
            return (schedule, ddim_tables(schedule.alphas_cumprod, o.num_inference_steps, 0.0),
                    ddim_tables(schedule.alphas_cumprod, o.refine_steps, o.refine_eta))

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
        return ae_stage.encode(self.first_stage, images) * self._scale().to(images.dtype)

    def _image(self, latents: torch.Tensor) -> torch.Tensor:
        return ae_stage.decode(self.first_stage, latents / self._scale().to(latents.dtype))

    def _semantics(self, cond: torch.Tensor) -> torch.Tensor:
        cond = cond if cond.is_floating_point() else cond.float()
        return F.interpolate(cond, size=self.latent_hw, mode=self.options.cond_resize)

    def _eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample

    # ---- matching ---------------------------------------------------------------------------------
    def match(self, cond: torch.Tensor, exemplar_cond: torch.Tensor, z_ref: torch.Tensor,
              z_src: Optional[torch.Tensor] = None, record: Record = None) -> Matching:
        """The first matching (official forward, before the diffusion). Networks run in the
        official order -- F_X, F_Y(ground truth), F_Y(exemplar) -- which matters in train mode,
        where every spectral-norm call advances its power iteration."""
        m, tau, hw = self.matching, self.options.tau, self.latent_hw
        cond_l, ref_l = self._semantics(cond), self._semantics(exemplar_cond)
        fx = m.f_x(cond_l)
        fs = m.f_y(z_src) if z_src is not None else None
        fy = m.f_y(z_ref)
        t_trg = m.trunk(fx, cond_l)
        query = m.theta(t_trg)
        t_ref = m.trunk(fy, ref_l)
        key_ref = m.phi(t_ref)
        q = centre_normalise(query)
        corr_ref = correlation(q, centre_normalise(key_ref))
        out = Matching(fx, fy, corr_ref, soft_warp(z_ref, corr_ref, tau, hw))
        if z_src is not None:
            # The ground truth shares the condition's semantics (official: input_semantics).
            t_src = m.trunk(fs, cond_l)
            key_src = m.phi(t_src)
            out.fs, out.corr_src = fs, correlation(q, centre_normalise(key_src))
            out.warped_src = soft_warp(z_src, out.corr_src, tau, hw)
            for name, v in (("F_Y/real_enc_src", fs), ("trunk/layer_src", t_src), ("phi/src", key_src),
                            ("corr_src", out.corr_src), ("warped_latent/src", out.warped_src)):
                _put(record, name, v)
        for name, v in (("F_X/seg_enc", fx), ("F_Y/real_enc_ref", fy), ("trunk/layer_trg", t_trg),
                        ("trunk/layer_ref", t_ref), ("theta/trg", query), ("phi/ref", key_ref),
                        ("corr_ref", corr_ref), ("warped_latent/ref", out.warped_ref)):
            _put(record, name, v)
        return out

    def _rematch(self, x0: torch.Tensor, fx: torch.Tensor, f_target: torch.Tensor, z: torch.Tensor,
                 record: Record):
        """In-domain re-matching (Eq. 8): ``F_Y^iter(x0; F_X)`` against ``F_Y`` of the latent ``z``
        (its own features, not the trunk's), and the re-warp of ``z``."""
        feats = self.matching.f_y_iter(x0, fx)
        if record is not None:
            calls = record.setdefault("_iter_enc_calls", [])
            calls.append(feats.detach())
        corr = correlation(centre_normalise(feats), centre_normalise(f_target))
        return corr, soft_warp(z, corr, self.options.tau, self.latent_hw)

    # ---- the interleaved steps ----------------------------------------------------------------------
    def interleave(self, mt: Matching, z_ref: torch.Tensor, noise_fn: NoiseFn, z_src: Optional[torch.Tensor] = None,
                   original_idx: Optional[int] = None, record: Record = None) -> Chains:
        """The official ``e2e_recurrent`` loop: before the steps in ``rematch_steps`` the exemplar
        chain's x0 is re-matched and blended by the confidence mask (and, given ``z_src``, the
        ground-truth chain is re-matched for the cycle loss only); then one DDIM step per chain, and
        at step ``original_idx`` one step from the noised ground-truth latent (``original_loss``).
        Noise is drawn from ``noise_fn`` in the official order (per step: exemplar, ground truth,
        original)."""
        o, q, tables = self.options, self.schedule, self.ddim
        above = o.noise_at == "grid_above"
        rematching = self.matching.f_y_iter is not None
        out = Chains(x0_ref=mt.warped_ref, x0_src=mt.warped_src)
        _put(record, "debug/pred_ref_x0", mt.warped_ref)
        carry_ref: Optional[Carry] = None
        carry_src: Optional[Carry] = None
        for idx, position in enumerate(o.positions()):
            if rematching and idx in o.rematch_steps:
                corr, rewarp = self._rematch(out.x0_ref, mt.fx, mt.fy, z_ref, record)
                if z_src is not None:  # training (or the official inference replayed): the cycle terms
                    corr_s, rewarp_s = self._rematch(out.x0_src, mt.fx, mt.fs, z_src, record)
                    out.rematch_cycles += [L.rewarp_cycle_loss(rewarp, corr, z_ref, o.tau),
                                           L.rewarp_cycle_loss(rewarp_s, corr_s, z_src, o.tau)]
                out.last_rewarp = rewarp
                _put(record, f"debug/{idx}_pred_ref_x0_new", rewarp)
                if o.confidence_masking:
                    cm = confidence_mask(corr, self.latent_hw, self.latent_hw, o.tau, o.gamma, o.mask_check,
                                         o.mask_majority_pool)
                    out.x0_ref = rewarp * cm.mask + out.x0_ref * (1 - cm.mask)  # official blend, as written
                    out.mask_fractions.append(float(cm.mask.mean()))
                    _put(record, f"debug/{idx}_fb_mask", cm.mask)
                else:
                    out.x0_ref = rewarp
                _put(record, f"debug/{idx}_pred_ref_x0", out.x0_ref)
            step = one_step_sample(self._eps, q, tables, out.x0_ref, position, carry_ref, noise_fn, above)
            out.x0_ref, carry_ref = step.pred_x0, step.carry
            _record_step(record, position, "ref", step)
            if z_src is not None:
                step = one_step_sample(self._eps, q, tables, out.x0_src, position, carry_src, noise_fn, above)
                out.x0_src, carry_src = step.pred_x0, step.carry
                _record_step(record, position, "src", step)
            if idx == original_idx:
                step = one_step_sample(self._eps, q, tables, z_src, position, None, noise_fn, above)
                out.original_x0 = step.pred_x0
                _record_step(record, position, "original", step)
        return out

    def refine(self, x0: torch.Tensor, noise_fn: NoiseFn) -> torch.Tensor:
        """The official inference refinement (``copied_diffusion_sampler.sample(200, eta=1,
        hijack_step=180)``): re-noise, run the rest of the stochastic grid, return its last x0."""
        o = self.options
        return sample_from(self._eps, self.schedule, self.ddim_refine, x0, o.refine_start(), noise_fn,
                           noise_above=o.noise_at == "grid_above")

    # ---- losses ---------------------------------------------------------------------------------------
    def loss_terms(self, batch: Dict[str, torch.Tensor], joint: bool, noise_fn: NoiseFn,
                   original_idx: Optional[int] = None, needed: Optional[set] = None,
                   record: Record = None) -> Dict[str, torch.Tensor]:
        """The official loss terms of one ``train_epoch`` iteration, by official name (``losses.py``):
        warm-up (``joint=False``: no diffusion step) or interleaved. ``needed`` limits the VGG terms
        computed (None: all, as the official code computes them)."""
        o = self.options
        image, exemplar = batch["image"], batch["exemplar"]
        with torch.no_grad():
            z_src, z_ref = self._latent(image), self._latent(exemplar)
        _put(record, "latent/src", z_src)
        _put(record, "latent/ref", z_ref)
        mt = self.match(batch["cond"], batch["exemplar_cond"], z_ref, z_src, record)
        diffuse = joint and self.unet is not None
        terms: Dict[str, torch.Tensor] = {}
        cycle = L.cycle_loss(z_ref, mt.corr_ref, o.tau)
        terms["loss_fb"] = cycle
        if diffuse:
            x0_loss = o.diff_loss == "x0"
            if x0_loss and original_idx is None:
                original_idx = int(torch.randint(len(o.positions()), ()))
            chains = self.interleave(mt, z_ref, noise_fn, z_src, original_idx if x0_loss else None, record)
            x0_ref, x0_src = chains.x0_ref, chains.x0_src
            terms["original_loss"] = F.mse_loss(chains.original_x0, z_src) if x0_loss else self._eps_loss(z_src)
            terms["loss_fb_iterative"] = sum(chains.rematch_cycles) if chains.rematch_cycles else cycle.new_zeros(())
            self.last_trace["mask_fractions"] = chains.mask_fractions
        else:  # the warm-up (or no UNet at all): no diffusion step
            x0_ref, x0_src = mt.warped_ref, mt.warped_src
            terms["original_loss"] = F.mse_loss(mt.warped_src, z_src)
            # Official warm-up: the forward returns its own latent cycle as loss_fb_iterative.
            twice = o.warmup_cycle_twice and not joint
            terms["loss_fb_iterative"] = cycle if twice else cycle.new_zeros(())
        terms["loss_domain"] = L.domain_loss(mt.fx, mt.fs, mt.fy)
        want = (lambda k: True) if needed is None else (lambda k: k in needed)
        if self.vgg is not None and (want("loss_feat") or want("loss_perc") or want("loss_context")):
            warped_src, warped_ref = self._image(x0_src), self._image(x0_ref)
            _put(record, "warped_src", warped_src)
            _put(record, "warped_ref", warped_ref)
            f_gt = self.vgg(image)
            if want("loss_feat"):
                f_src = self.vgg(warped_src)
                terms["loss_feat"] = L.feat_loss(f_src, f_gt)
                _put_feats(record, "vgg/warped_src_feat", f_src)
            if want("loss_perc") or want("loss_context"):
                f_out = self.vgg(warped_ref)
                _put_feats(record, "vgg/warped_ref_feat", f_out)
                if want("loss_perc"):
                    terms["loss_perc"] = L.perceptual_loss(f_out, f_gt, o.perc_layer)
                if want("loss_context"):
                    f_ex = self.vgg(exemplar)
                    terms["loss_context"] = L.style_loss(f_out, f_ex)
                    _put_feats(record, "vgg/ref_feat", f_ex)
            _put_feats(record, "vgg/src_feat", f_gt)
        for k, v in terms.items():
            _put(record, f"loss/{k}", v)
        return terms

    def weighted_losses(self, terms: Dict[str, torch.Tensor], joint: bool, with_context: bool
                        ) -> Dict[str, torch.Tensor]:
        """The paper's terms from the official ones, each times its switch. With the default
        weights their sum is the official ``Loss`` (10 loss_domain + loss_fb + 0.002 loss_perc +
        loss_feat + original_loss + loss_fb_iterative, + loss_context after the warm-up)."""
        o = self.options
        out: Dict[str, torch.Tensor] = {}
        if o.w_dom > 0:
            out["L_dom"] = o.w_dom * terms["loss_domain"]
        if o.w_cycle > 0:
            out["L_cycle"] = o.w_cycle * (terms["loss_fb"] + terms["loss_fb_iterative"])
        if o.w_src > 0 and "loss_feat" in terms:
            out["L_src"] = o.w_src * (terms["loss_feat"] + (0 if joint else terms["original_loss"]))
        if o.w_perc > 0 and "loss_perc" in terms:
            out["L_perc"] = o.w_perc * terms["loss_perc"]
        if o.w_style > 0 and with_context and "loss_context" in terms:
            out["L_style"] = o.w_style * terms["loss_context"]
        if o.w_diff > 0 and joint and self.unet is not None:
            out["L_diff"] = o.w_diff * terms["original_loss"]
        return out

    # ---- training ---------------------------------------------------------------------------------
    def train_step(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        phase = self.phase(step)
        self.last_trace = {"phase": phase, "losses": []}
        if phase == "ae":
            return self._first_stage_step(batch, step)
        o = self.options
        self._measure_latent_scale(batch["image"])
        self.first_stage.requires_grad_(False)
        joint = phase == "joint"
        # The UNet learns during the warm-up only when it has no pretrained prior (official: frozen).
        unet_trains = self.unet is not None and (joint or not self.pretrained)
        if self.unet is not None:
            self.unet.requires_grad_(unet_trains)
        # Official: the contextual loss joins at n_iter > warmup_iter, one step after the diffusion.
        with_context = step > self.warmup_end
        needed = {k for k, w in (("loss_feat", o.w_src), ("loss_perc", o.w_perc),
                                 ("loss_context", o.w_style if with_context else 0.0)) if w > 0}
        terms = self.loss_terms(batch, joint, torch.randn_like, needed=needed)
        losses = self.weighted_losses(terms, joint, with_context)
        if o.w_diff > 0 and unet_trains and not joint:
            losses["L_diff"] = o.w_diff * self._eps_loss(self._latent(batch["image"]))  # scratch UNet prior
        total = sum(losses.values())
        opts = [self.opt_match] + ([self.opt_unet] if unet_trains else [])
        self._set_lr(batch["image"].shape[0], step)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        total.backward()
        for opt in opts:
            opt.step()
        self.last_trace["losses"] = sorted(losses)
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["total"] = float(total.detach())
        return out

    def _set_lr(self, batch_size: int, step: int) -> None:
        """MultiStepLR's closed form at the current epoch (samples seen since the matching started
        training / dataset size)."""
        o, size = self.options, self.ctx.data.size
        epoch = (max(0, step - self.ae_steps) * batch_size) // size if size > 0 else 0
        factor = o.lr_gamma ** bisect.bisect_right(sorted(o.lr_milestones), epoch)
        for opt, key in ((self.opt_match, "lr_match"), (self.opt_unet, "lr_unet")):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = self.resolved[key] * factor

    def _eps_loss(self, z0: torch.Tensor) -> torch.Tensor:
        """LDM's eps-MSE on the latent ``z0`` at t uniform in [0, the interleaved chain's noising
        timestep] (the noise levels MIDMs evaluates): the paper's L_diff (Eq. 17) and the prior of
        a from-scratch UNet."""
        first = self.options.positions()[0]
        t_max = int(self.ddim.time_range[first - 1 if self.options.noise_at == "grid_above" else first])
        t = torch.randint(0, t_max + 1, (z0.shape[0],), device=z0.device)
        noise = torch.randn_like(z0)
        return F.mse_loss(self._eps(self.schedule.q_sample(z0, t, noise), t), noise)

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
    def _noise(self, batch: Dict[str, torch.Tensor]) -> NoiseFn:
        """Noise from one generator per sample, seeded by (run seed, sample index): outputs do not
        depend on batch composition."""
        b = batch["cond"].shape[0]
        idx = batch["index"].tolist() if "index" in batch else list(range(b))
        gens = [torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + int(i)) for i in idx]
        return lambda like: torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens]).to(like)

    @torch.no_grad()
    def translate(self, batch: Dict[str, torch.Tensor], noise_fn: NoiseFn, with_gt_chain: bool = False,
                  original_idx: Optional[int] = None, record: Record = None) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """The official inference (``mode='inference'``): the translation's final latent and what
        the warps/trace need. ``with_gt_chain`` also runs the ground-truth chain and the 'original'
        step the official inference computes (and discards) -- only to reproduce its random draws
        and intermediates; the translation does not depend on them."""
        o = self.options
        z_ref = self._latent(batch["exemplar"])
        z_src = self._latent(batch["image"]) if with_gt_chain else None
        mt = self.match(batch["cond"], batch["exemplar_cond"], z_ref, z_src, record)
        info: Dict[str, Any] = {"warped": mt.warped_ref, "last_rewarp": None, "refined": False}
        latent = mt.warped_ref
        if self.unet is not None:
            chains = self.interleave(mt, z_ref, noise_fn, z_src, original_idx if with_gt_chain else None, record)
            latent, info["last_rewarp"] = chains.x0_ref, chains.last_rewarp
            info["mask_fractions"] = chains.mask_fractions
            if o.refine_noise_level > 0:
                latent = self.refine(latent, noise_fn)
                info["refined"] = True
        return latent, info

    @torch.no_grad()
    def generate(self, batch: Dict[str, torch.Tensor]) -> MethodOutput:
        latent, info = self.translate(batch, self._noise(batch))
        level = str(self.latent_hw[0])
        warps = {level: self._image(info["warped"]).clamp(-1, 1)}
        if info["last_rewarp"] is not None:
            warps[f"{level}_rematch"] = self._image(info["last_rewarp"]).clamp(-1, 1)
        self.last_trace = {"phase": "generate", "refined": info["refined"],
                           "mask_fractions": info.get("mask_fractions", [])}
        return MethodOutput(output=self._image(latent).clamp(-1, 1), warps=warps)


def _schedule_of(config: Dict[str, Any]) -> LDMSchedule:
    """LDM's schedule from a diffusers scheduler config: its ``trained_betas`` (an LDM converted by
    ``components``), or diffusers' ``scaled_linear`` (LDM's "linear") / ``linear`` (LDM's
    "sqrt_linear")."""
    if config.get("trained_betas") is not None:
        return LDMSchedule.from_betas(torch.as_tensor(config["trained_betas"], dtype=torch.float64))
    names = {"scaled_linear": "linear", "linear": "sqrt_linear"}
    if config.get("beta_schedule") not in names:
        raise ValueError(f"midms: the pretrained LDM's scheduler has beta_schedule {config.get('beta_schedule')!r}; "
                         f"supported: {sorted(names)}")
    return ldm_schedule({"timesteps": config["num_train_timesteps"], "linear_start": config["beta_start"],
                         "linear_end": config["beta_end"], "beta_schedule": names[config["beta_schedule"]]})


def _record_step(record: Record, position: int, chain: str, step: Step) -> None:
    if record is not None:
        for name, v in (("x_prev", step.x_prev), ("pred_x0", step.pred_x0), ("ddim_param_dir_xt", step.carry.dir_xt)):
            record[f"steps/t{position}_{chain}/{name}"] = v.detach()


def _put_feats(record: Record, prefix: str, feats: Dict[str, torch.Tensor]) -> None:
    if record is not None:
        for k, v in feats.items():
            record[f"{prefix}/r{k[4]}{k[6]}"] = v.detach()
