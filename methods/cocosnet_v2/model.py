"""CoCosNet v2 (Zhou et al., CVPR 2021): full-resolution correspondence by hierarchical
GRU-assisted PatchMatch, jointly trained with a SPADE translation network.

Pipeline (paper Sec. 3, official ``NoVGGHPMCorrespondence`` + ``SPADEGenerator``; reference/
methods.md 1.2, 2.2):

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

Losses (each weight 0 = off; defaults are the official training command's, methods.md 2.2):
``lambda_align`` (L_align, Eq. 11, official ``weight_novgg_featpair``), ``lambda_corr`` (L_corr,
Eq. 12, ``weight_warp_self``), ``lambda_warp_cycle`` (official extra, dense level),
``lambda_map`` (L_map, Eq. 13-14, with the reconstruction network R; not in the official code),
``lambda_perc`` (L_sem, Eq. 15, MSE of r42), ``lambda_vgg * fm_ratio`` (feature matching part of
L_app, to the ground truth of self-reference samples), ``lambda_vgg * lambda_contextual``
(contextual part of L_app: 8 CX(r52) + 4 CX(r42) + 2 CX(pool r32)), ``lambda_gan`` (hinge, with
``lambda_gan_feat`` discriminator feature matching).

Training pairs. The paper (Sec. 3.4, appendix "Geometric data augmentation") trains with a
*pseudo exemplar* T(x_B): flip, random crop and a piecewise-smooth warp of the ground truth,
whose ideal warp is x_B itself. The official DeepFashion command instead uses real same-person
pairs (``--video_like``); ``use_target_as_gt`` covers that when a dataset provides ``target``
for its exemplar. ``real_reference_probability`` mixes in the dataset's exemplars
(self_ref = 0: no L_corr / feature matching for those samples), as the official option does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import ExemplarMethod, MethodContext, MethodOutput, scaled
from methods.cocosnet_v2.encoder import MultiLevelEncoder, Reconstructor, level_channels
from methods.cocosnet_v2.patchmatch import REFINE_GRADS, REFINEMENTS, HierarchicalPatchMatch, normalize_pono_c
from methods.common.contextual import contextual_loss
from methods.common.discriminator import MultiscaleDiscriminator
from methods.common.losses import feature_matching_loss, hinge_d_loss, hinge_g_loss
from methods.common.spade_blocks import SPADEResBlock
from methods.common.vgg_caffe import OFFICIAL_NAMES, VGG19Features
from methods.registry import METHODS


@dataclass
class CoCosNetV2Options:
    # --- correspondence -----------------------------------------------------------------------
    # Correspondence levels as downsampling factors of the run's resolution, coarsest first, each
    # half the previous one. (8, 4, 2, 1) is the paper's 64/128/256/512 ladder at 512^2 (appendix B)
    # and 8/16/32/64 at 64^2. Table 4's variants are the prefixes (8,), (8, 4), (8, 4, 2).
    levels: Tuple[int, ...] = (8, 4, 2, 1)
    # Table 5: propagation | gru | propagation+conv | propagation+gru (the paper's model)
    refinement: str = "propagation+gru"
    # differentiable (paper: gradients reach the ConvGRU) | official_nograd (official code:
    # offsets truncated to indices under no_grad; the GRU gets no gradient, methods.md 1.2)
    refine_grad: str = "differentiable"
    nef: int = 32  # encoder width and matching channels at width 1 (official --nef 32)
    feat_kernel: int = 3  # stride-2 encoder conv kernel (official --featEnc_kernel 3)
    iterations: int = 5  # PatchMatch iterations per level (official --iteration_count 5)
    temperature: float = 0.01  # softmax temperature of the matching (official --temperature 0.01)
    candidate_window: int = 4  # K = window^2 = 16 candidates (official search_window 4)
    candidate_dilation: int = 2  # official dilation 2
    candidate_centering: int = 1  # official centering 1 -> offsets {-2, 0, 2, 4}
    gru_hidden: int = 32  # ConvGRU hidden channels at width 1 (official hidden_dim 32)
    gru_motion: int = 64  # motion-encoder / flow-head channels at width 1 (official 64)
    # zero (paper: "the initial hidden state is set as 0") | features (official initial_layer)
    gru_hidden_init: str = "zero"
    # Recompute each PatchMatch iteration in the backward pass: identical results, training
    # memory of the refinement ~1/iterations (about 4x less overall), ~1.3x the time. Needed for
    # differentiable training at 512^2 (official_nograd stores no refinement activations anyway).
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
    # --- training pairs -----------------------------------------------------------------------
    # Per-sample probability of the dataset's exemplar instead of a pseudo exemplar T(x_B)
    # (official --real_reference_probability; 0.0 in the v2 command).
    real_reference_probability: float = 0.0
    # Dataset exemplars count as self-reference with ``target`` as ground truth when the batch has
    # it (official --video_like same-person pairs). Off: ``target`` is never used in training.
    use_target_as_gt: bool = False
    pseudo_flip: bool = False  # T: horizontal flip (paper: flip; the official command sets --no_flip)
    pseudo_crop: float = 0.15  # T: random crop keeping >= 1 - this of each side (ours: not given)
    pseudo_jitter: float = 0.05  # T: piecewise-smooth warp amplitude, 4x4 control grid (ours)
    # Reduction of the self-reference losses (L_corr, feature matching): weighted_mean (the mean
    # over self-reference samples) | official (mean(|x - y| * w), i.e. additionally divided by
    # the batch size: 1/2 of weighted_mean at the official per-GPU batch of 2)
    self_ref_reduction: str = "weighted_mean"
    adam_eps_g: float = 1e-3  # generator Adam eps (official create_optimizers eps=1e-3)
    init_gain: float = 0.02  # xavier-normal gain of non-spectral convs (official --init_variance 0.02)


def official_init(module: nn.Module, gain: float) -> None:
    """Official ``BaseNetwork.init_weights('xavier', 0.02)``. In the official code it re-initialises
    ``m.weight`` of spectral-norm convs too, but that tensor is recomputed from ``weight_orig``
    at the next forward, so only non-spectral layers are affected: the same here."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not hasattr(m, "weight_orig"):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def feature_normalize(x: torch.Tensor) -> torch.Tensor:
    """Official ``util.feature_normalize``: L2 over channels (+ float epsilon)."""
    return x / (x.norm(dim=1, keepdim=True) + 2.220446049250313e-16)


class TranslationGenerator(nn.Module):
    """Official v2 ``SPADEGenerator``: the warps (nearest-upsampled) and the condition condition
    every positional-norm SPADE block; trunk 8ngf from R/32 up through five x2 upsamplings."""

    def __init__(self, label_nc: int, n_levels: int, ngf: int, resolution: int, hidden: int):
        super().__init__()
        ic = 3 * n_levels + label_nc
        self.resolution, self.sh = resolution, resolution // 32
        blk = lambda i, o: SPADEResBlock(i * ngf, o * ngf, ic, hidden, "positional", padding="reflect")  # noqa: E731
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
    img = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    cnd = F.grid_sample(cond, grid, mode="nearest", padding_mode="border", align_corners=False)
    return img, cnd


def weighted_l1(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, official: bool = False) -> torch.Tensor:
    """Per-sample L1 means weighted by ``w`` (sums to 1 over self-reference samples, else 0).

    The official ``util.weighted_l1_loss`` is ``mean(|x - y| * w)``, i.e. additionally divided by
    the (per-GPU) batch size (``official=True``); by default the plain weighted mean, which does
    not depend on the batch size.
    """
    out = ((x - y).abs().flatten(1).mean(dim=1) * w).sum()
    return out / x.shape[0] if official else out


@METHODS.register("cocosnet_v2")
class CoCosNetV2Method(ExemplarMethod):
    Options = CoCosNetV2Options
    has_warp = True

    def __init__(self, options: CoCosNetV2Options, ctx: MethodContext):
        super().__init__(options, ctx)
        o, r = options, ctx.resolution
        self._validate(o, r)
        self.levels = [int(f) for f in o.levels]
        self.level_sizes = [r // f for f in self.levels]
        label_nc = ctx.data.cond_channels
        nef = scaled(o.nef, ctx.width, minimum=8)  # matching needs a few channels to be distinctive
        ngf, ndf = scaled(o.ngf, ctx.width), scaled(o.ndf, ctx.width)
        hidden = scaled(o.spade_hidden, ctx.width, minimum=16)
        self.enc_a = MultiLevelEncoder(label_nc, nef, self.levels, o.feat_kernel, hidden)
        self.enc_b = MultiLevelEncoder(3 + label_nc, nef, self.levels, o.feat_kernel, hidden)
        self.theta = nn.ModuleList([nn.Conv2d(level_channels(nef, f), nef, 1) for f in self.levels])
        self.phi = nn.ModuleList([nn.Conv2d(level_channels(nef, f), nef, 1) for f in self.levels])
        self.pm = HierarchicalPatchMatch(
            nef, k_window=o.candidate_window, dilation=o.candidate_dilation, centering=o.candidate_centering,
            iterations=o.iterations, temperature=o.temperature, refinement=o.refinement,
            refine_grad=o.refine_grad, hidden=scaled(o.gru_hidden, ctx.width, minimum=8),
            motion_ch=scaled(o.gru_motion, ctx.width, minimum=16),
            hidden_init=o.gru_hidden_init, grad_checkpoint=o.grad_checkpoint)
        self.netG = TranslationGenerator(label_nc, len(self.levels), ngf, r, hidden)
        self.netR = (Reconstructor(level_channels(nef, self.levels[-1]), max(16, 2 * nef))
                     if o.lambda_map > 0 else None)
        self.netD = MultiscaleDiscriminator(label_nc + 3, ndf, o.n_layers_d, o.num_d) if o.lambda_gan > 0 else None
        for m in (self.enc_a, self.enc_b, self.theta, self.phi, self.pm, self.netG, self.netR, self.netD):
            if m is not None:
                official_init(m, o.init_gain)
        needs_vgg = o.lambda_perc > 0 or o.lambda_vgg * (o.fm_ratio + o.lambda_contextual) > 0
        self.vgg = (VGG19Features(o.vgg, list(OFFICIAL_NAMES.values()), ctx.backbones,
                                  f"CoCosNet v2's VGG losses (vgg: {o.vgg})") if needs_vgg else None)
        if self.vgg is not None:
            self.provenance["vgg19_loss"] = self.vgg.provenance
        self.to(ctx.device)
        g_params = [p for n, p in self.named_parameters() if not n.startswith("netD.")]
        # Official: Adam over netG + netCorr with eps 1e-3; the D optimiser keeps the default eps.
        self.opt_g = torch.optim.Adam(g_params, lr=ctx.lr_g, betas=(ctx.beta1, ctx.beta2), eps=o.adam_eps_g)
        self.opt_d = (torch.optim.Adam(self.netD.parameters(), lr=ctx.lr_d, betas=(ctx.beta1, ctx.beta2))
                      if self.netD is not None else None)

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
        if o.refinement not in REFINEMENTS:
            raise ValueError(f"cocosnet_v2: refinement must be one of {REFINEMENTS}, got {o.refinement!r}")
        if o.refine_grad not in REFINE_GRADS:
            raise ValueError(f"cocosnet_v2: refine_grad must be one of {REFINE_GRADS}, got {o.refine_grad!r}")
        if o.perceptual_layer not in ("r42", "r52"):
            raise ValueError("cocosnet_v2: perceptual_layer must be 'r42' (official 4_2) or 'r52' (5_2)")
        if o.self_ref_reduction not in ("weighted_mean", "official"):
            raise ValueError("cocosnet_v2: self_ref_reduction must be 'weighted_mean' or 'official'")
        if not 0.0 <= o.real_reference_probability <= 1.0:
            raise ValueError("cocosnet_v2: real_reference_probability must be in [0, 1]")

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        opts = {"g": self.opt_g}
        if self.opt_d is not None:
            opts["d"] = self.opt_d
        return opts

    # ---- forward pieces ---------------------------------------------------------------------
    def correspondence(self, cond: torch.Tensor, exemplar: torch.Tensor, exemplar_cond: torch.Tensor,
                       cycle: bool = False):
        """Features of both domains, the per-level match results and the normalised features."""
        fa = [feature_normalize(f) for f in self.enc_a(cond)]
        fb = [feature_normalize(f) for f in self.enc_b(torch.cat([exemplar, exemplar_cond], 1))]
        thetas = [normalize_pono_c(t(f)) for t, f in zip(self.theta, fa)]
        phis = [normalize_pono_c(p(f)) for p, f in zip(self.phi, fb)]
        results = self.pm(thetas, phis, exemplar, cycle=cycle)
        return results, fa, fb

    def _vgg(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """VGG19 features under the official names ``r12`` ... ``r52``."""
        feats = self.vgg(x)
        return {short: feats[name] for short, name in OFFICIAL_NAMES.items()}

    def _discriminate(self, cond, fake, real):
        both = self.netD(torch.cat([torch.cat([cond, fake], 1), torch.cat([cond, real], 1)], 0))
        n = fake.shape[0]
        return [[f[:n] for f in s] for s in both], [[f[n:] for f in s] for s in both]

    def _training_pairs(self, batch: Dict[str, torch.Tensor]):
        """(exemplar, exemplar_cond, ground truth, self_ref) for this step (see module doc)."""
        o = self.options
        cond, image = batch["cond"], batch["image"]
        b = image.shape[0]
        real = torch.rand(b, device=image.device) < o.real_reference_probability
        ex, ex_cond, gt = image, cond, image
        self_ref = (~real).float()
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
    def train_step(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        o = self.options
        cond, image = batch["cond"], batch["image"]
        ex, ex_cond, gt, self_ref = self._training_pairs(batch)
        w = self_ref / (self_ref.sum() + 1e-5)
        off_red = o.self_ref_reduction == "official"
        results, fa, fb = self.correspondence(cond, ex, ex_cond, cycle=o.lambda_warp_cycle > 0)
        warps = [res.warp for res in results]
        fake = self.netG(cond, warps)
        losses: Dict[str, torch.Tensor] = {}
        r = self.ctx.resolution
        if o.lambda_align > 0:  # Eq. 11: M_A(x_A) vs M_B(x_B) at every level (official weights 1)
            fpair = [feature_normalize(f) for f in self.enc_b(torch.cat([image, cond], 1))]
            losses["G_align"] = o.lambda_align * sum(F.l1_loss(a, p) for a, p in zip(fa, fpair))
        if o.lambda_corr > 0:  # Eq. 12: every level's warp of the pseudo exemplar vs x_B (pooled)
            losses["G_corr"] = o.lambda_corr * sum(
                weighted_l1(res.warp, F.avg_pool2d(gt, r // res.size) if res.size < r else gt, w, off_red)
                for res in results)
        if o.lambda_warp_cycle > 0:
            size = results[0].size
            losses["G_warp_cycle"] = o.lambda_warp_cycle * F.l1_loss(
                results[0].cycle, F.avg_pool2d(ex, r // size) if size < r else ex)
        if self.netR is not None:  # Eq. 13-14
            losses["G_map"] = o.lambda_map * (F.l1_loss(self.netR(fa[-1], r), image)
                                              + F.l1_loss(self.netR(fb[-1], r), ex))
        if self.netD is not None:
            pred_fake, pred_real = self._discriminate(cond, fake, image)
            losses["G_gan"] = o.lambda_gan * hinge_g_loss(pred_fake)
            if o.lambda_gan_feat > 0:
                losses["G_gan_feat"] = o.lambda_gan_feat * feature_matching_loss(pred_real, pred_fake)
        if self.vgg is not None:
            f_fake = self._vgg(fake)
            with torch.no_grad():
                f_gt, f_ex = self._vgg(gt), self._vgg(ex)
            if o.lambda_vgg * o.fm_ratio > 0:  # L_app feature matching, self-reference samples only
                fw = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)
                losses["G_fm"] = o.lambda_vgg * o.fm_ratio * sum(
                    c * weighted_l1(f_fake[k], f_gt[k], w, off_red) for c, k in zip(fw, ("r12", "r22", "r32", "r42", "r52")))
            if o.lambda_perc > 0:  # L_sem
                k = o.perceptual_layer
                losses["G_perc"] = o.lambda_perc * F.mse_loss(f_fake[k], f_gt[k])
            if o.lambda_vgg * o.lambda_contextual > 0:  # L_app contextual, to the exemplar used
                cx = (8 * contextual_loss(f_fake["r52"], f_ex["r52"], centre="pono")
                      + 4 * contextual_loss(f_fake["r42"], f_ex["r42"], centre="pono")
                      + 2 * contextual_loss(F.avg_pool2d(f_fake["r32"], 2), F.avg_pool2d(f_ex["r32"], 2),
                                            centre="pono"))
                losses["G_contextual"] = o.lambda_vgg * o.lambda_contextual * cx
        g_total = sum(losses.values()) if losses else fake.sum() * 0.0
        self.opt_g.zero_grad(set_to_none=True)
        g_total.backward()
        self.opt_g.step()
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["G_total"] = float(g_total.detach())
        if self.netD is not None:
            pred_fake, pred_real = self._discriminate(cond, fake.detach(), image)
            d_total = o.lambda_gan * hinge_d_loss(pred_real, pred_fake)
            self.opt_d.zero_grad(set_to_none=True)
            d_total.backward()
            self.opt_d.step()
            out["D_total"] = float(d_total.detach())
        with torch.no_grad():  # finest warp vs its ground truth on self-reference samples (monitor)
            res = results[-1]
            ref = F.avg_pool2d(gt, r // res.size) if res.size < r else gt
            out["warp_l1_self"] = float(((res.warp - ref).abs().flatten(1).mean(1) * w).sum())
        return out

    @torch.no_grad()
    def generate(self, batch: Dict[str, torch.Tensor]) -> MethodOutput:
        results, _, _ = self.correspondence(batch["cond"], batch["exemplar"], batch["exemplar_cond"])
        warps = [res.warp for res in results]
        fake = self.netG(batch["cond"], warps)
        return MethodOutput(output=fake, warps={str(res.size): res.warp.clamp(-1, 1) for res in results})
