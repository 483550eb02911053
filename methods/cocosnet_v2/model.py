"""CoCosNet v2 (Zhou et al., CVPR 2021): full-resolution correspondence by hierarchical
GRU-assisted PatchMatch, jointly trained with a SPADE translation network.

Defaults are the official code's (microsoft/CoCosNet-v2 @5ebd60c, its README training command;
reference/methods.md 1.2, 2.2; docs/methods.md (CoCosNet v2) lists every difference from the paper
and the options that give the paper's variant). Pipeline (official ``NoVGGHPMCorrespondence`` +
``SPADEGenerator``):

1. Two multi-level U-Net encoders (``encoder.MultiLevelEncoder``): M_A on the condition, M_B on
   the exemplar RGB concatenated with the exemplar's condition (official ``ref_input``). Every
   level is L2-normalised, projected by a 1x1 theta_l / phi_l to ``nef`` channels, centred over
   channels and normalised again (``match_kernel 1``, ``--PONO_C``).
2. ``patchmatch.HierarchicalPatchMatch``: dense softmax matching at the coarsest level, K = 16
   candidates + propagation + ConvGRU at each finer level, soft warp over K (Eq. 8), every level
   warping the exemplar average-pooled to its size.
3. Translation network: all warps, nearest-upsampled to the output size, concatenated with the
   condition, drive positional-normalisation SPADE blocks (official v2 generator: fc at R/32,
   8ngf trunk, five x2 upsamplings, no attention).

Losses (each weight 0 = off; our key = official key):

====================  ===========================================================  ==================
returned key          what                                                         option (default)
====================  ===========================================================  ==================
``G_align``           L_align, Eq. 11: L1(M_A(x_A), M_B(x_B)) per level             lambda_align (10)
                      (``no_vgg_feat``)
``G_corr``            L_corr, Eq. 12: every level's warp vs the pooled ground      lambda_corr (500)
                      truth, self-reference samples (``G_warp_self``)
``G_warp_cycle``      dense level's warp warped back vs the pooled exemplar        lambda_warp_cycle (1)
``G_map``             L_map, Eq. 13-14 with the reconstruction network R           lambda_map (0; paper only)
``G_perc``            L_sem, Eq. 15: MSE of VGG r42 to the ground truth (``perc``)   lambda_perc (0.001)
``G_fm``              L_app feature matching: VGG r12..r52 L1, weights 1/32..1,     lambda_vgg x fm_ratio (10)
                      self-reference samples (``fm``)
``G_contextual``      L_app contextual: 8 CX(r52) + 4 CX(r42) + 2 CX(pool r32)      lambda_vgg x lambda_contextual (10)
                      to the exemplar (``contextual``)
``G_gan``/``G_gan_feat``  hinge GAN / D feature matching (``GAN``/``GAN_Feat``)     lambda_gan / lambda_gan_feat (10)
``D_fake``/``D_real``  hinge D terms x lambda_gan (``D_Fake``/``D_real``)
====================  ===========================================================  ==================

Self-reference losses (``G_corr``, ``G_fm``) are the official ``mean(|x - y| * w)`` with
``w = self_ref / (sum(self_ref) + 1e-5)``: a weighted mean further divided by the batch size
(the official per-GPU batch was 2 of 16 on 8 GPUs; ``self_ref_reduction: weighted_mean`` drops
that 1/B). The dense level's cycle warp is on in training whenever ``lambda_warp_cycle > 0``
(official: gated by ``opt.phase is 'train'``, true for the default phase).

Training pairs. The paper (Sec. 3.4) trains with a *pseudo exemplar* T(x_B): flip, random crop
and a piecewise-smooth warp of the ground truth. The official DeepFashion-HD command uses real
same-person pairs (``--video_like``): ``real_reference_probability: 1`` with ``use_target_as_gt``
(the recipe ``deepfashion``, ``recipes.py``) takes the dataset's exemplar and its ``target``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import ExemplarMethod, MethodContext, MethodOutput, scaled
from methods.cocosnet_v2.encoder import PONO_EPS, MultiLevelEncoder, Reconstructor, level_channels
from methods.cocosnet_v2.patchmatch import (GRU_SCORES, HIDDEN_INITS, MATCH_EPS, REFINE_GRADS, REFINEMENTS,
                                            HierarchicalPatchMatch, LevelResult, normalize_pono_c)
from methods.cocosnet_v2.recipes import RECIPES
from methods.common.contextual import contextual_loss
from methods.common.correspondence import feature_normalize
from methods.common.discriminator import MultiscaleDiscriminator
from methods.common.init import official_init
from methods.common.losses import feature_matching_loss
from methods.common.spade_blocks import SPADEResBlock
from methods.common.vgg_caffe import OFFICIAL_NAMES, VGG19Features
from methods.registry import METHODS

# Official optimiser (``create_optimizers`` with TTUR at the README's --lr 1e-4): G lr/2, D 2 lr,
# betas (0, 0.9); Adam eps 1e-3 for G (netG + netCorr), default for D.
OFFICIAL_OPTIM = {"lr_g": 5e-5, "lr_d": 2e-4, "beta1": 0.0, "beta2": 0.9}
FM_WEIGHTS = (("r12", 1.0 / 32), ("r22", 1.0 / 16), ("r32", 1.0 / 8), ("r42", 1.0 / 4), ("r52", 1.0))


@dataclass
class CoCosNetV2Options:
    # --- correspondence -----------------------------------------------------------------------
    # Correspondence levels as downsampling factors of the run's resolution, coarsest first, each
    # half the previous one. (8, 4, 2, 1) is the paper's 64/128/256/512 ladder at 512^2 (appendix B)
    # and 8/16/32/64 at 64^2. Table 4's variants are the prefixes (8,), (8, 4), (8, 4, 2).
    levels: Tuple[int, ...] = (8, 4, 2, 1)
    # Table 5: propagation | gru | propagation+conv | propagation+gru (the paper's and official model)
    refinement: str = "propagation+gru"
    # official_nograd (official code: candidates truncated to indices under no_grad; the GRU gets
    # no gradient) | differentiable (the paper's "fully differentiable": bilinear reads at
    # continuous positions, gradients reach the ConvGRU)
    refine_grad: str = "official_nograd"
    # Scores S_t fed to the refinement: softmax (official: the softmax over the 3K propagated
    # candidates, kept top K) | cosine (the paper's Eq. 7)
    gru_score: str = "softmax"
    # features (official: h_0 = initial_layer(f^x, f^y)) | zero (the paper: h_0 = 0, the features
    # enter x_t at every step instead; not loadable from official weights: wider GRU input)
    gru_hidden_init: str = "features"
    nef: int = 32  # encoder width and matching channels at width 1 (official --nef 32)
    feat_kernel: int = 3  # stride-2 encoder conv kernel (official --featEnc_kernel 3)
    iterations: int = 5  # PatchMatch iterations per level (official --iteration_count 5)
    temperature: float = 0.01  # softmax temperature of the matching (official --temperature 0.01)
    candidate_window: int = 4  # K = window^2 = 16 candidates (official search_window 4)
    candidate_dilation: int = 2  # official dilation 2
    candidate_centering: int = 1  # official centering 1 -> offsets {-2, 0, 2, 4}
    gru_hidden: int = 32  # ConvGRU hidden channels at width 1 (official hidden_dim 32)
    gru_motion: int = 64  # motion-encoder / flow-head channels at width 1 (official 64)
    # Recompute each PatchMatch iteration in the backward pass: identical results, training
    # memory of the refinement ~1/iterations, ~1.3x the time. Only acts with refine_grad:
    # differentiable (official_nograd keeps no refinement activations anyway).
    grad_checkpoint: bool = False
    # --- translation network ------------------------------------------------------------------
    ngf: int = 64  # generator width at width 1 (official --ngf 64)
    ndf: int = 64  # discriminator width (official --ndf 64)
    spade_hidden: int = 128  # SPADE MLP hidden channels (official nhidden 128)
    num_d: int = 2  # discriminator scales (official --num_D 2)
    n_layers_d: int = 4  # PatchGAN depth (official --n_layers_D 4)
    # --- losses (0 = off) ---------------------------------------------------------------------
    lambda_align: float = 10.0  # L_align, Eq. 11 (official --weight_novgg_featpair 10)
    lambda_corr: float = 500.0  # L_corr, Eq. 12, per level (official command --weight_warp_self 500)
    lambda_warp_cycle: float = 1.0  # dense-level cycle warp (official command --weight_warp_cycle 1)
    lambda_map: float = 0.0  # L_map, Eq. 13-14 with R (paper only; no weight given, not in official code)
    lambda_perc: float = 0.001  # L_sem, Eq. 15: MSE on r42 (official --weight_perceptual 0.001, 4_2)
    perceptual_layer: str = "r42"  # official --which_perceptual 4_2 ("r52" for 5_2)
    lambda_vgg: float = 10.0  # scale of both VGG terms of L_app (official --weight_vgg 10)
    fm_ratio: float = 1.0  # feature-matching part of L_app (official --weight_fm_ratio 1.0)
    lambda_contextual: float = 1.0  # contextual part of L_app (official --weight_contextual 1.0)
    lambda_gan: float = 10.0  # hinge GAN, G and D (official --weight_gan 10)
    lambda_gan_feat: float = 10.0  # discriminator feature matching (official --weight_ganFeat 10)
    vgg: str = "caffe"  # caffe (official vgg19_conv.pth) | torchvision (ImageNet VGG19)
    # official: mean(|x - y| * w), the self-reference weighted mean / batch size | weighted_mean
    self_ref_reduction: str = "official"
    # --- training pairs -----------------------------------------------------------------------
    # Per-sample probability of the dataset's exemplar instead of a pseudo exemplar T(x_B)
    # (official --real_reference_probability; 0.0 in the v2 command, whose --video_like pairs are
    # the dataset's exemplars: see the ``deepfashion`` recipe).
    real_reference_probability: float = 0.0
    # Dataset exemplars count as self-reference with ``target`` as ground truth when the batch has
    # it (official --video_like same-person pairs). Off: ``target`` is never used in training.
    use_target_as_gt: bool = False
    pseudo_flip: bool = False  # T: horizontal flip (paper: flip; the official command sets --no_flip)
    pseudo_crop: float = 0.15  # T: random crop keeping >= 1 - this of each side (ours: not given)
    pseudo_jitter: float = 0.05  # T: piecewise-smooth warp amplitude, 4x4 control grid (ours)
    adam_eps_g: float = 1e-3  # generator Adam eps (official create_optimizers eps=1e-3)
    init_type: str = "xavier"  # official --init_type (BaseNetwork.init_weights; GPU path, methods/common/init.py)
    init_gain: float = 0.02  # official --init_variance 0.02


class TranslationGenerator(nn.Module):
    """Official v2 ``SPADEGenerator``: the warps (nearest-upsampled) and the condition condition
    every positional-norm SPADE block; trunk 8ngf from R/32 up through five x2 upsamplings."""

    def __init__(self, label_nc: int, n_levels: int, ngf: int, resolution: int, hidden: int):
        super().__init__()
        ic = 3 * n_levels + label_nc
        self.resolution, self.sh = resolution, resolution // 32
        blk = lambda i, o: SPADEResBlock(i * ngf, o * ngf, ic, hidden, "positional",  # noqa: E731
                                         padding="reflect", pono_eps=PONO_EPS)
        self.fc = nn.Conv2d(ic, 8 * ngf, 3, padding=1)
        self.head_0, self.G_middle_0, self.G_middle_1 = blk(8, 8), blk(8, 8), blk(8, 8)
        self.up_0, self.up_1, self.up_2, self.up_3 = blk(8, 8), blk(8, 4), blk(4, 2), blk(2, 1)
        self.conv_img = nn.Conv2d(ngf, 3, 3, padding=1)

    def forward(self, cond: torch.Tensor, warps: List[torch.Tensor]) -> torch.Tensor:
        r = self.resolution
        seg = torch.cat([F.interpolate(w, size=(r, r)) if w.shape[-1] != r else w for w in warps] + [cond], 1)
        up = lambda t: F.interpolate(t, scale_factor=2)  # noqa: E731  (nearest, official nn.Upsample)
        x = self.fc(F.interpolate(seg, size=(self.sh, self.sh)))
        x = up(self.head_0(x, seg))
        x = up(self.G_middle_1(self.G_middle_0(x, seg), seg))
        x = up(self.up_0(x, seg))
        x = up(self.up_1(x, seg))
        x = up(self.up_2(x, seg))
        x = self.up_3(x, seg)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 2e-1)))


def pseudo_exemplar(image: torch.Tensor, cond: torch.Tensor, flip: bool, crop: float, jitter: float
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """T(x_B) of Sec. 3.4 / appendix: random crop (+ flip) and a smooth random warp (bilinear
    interpolation of random displacements on a 4x4 lattice, a piecewise-smooth stand-in for the
    piecewise-affine transform). The same geometry is applied to the condition (nearest)."""
    b, _, h, w = image.shape
    dev = image.device
    s = 1.0 - crop * torch.rand(b, device=dev)
    theta = torch.zeros(b, 2, 3, device=dev)
    sign = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=dev)
    theta[:, 0, 0], theta[:, 1, 1] = s * sign, s
    theta[:, 0, 2] = (1 - s) * (2 * torch.rand(b, device=dev) - 1)
    theta[:, 1, 2] = (1 - s) * (2 * torch.rand(b, device=dev) - 1)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    if jitter > 0:
        disp = (2 * torch.rand(b, 2, 4, 4, device=dev) - 1) * jitter
        grid = grid + F.interpolate(disp, size=(h, w), mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
    img = F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    cnd = F.grid_sample(cond, grid.to(cond.dtype), mode="nearest", padding_mode="border", align_corners=False)
    return img, cnd


def weighted_l1(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, official: bool = True) -> torch.Tensor:
    """L1 of the self-reference samples, ``w`` = self_ref / (sum(self_ref) + 1e-5) per sample.

    ``official``: ``util.weighted_l1_loss`` = ``mean(|x - y| * w)``, i.e. the weighted mean divided
    by the batch size; else the weighted mean of the per-sample L1 (independent of the batch size).
    """
    if official:
        return ((x - y).abs() * w.view(-1, *([1] * (x.dim() - 1)))).mean()
    return ((x - y).abs().flatten(1).mean(dim=1) * w).sum()


def discriminate(net_d: nn.Module, cond: torch.Tensor, fake: torch.Tensor, real: torch.Tensor,
                 record: Optional[Callable[[str, torch.Tensor], None]] = None):
    """Official ``discriminate``: one D pass over [fakes; reals] -> (pred_fake, pred_real), each a
    list over scales of every layer's output (logits last)."""
    both = net_d(torch.cat([torch.cat([cond, fake], 1), torch.cat([cond, real], 1)], 0))
    if record is not None:
        for i, scale in enumerate(both):
            for j, f in enumerate(scale):
                record(f"netD/scale{i}/model{j}", f)
    n = fake.shape[0]
    return [[f[:n] for f in s] for s in both], [[f[n:] for f in s] for s in both]


def hinge_terms(preds: List[List[torch.Tensor]], real: bool) -> torch.Tensor:
    """One side of the official hinge D loss, mean over scales: mean(relu(1 -+ logits))."""
    sign = -1.0 if real else 1.0
    return sum(F.relu(1 + sign * p[-1]).mean() for p in preds) / len(preds)


@METHODS.register("cocosnet_v2")
class CoCosNetV2Method(ExemplarMethod):
    Options = CoCosNetV2Options
    sync_batchnorm = True  # official: SynchronizedBatchNorm2d across GPUs (train.sync_bn)
    has_warp = True
    recipes = RECIPES

    def __init__(self, options: CoCosNetV2Options, ctx: MethodContext):
        super().__init__(options, ctx)
        o, r = options, ctx.resolution
        self._validate(o, r)
        self.levels = [int(f) for f in o.levels]
        self.level_sizes = [r // f for f in self.levels]
        label_nc = ctx.data.cond_channels
        nef = scaled(o.nef, ctx.width, minimum=8)  # matching needs a few channels to be distinctive
        ngf = scaled(o.ngf, ctx.width)
        hidden = scaled(o.spade_hidden, ctx.width, minimum=16)
        # netCorr (official NoVGGHPMCorrespondence): enc_a/enc_b, theta/phi, pm
        self.enc_a = MultiLevelEncoder(label_nc, nef, self.levels, o.feat_kernel, hidden)
        self.enc_b = MultiLevelEncoder(3 + label_nc, nef, self.levels, o.feat_kernel, hidden)
        self.theta = nn.ModuleList([nn.Conv2d(level_channels(nef, f), nef, 1) for f in self.levels])
        self.phi = nn.ModuleList([nn.Conv2d(level_channels(nef, f), nef, 1) for f in self.levels])
        self.pm = HierarchicalPatchMatch(
            nef, k_window=o.candidate_window, dilation=o.candidate_dilation, centering=o.candidate_centering,
            iterations=o.iterations, temperature=o.temperature, refinement=o.refinement,
            refine_grad=o.refine_grad, hidden=scaled(o.gru_hidden, ctx.width, minimum=8),
            motion_ch=scaled(o.gru_motion, ctx.width, minimum=16), hidden_init=o.gru_hidden_init,
            gru_score=o.gru_score, grad_checkpoint=o.grad_checkpoint)
        self.netG = TranslationGenerator(label_nc, len(self.levels), ngf, r, hidden)
        # Training-only networks (none for evaluation-only trials)
        self.netR = (Reconstructor(level_channels(nef, self.levels[-1]), max(16, 2 * nef))
                     if ctx.training and o.lambda_map > 0 else None)
        self.netD = self.make_discriminator(o, label_nc, ctx.width) if ctx.training and o.lambda_gan > 0 else None
        # Official init per network (xavier 0.02; spectral-norm weights keep torch's default: the
        # GPU path the released models were trained on, see methods/common/init.py).
        for m in (self.enc_a, self.enc_b, self.theta, self.phi, self.pm, self.netG, self.netR, self.netD):
            if m is not None:
                official_init(m, o.init_type, o.init_gain)
        needs_vgg = ctx.training and (o.lambda_perc > 0 or o.lambda_vgg * (o.fm_ratio + o.lambda_contextual) > 0)
        self.vgg = (VGG19Features(o.vgg, list(OFFICIAL_NAMES.values()), ctx.backbones,
                                  f"CoCosNet v2's VGG losses (vgg: {o.vgg})") if needs_vgg else None)
        if self.vgg is not None:
            self.provenance["vgg19_loss"] = self.vgg.provenance
        # Intermediate tensors by official name (VGG features, D outputs) when a dict (parity runs).
        self.trace: Optional[Dict[str, torch.Tensor]] = None
        self.to(ctx.device)
        self.opt_g = self.opt_d = None
        if ctx.training:
            optim = ctx.official_optim(**OFFICIAL_OPTIM)
            self.resolved.update(optim, adam_eps_g=o.adam_eps_g)
            betas = (optim["beta1"], optim["beta2"])
            g_params = [p for n, p in self.named_parameters() if not n.startswith("netD.")]
            self.opt_g = torch.optim.Adam(g_params, lr=optim["lr_g"], betas=betas, eps=o.adam_eps_g)
            if self.netD is not None:
                self.opt_d = torch.optim.Adam(self.netD.parameters(), lr=optim["lr_d"], betas=betas)

    @staticmethod
    def make_discriminator(o: CoCosNetV2Options, label_nc: int, width: float) -> MultiscaleDiscriminator:
        """Official multiscale D on (condition, image): padding 1, no attention in v2."""
        return MultiscaleDiscriminator(label_nc + 3, scaled(o.ndf, width), o.n_layers_d, o.num_d, padding=1)

    @staticmethod
    def _validate(o: CoCosNetV2Options, r: int) -> None:
        lv = [int(f) for f in o.levels]
        if not lv:
            raise ValueError("cocosnet_v2: levels must name at least one factor, e.g. [8, 4, 2, 1]")
        for f in lv:
            if f < 1 or f & (f - 1):
                raise ValueError(f"cocosnet_v2: level factors must be powers of two >= 1, got {lv}")
        if any(b != a // 2 for a, b in zip(lv, lv[1:])):
            raise ValueError(f"cocosnet_v2: levels must halve the factor each step (e.g. [8, 4, 2, 1]), got {lv}")
        if r < 32 or r & (r - 1):
            raise ValueError(f"cocosnet_v2: resolution must be a power of two >= 32, got {r}")
        if r // lv[0] < 4:
            raise ValueError(f"cocosnet_v2: the coarsest level {r}/{lv[0]} is below 4x4")
        choices = {"refinement": REFINEMENTS, "refine_grad": REFINE_GRADS, "gru_score": GRU_SCORES,
                   "gru_hidden_init": HIDDEN_INITS, "perceptual_layer": ("r42", "r52"),
                   "self_ref_reduction": ("official", "weighted_mean")}
        for name, allowed in choices.items():
            if getattr(o, name) not in allowed:
                raise ValueError(f"cocosnet_v2: {name} must be one of {allowed}, got {getattr(o, name)!r}")
        if not 0.0 <= o.real_reference_probability <= 1.0:
            raise ValueError("cocosnet_v2: real_reference_probability must be in [0, 1]")

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {k: v for k, v in (("g", self.opt_g), ("d", self.opt_d)) if v is not None}

    def _record(self, name: str, value: torch.Tensor) -> None:
        if self.trace is not None:
            self.trace[name] = value.detach()

    # ---- forward pieces ---------------------------------------------------------------------
    def encode_exemplar(self, image: torch.Tensor, cond: torch.Tensor) -> List[torch.Tensor]:
        """M_B on (image, its condition), every level L2-normalised (official ``feature_normalize``)."""
        return [feature_normalize(f, eps=MATCH_EPS) for f in self.enc_b(torch.cat([image, cond], 1))]

    def correspondence(self, cond: torch.Tensor, exemplar: torch.Tensor, exemplar_cond: torch.Tensor,
                       cycle: bool = False) -> Tuple[List[LevelResult], List[torch.Tensor]]:
        """The per-level match results and the condition's normalised features."""
        fa = [feature_normalize(f, eps=MATCH_EPS) for f in self.enc_a(cond)]
        fb = self.encode_exemplar(exemplar, exemplar_cond)
        thetas = [normalize_pono_c(t(f)) for t, f in zip(self.theta, fa)]
        phis = [normalize_pono_c(p(f)) for p, f in zip(self.phi, fb)]
        return self.pm(thetas, phis, exemplar, cycle=cycle), fa, fb

    def _vgg(self, x: torch.Tensor, name: str) -> Dict[str, torch.Tensor]:
        """VGG19 features under the official names ``r12`` ... ``r52``."""
        feats = self.vgg(x)
        out = {short: feats[long] for short, long in OFFICIAL_NAMES.items()}
        for short, f in out.items():
            self._record(f"{name}/{short}", f)
        return out

    def discriminate(self, cond, fake, real):
        return discriminate(self.netD, cond, fake, real, self._record)

    def _training_pairs(self, batch: Dict[str, torch.Tensor]):
        """(exemplar, exemplar_cond, ground truth, self_ref) for this step (see module doc)."""
        o = self.options
        cond, image = batch["cond"], batch["image"]
        b = image.shape[0]
        real = torch.rand(b, device=image.device) < o.real_reference_probability
        ex, ex_cond, gt = image, cond, image
        self_ref = (~real).to(image.dtype)
        if (~real).any():
            p_img, p_cond = pseudo_exemplar(image, cond, o.pseudo_flip, o.pseudo_crop, o.pseudo_jitter)
            ex, ex_cond = p_img, p_cond
        if real.any():
            m = real.view(b, 1, 1, 1)
            ex = torch.where(m, batch["exemplar"], ex)
            ex_cond = torch.where(m, batch["exemplar_cond"], ex_cond)
            if o.use_target_as_gt and "target" in batch:
                gt = torch.where(m, batch["target"], gt)
                self_ref = torch.ones_like(self_ref)
        return ex, ex_cond, gt, self_ref

    # ---- training ---------------------------------------------------------------------------
    def generator_losses(self, cond, ex, ex_cond, gt, self_ref, cycle: Optional[bool] = None):
        """The generator's losses of one step (official ``compute_generator_loss``).

        ``gt`` is the ground truth (official ``real_image``), ``self_ref`` (B,) the per-sample
        flag. ``cycle`` (default: ``lambda_warp_cycle > 0``) computes the dense cycle warp.
        Returns (losses by our key, fake image, level results).
        """
        o = self.options
        r = self.ctx.resolution
        cycle = o.lambda_warp_cycle > 0 if cycle is None else cycle
        w = self_ref / (self_ref.sum() + 1e-5)
        official = o.self_ref_reduction == "official"
        pool = lambda x, size: F.avg_pool2d(x, r // size) if size < r else x  # noqa: E731
        f_ex = f_gt = None
        if self.vgg is not None:  # official generate_fake: the exemplar's, then the photo's features
            with torch.no_grad():
                f_ex, f_gt = self._vgg(ex, "vgg_ref"), self._vgg(gt, "vgg_real")
        results, fa, fb = self.correspondence(cond, ex, ex_cond, cycle=cycle)
        fake = self.netG(cond, [res.warp for res in results])
        losses: Dict[str, torch.Tensor] = {}
        if o.lambda_align > 0:  # Eq. 11: M_A(x_A) vs M_B(x_B) at every level (official weights 1)
            fpair = self.encode_exemplar(gt, cond)
            losses["G_align"] = sum(F.l1_loss(a, p) for a, p in zip(fa, fpair)) * o.lambda_align
        if cycle:
            size = results[0].size
            losses["G_warp_cycle"] = F.l1_loss(results[0].cycle, pool(ex, size)) * o.lambda_warp_cycle
        if o.lambda_corr > 0:  # Eq. 12: every level's warp vs the pooled ground truth, finest first
            losses["G_corr"] = sum(weighted_l1(res.warp, pool(gt, res.size), w, official) * o.lambda_corr
                                   for res in reversed(results))
        if self.netR is not None:  # Eq. 13-14
            losses["G_map"] = o.lambda_map * (F.l1_loss(self.netR(fa[-1], r), gt)
                                              + F.l1_loss(self.netR(fb[-1], r), ex))
        if self.netD is not None:
            pred_fake, pred_real = self.discriminate(cond, fake, gt)
            losses["G_gan"] = sum(-p[-1].mean() for p in pred_fake) / len(pred_fake) * o.lambda_gan
            if o.lambda_gan_feat > 0:
                losses["G_gan_feat"] = feature_matching_loss(pred_real, pred_fake) * o.lambda_gan_feat
        if self.vgg is not None:
            f_fake = self._vgg(fake, "vgg_fake")
            if o.lambda_vgg * o.fm_ratio > 0:  # L_app feature matching, self-reference samples only
                losses["G_fm"] = sum(c * weighted_l1(f_fake[k], f_gt[k], w, official)
                                     for k, c in FM_WEIGHTS) * o.lambda_vgg * o.fm_ratio
            if o.lambda_perc > 0:  # L_sem
                k = o.perceptual_layer
                losses["G_perc"] = F.mse_loss(f_fake[k], f_gt[k]) * o.lambda_perc
            if o.lambda_vgg * o.lambda_contextual > 0:  # L_app contextual, to the exemplar used
                cx = lambda a, b: contextual_loss(a, b, centre="pono", norm_eps=1e-10)  # noqa: E731
                ctx_loss = (cx(f_fake["r52"], f_ex["r52"]) * 8 + cx(f_fake["r42"], f_ex["r42"]) * 4
                            + cx(F.avg_pool2d(f_fake["r32"], 2), F.avg_pool2d(f_ex["r32"], 2)) * 2)
                losses["G_contextual"] = ctx_loss * o.lambda_vgg * o.lambda_contextual
        return losses, fake, results

    def discriminator_losses(self, cond, fake, real) -> Dict[str, torch.Tensor]:
        """Official ``compute_discriminator_loss`` on a detached fake."""
        pred_fake, pred_real = self.discriminate(cond, fake.detach(), real)
        lam = self.options.lambda_gan
        return {"D_fake": hinge_terms(pred_fake, real=False) * lam, "D_real": hinge_terms(pred_real, real=True) * lam}

    def train_step(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        cond, image = batch["cond"], batch["image"]
        ex, ex_cond, gt, self_ref = self._training_pairs(batch)
        losses, fake, results = self.generator_losses(cond, ex, ex_cond, gt, self_ref)
        g_total = sum(losses.values()) if losses else fake.sum() * 0.0
        self.opt_g.zero_grad(set_to_none=True)
        g_total.backward()
        self.opt_g.step()
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["G_total"] = float(g_total.detach())
        if self.netD is not None:
            d_losses = self.discriminator_losses(cond, fake, gt)
            d_total = sum(d_losses.values())
            self.opt_d.zero_grad(set_to_none=True)
            d_total.backward()
            self.opt_d.step()
            out.update({k: float(v.detach()) for k, v in d_losses.items()}, D_total=float(d_total.detach()))
        with torch.no_grad():  # finest warp vs its ground truth on self-reference samples (monitor)
            res, r = results[-1], self.ctx.resolution
            ref = F.avg_pool2d(gt, r // res.size) if res.size < r else gt
            w = self_ref / (self_ref.sum() + 1e-5)
            out["warp_l1_self"] = float(((res.warp - ref).abs().flatten(1).mean(1) * w).sum())
        return out

    @torch.no_grad()
    def generate(self, batch: Dict[str, torch.Tensor]) -> MethodOutput:
        results, _, _ = self.correspondence(batch["cond"], batch["exemplar"], batch["exemplar_cond"])
        fake = self.netG(batch["cond"], [res.warp for res in results])
        return MethodOutput(output=fake, warps={str(res.size): res.warp.clamp(-1, 1) for res in results})
