"""CoCosNet v1 (Zhang et al., "Cross-domain Correspondence Learning for Exemplar-based Image
Translation", CVPR 2020) following the official code (microsoft/CoCosNet; reference/methods.md
1.1, 2.1, 7).

Pipeline: the correspondence network (``correspondence.py``) adapts condition and exemplar to a
shared domain, matches them densely at 1/4 resolution and soft-warps the exemplar; the translation
network (``translation.py``) is a SPADE generator with positional normalisation conditioned on
(warped exemplar ++ condition); a multi-scale spectral-norm PatchGAN judges (condition, image).

Option defaults are the official ``train_options.py``/``base_options.py`` defaults, except the
flags set in *every* official README command, which are on here: ``--PONO --PONO_C
--use_attention --vgg_normal_correct``. Per-dataset flags (``--maskmix``, ``--warp_bilinear``,
``--adaptor_kernel 4``, ``--fm_ratio 1.0``, ``--which_perceptual 4_2 --weight_perceptual 0.001``,
``--warp_cycle_w``, ``--weight_mask``, ``--warp_self_w``) are options with the README values in
their comments; sweeps set them (``sweeps/ablation_v1_losses.yaml`` uses the CelebA-HQ edge command).

Training pairs (official ``pix2pix_dataset.py``): with probability ``self_ref_probability`` (1 -
``--real_reference_probability`` = 0.3) a sample's exemplar is replaced by a geometrically
distorted copy of its own photo (a pseudo exemplar pair, ``self_ref = 1``); L_feat only counts
those samples. Losses (each 0 = off: the term is not computed and not returned):

=================  =====================================================  ================  ===========
returned key       what (official name)                                   option            default
=================  =====================================================  ================  ===========
``G_gan``          hinge, generator side, mean over D scales (``GAN``)    lambda_gan        10
``G_gan_feat``     L1 of D features, / num_D (``GAN_Feat``)               lambda_gan_feat   10
``G_feat``         L_feat: VGG r12..r52 L1 to the photo, weights 1/32..1,  lambda_feat_vgg   1 (=10*0.1)
                   self-ref samples only (``fm``)
``G_perc``         L_perc: MSE of VGG relu5_2/relu4_2 to the photo         lambda_perc       0.01
                   (``perc``; the paper writes L1)
``G_context``      L_context: 8 CX(r52) + 4 CX(r42) + 2 CX(pool2 r32)      lambda_context    10 (=10*1)
                   [+ CX(pool4 r22) with --use_22ctx] to the exemplar
``G_domain``       L_domain: L1(adaptor_seg(cond), adaptor_img(photo))     lambda_domain     10
                   (``no_vgg_feat``)
``G_reg``          L_reg: L1(cycle warp, pooled exemplar) (``G_warp_cycle``) lambda_cycle      0 (1 edge)
``G_mask``         NLL of the warped exemplar one-hot vs the label (``mask``) lambda_mask       0 (100 ADE)
``G_warp_self``    L1(warp, photo) on self-ref samples (``G_warp_self``)    lambda_warp_self  0 (100 DF)
``D_total``        hinge real + fake, mean over scales, x lambda_gan
=================  =====================================================  ================  ===========

Known differences from the official code (kept deliberately or owned elsewhere):
* VGG: torchvision ImageNet VGG19 by default; ``vgg: caffe`` loads the official ``vgg19_conv.pth``
  when it is present locally (see ``methods/common/vgg_caffe.py``).
* SPADE blocks come from ``methods.common.spade_blocks``: zero padding (official: reflection) and
  PONO with the biased variance (official: unbiased ``x.var``).
* The discriminator (``methods.common.discriminator``) has no self-attention block (official
  ``--use_attention`` also adds one to D), uses padding 2 (official 1) and has no unused ``dec``;
  the conv biases its instance norms cancel are removed here, as the official code does.
* Pseudo exemplars: the official loader re-samples crop + flip; here crop + flip + a smooth elastic
  warp (the paper's "image warping"), drawn in the method (``augment.py``).
* L_feat keeps the official per-sample weighting self_ref / sum(self_ref) inside a mean over the
  batch, i.e. an extra 1/B (``weighted_l1``): its effective weight depends on the batch size
  (the official per-GPU batch was 4).
* Not implemented: ``--two_cycle``, ``--noise_for_mask``/``--mask_noise``, ``--use_coordconv``,
  EMA, the domain classifier, hard references (a dataset concern).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import ExemplarMethod, MethodContext, MethodOutput, scaled
from methods.cocosnet.augment import distort, distort_label, random_grids, select
from methods.cocosnet.correspondence import CorrespondenceNet
from methods.cocosnet.recipes import RECIPES
from methods.cocosnet.translation import CoCosNetGenerator
from methods.common.contextual import contextual_loss
from methods.common.discriminator import MultiscaleDiscriminator
from methods.common.losses import feature_matching_loss, hinge_d_loss, hinge_g_loss
from methods.common.vgg_caffe import OFFICIAL_NAMES, VGG19Features
from methods.registry import METHODS

VGG_LAYERS = tuple(OFFICIAL_NAMES.values())  # relu1_2 ... relu5_2 = official r12, r22, r32, r42, r52
FEAT_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)  # official fm weights for r12..r52
PERC_LAYERS = {"relu4_2": 3, "relu5_2": 4}  # index in the r12..r52 list


@dataclass
class CoCosNetOptions:
    # --- architecture ---
    ngf: int = 64  # generator/adaptor width at scale.width = 1 (official --ngf)
    ndf: int = 64  # discriminator width (official --ndf)
    num_d: int = 2  # discriminator scales (official --num_D)
    n_layers_d: int = 4  # PatchGAN depth (official --n_layers_D)
    spade_hidden: int = 128  # SPADE MLP channels (official nhidden, hard-coded)
    norm: str = "positional"  # SPADE param-free norm: positional (official --PONO, all commands), batch, instance
    use_attention: bool = True  # self-attention in G before up_2 (official --use_attention, all commands)
    adaptor_kernel: int = 3  # stride-2 kernels of the domain adaptors (official --adaptor_kernel; 4 for CelebA-HQ/edge/DeepFashion)
    corr_nc: int = 256  # theta/phi channels at width 1 (official inter_channels, hard-coded)
    match_kernel: int = 3  # neighbourhood matched per position (official --match_kernel)
    corr_centre: str = "channel"  # descriptor centring: channel (official --PONO_C, all commands) or spatial
    alpha: float = 100.0  # softmax sharpness (paper alpha; official temperature=0.01 default argument)
    warp_down: int = 4  # matching at 1/warp_down resolution: 4 or 2 (official --warp_stride)
    warp_bilinear: bool = False  # bilinear (else nearest) upsampling of the warp (official --warp_bilinear; on for CelebA-HQ/edge/DeepFashion)
    warp_patch: bool = False  # warp warp_down^2 RGB patches instead of the pooled exemplar (official --warp_patch, DeepFashion)
    maskmix: bool = False  # concatenate the (exemplar) condition before matching (official --maskmix; ADE20k, CelebA-HQ mask and edge)
    cbn_input: str = "warp_mask"  # generator conditioning: warp_mask = warp ++ condition, or warp (official --CBN_intype)
    init_type: str = "xavier"  # weight init of G, Corr and D: xavier, normal, kaiming, orthogonal, none (official --init_type)
    init_gain: float = 0.02  # (official --init_variance)
    vgg: str = "torchvision"  # VGG19 of the losses: torchvision, or caffe = the official vgg19_conv.pth (common/vgg_caffe.py)
    # --- losses (0 = off) ---
    lambda_gan: float = 10.0  # hinge GAN, G and D (official --weight_gan)
    lambda_gan_feat: float = 10.0  # discriminator feature matching (official --lambda_feat; off with --no_ganFeat_loss)
    lambda_feat_vgg: float = 1.0  # L_feat (official --lambda_vgg 10 x --fm_ratio 0.1; fm_ratio 1.0 -> 10 for CelebA-HQ/edge/DeepFashion)
    lambda_perc: float = 0.01  # L_perc (official --weight_perceptual; 0.001 for CelebA-HQ/edge/DeepFashion)
    perc_layer: str = "relu5_2"  # L_perc layer (official --which_perceptual 5_2; 4_2 = the paper's relu4_2, for CelebA-HQ/edge/DeepFashion)
    lambda_context: float = 10.0  # L_context (official --lambda_vgg 10 x --ctx_w 1.0)
    context_use_22: bool = False  # add CX on avgpool4(relu2_2) with weight 1 (official --use_22ctx, off in all commands)
    context_h: float = 0.1  # CX bandwidth (official h default)
    lambda_domain: float = 10.0  # L_domain (official --novgg_featpair)
    lambda_cycle: float = 0.0  # L_reg, forward-backward warp (official --warp_cycle_w; 1 for CelebA-HQ edge, 0.1 CelebA-HQ mask)
    lambda_mask: float = 0.0  # warped-exemplar-label NLL (official --weight_mask with --warp_mask_losstype direct; 100 for ADE20k, CelebA-HQ mask)
    mask_ignore_label: int = 0  # label ignored by the mask loss (official: 0 = ADE20k "other"); -1 = none
    lambda_warp_self: float = 0.0  # L1(warp, photo) on self-ref samples (official --warp_self_w; 100 for DeepFashion)
    # --- pseudo exemplar pairs ---
    self_ref_probability: float = 0.3  # 1 - official --real_reference_probability (0.7; 0.0 -> 1.0 for DeepFashion)
    pseudo_pair: str = "distort"  # distort: distorted own photo; exemplar: the batch exemplar already is a same-subject pair (official --video_like)
    distort_crop_min: float = 0.895  # smallest crop side kept (official resize 286 -> crop 256: 256/286)
    distort_elastic: float = 0.05  # max smooth displacement, fraction of the side (paper "image warping"; official: none)
    distort_flip: bool = True  # random horizontal flip (official unless --no_flip, which DeepFashion sets)
    # --- optimisation ---
    adam_eps_g: float = 1e-3  # Adam eps of G + Corr (official, hard-coded); D uses the default 1e-8
    lr_decay_start: float = 0.5  # fraction of steps before the linear decay to 0 (official niter / (niter + niter_decay)); 1 = none


def init_weights(module: nn.Module, init_type: str, gain: float) -> None:
    """Official ``BaseNetwork.init_weights``: conv/linear weights by ``init_type``, biases 0.

    For spectral-norm layers the official call writes through ``m.weight.data``, which shares
    storage with ``weight_orig`` at construction time, so the raw weight is what gets initialised.
    """
    if init_type == "none":
        return
    for m in module.modules():
        name = m.__class__.__name__
        if "Conv" not in name and "Linear" not in name:
            continue
        w = getattr(m, "weight_orig", None)
        if w is None:
            w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        with torch.no_grad():
            if init_type == "xavier":
                nn.init.xavier_normal_(w, gain=gain)
            elif init_type == "normal":
                nn.init.normal_(w, 0.0, gain)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(w, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                nn.init.orthogonal_(w, gain=gain)
            else:
                raise ValueError(f"cocosnet: unknown init_type {init_type!r}")
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()


def drop_biases_before_instance_norm(module: nn.Module) -> None:
    """Remove conv biases that an affine-free InstanceNorm right after cancels, as the official
    ``get_nonspade_norm_layer`` does for ``spectralinstance`` layers (the common discriminator keeps
    them; they would be parameters without gradient)."""
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        mods = list(seq)
        for a, b in zip(mods, mods[1:]):
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.InstanceNorm2d) and not b.affine and a.bias is not None:
                del a.bias
                a.register_parameter("bias", None)


def weighted_l1(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Official ``util.weighted_l1_loss``: mean over all elements of |x - y| * w[sample].

    With w = self_ref / sum(self_ref) this is (1/B) x the mean over self-ref samples -- an extra
    1/B of the official code (its per-GPU batch was 4), kept for fidelity.
    """
    return ((x - y).abs() * w.view(-1, 1, 1, 1)).mean()


@METHODS.register("cocosnet")
class CoCosNetMethod(ExemplarMethod):
    Options = CoCosNetOptions
    has_warp = True
    recipes = RECIPES

    def __init__(self, options: CoCosNetOptions, ctx: MethodContext):
        super().__init__(options, ctx)
        o, r = options, ctx.resolution
        if r < 32 or r & (r - 1):
            raise ValueError(f"cocosnet: resolution must be a power of two >= 32, got {r}")
        checks = [(o.norm in ("positional", "batch", "instance"), f"norm {o.norm!r}"),
                  (o.corr_centre in ("channel", "spatial"), f"corr_centre {o.corr_centre!r}"),
                  (o.cbn_input in ("warp_mask", "warp"), f"cbn_input {o.cbn_input!r}"),
                  (o.perc_layer in PERC_LAYERS, f"perc_layer {o.perc_layer!r} (relu4_2 or relu5_2)"),
                  (o.pseudo_pair in ("distort", "exemplar"), f"pseudo_pair {o.pseudo_pair!r}"),
                  (o.match_kernel % 2 == 1, f"match_kernel {o.match_kernel} (must be odd)"),
                  (0.0 <= o.self_ref_probability <= 1.0, "self_ref_probability outside [0, 1]"),
                  (0.0 < o.distort_crop_min <= 1.0, "distort_crop_min outside (0, 1]")]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("cocosnet: invalid options: " + "; ".join(bad))
        if ctx.data.params.get("exemplars") == "pseudo" and o.pseudo_pair == "distort" and o.self_ref_probability < 1:
            # Every training exemplar is already a pseudo pair: L_feat would count only the
            # self_ref_probability share of them. Official sampling wants train_exemplars: ref_list.
            warnings.warn("cocosnet: the dataset's training exemplars are all pseudo pairs; set the dataset "
                          "option train_exemplars: ref_list (official sampling) or self_ref_probability: 1.0")
        if o.lambda_mask > 0 and not ctx.data.num_classes:
            raise ValueError("cocosnet: lambda_mask > 0 needs a dataset with label maps (num_classes)")
        cond_nc = ctx.data.cond_channels
        ngf, ndf = scaled(o.ngf, ctx.width), scaled(o.ndf, ctx.width)
        hidden = scaled(o.spade_hidden, ctx.width)
        self.netCorr = CorrespondenceNet(
            cond_nc, ngf, scaled(o.corr_nc, ctx.width), adaptor_kernel=o.adaptor_kernel, down=o.warp_down,
            hidden=hidden, norm=o.norm, maskmix=o.maskmix, match_kernel=o.match_kernel,
            centre=o.corr_centre, alpha=o.alpha, warp_bilinear=o.warp_bilinear, warp_patch=o.warp_patch)
        cbn_nc = 3 + (cond_nc if o.cbn_input == "warp_mask" else 0)
        self.netG = CoCosNetGenerator(cbn_nc, ngf, r, hidden, o.norm, o.use_attention)
        self.netD = MultiscaleDiscriminator(cond_nc + 3, ndf, o.n_layers_d, o.num_d)
        drop_biases_before_instance_norm(self.netD)
        for net in (self.netCorr, self.netG, self.netD):
            init_weights(net, o.init_type, o.init_gain)
        self.vgg = None
        if o.lambda_feat_vgg > 0 or o.lambda_perc > 0 or o.lambda_context > 0:
            self.vgg = VGG19Features(o.vgg, VGG_LAYERS, ctx.backbones, f"CoCosNet's VGG losses (vgg: {o.vgg})")
            self.provenance[f"vgg19_{o.vgg}"] = self.vgg.provenance
        # Private RNG for pseudo-pair sampling: reproducible per seed and saved in checkpoints.
        self._rng = torch.Generator().manual_seed(ctx.seed * 7919 + 17)
        self.to(ctx.device)
        g_params = list(self.netG.parameters()) + list(self.netCorr.parameters())
        betas = (ctx.beta1, ctx.beta2)
        self.opt_g = torch.optim.Adam(g_params, lr=ctx.lr_g, betas=betas, eps=o.adam_eps_g)
        self.opt_d = torch.optim.Adam(self.netD.parameters(), lr=ctx.lr_d, betas=betas)
        self._base_lr = {"g": ctx.lr_g, "d": ctx.lr_d}

    # ---- bookkeeping ---------------------------------------------------------------------
    def optimizers(self):
        return {"g": self.opt_g, "d": self.opt_d}

    def training_state(self) -> Dict[str, Any]:
        state = super().training_state()
        state["rng"] = self._rng.get_state()
        return state

    def load_training_state(self, state: Dict[str, Any]) -> None:
        super().load_training_state(state)
        if "rng" in state:
            self._rng.set_state(state["rng"])

    def lr_factor(self, step: int) -> float:
        """Official linear decay to 0 over the last (1 - lr_decay_start) of training."""
        total, start = max(1, self.ctx.total_steps), self.options.lr_decay_start
        if start >= 1.0:
            return 1.0
        begin = start * total
        return 1.0 if step < begin else max(0.0, 1.0 - (step - begin) / max(1.0, total - begin))

    # ---- forward pieces ------------------------------------------------------------------
    def _pseudo_pairs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The training inputs with self-reference samples swapped in; adds ``self_ref`` (B,) float."""
        o = self.options
        cond, image = batch["cond"], batch["image"]
        b, dev = cond.shape[0], cond.device
        flags = torch.rand(b, generator=self._rng) < o.self_ref_probability
        ex, ex_cond, ex_label = batch["exemplar"], batch["exemplar_cond"], batch.get("exemplar_label")
        if o.pseudo_pair == "distort":
            # The grid is drawn for every sample so the RNG stream does not depend on the flags.
            grid = random_grids(b, image.shape[-1], self._rng, o.distort_crop_min, o.distort_elastic,
                                flip=o.distort_flip, device=dev)
            sel = flags.to(dev)
            ex = select(sel, distort(grid, image, "bilinear"), ex)
            ex_cond = select(sel, distort(grid, cond, "nearest"), ex_cond)
            if ex_label is not None and "label" in batch:
                ex_label = select(sel, distort_label(grid, batch["label"]), ex_label)
        out = dict(batch, exemplar=ex, exemplar_cond=ex_cond, self_ref=flags.to(dev, torch.float32))
        if ex_label is not None:
            out["exemplar_label"] = ex_label
        return out

    def _translate(self, cond, exemplar, exemplar_cond, **corr_kwargs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        corr = self.netCorr(cond, exemplar, exemplar_cond, **corr_kwargs)
        cbn = torch.cat([corr["warp"], cond], 1) if self.options.cbn_input == "warp_mask" else corr["warp"]
        return self.netG(cbn), corr

    def _discriminate(self, cond, fake, real):
        both = self.netD(torch.cat([torch.cat([cond, fake], 1), torch.cat([cond, real], 1)], 0))
        n = fake.shape[0]
        return [[f[:n] for f in s] for s in both], [[f[n:] for f in s] for s in both]

    def _context(self, fake_f: List[torch.Tensor], ref_f: List[torch.Tensor]) -> torch.Tensor:
        """Official ``get_ctx_loss``: 8 CX(r52) + 4 CX(r42) + 2 CX(avgpool2 r32) [+ CX(avgpool4 r22)]."""
        o = self.options
        centre = "pono" if o.norm == "positional" else "spatial"  # official: centring follows --PONO
        cx = lambda a, b: contextual_loss(a, b.detach(), h=o.context_h, centre=centre)  # noqa: E731
        loss = 8 * cx(fake_f[4], ref_f[4]) + 4 * cx(fake_f[3], ref_f[3])
        loss = loss + 2 * cx(F.avg_pool2d(fake_f[2], 2), F.avg_pool2d(ref_f[2], 2))
        if o.context_use_22:
            loss = loss + cx(F.avg_pool2d(fake_f[1], 4), F.avg_pool2d(ref_f[1], 4))
        return loss

    def _mask_loss(self, warp_mask: torch.Tensor, label: torch.Tensor, ex_label: torch.Tensor) -> torch.Tensor:
        """Official ``mask`` loss: NLL of the warped exemplar one-hot vs the label at the matching
        resolution, ignoring pixels whose class is absent from the exemplar, and the ignore label."""
        size = warp_mask.shape[2:]
        gt = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()
        ref = F.interpolate(ex_label[:, None].float(), size=size, mode="nearest")[:, 0].long()
        k = warp_mask.shape[1]
        present = F.one_hot(ref.flatten(1), k).amax(1).bool()  # (B, K) classes in the exemplar
        weight = torch.gather(present, 1, gt.flatten(1)).view_as(gt).float()
        if self.options.mask_ignore_label >= 0:
            weight = weight * (gt != self.options.mask_ignore_label).float()
        nll = F.nll_loss(torch.log(warp_mask + 1e-10), gt, reduction="none")
        return (nll * weight).sum() / (weight.sum() + 1e-5)

    def generator_losses(self, batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Weighted generator-side loss terms (only the switched-on ones) and the forward outputs."""
        o = self.options
        cond, image = batch["cond"], batch["image"]
        onehot = None
        if o.lambda_mask > 0:
            if "label" not in batch or "exemplar_label" not in batch:
                raise ValueError("cocosnet: lambda_mask > 0 needs 'label' and 'exemplar_label' in the batch")
            onehot = F.one_hot(batch["exemplar_label"], self.ctx.data.num_classes).permute(0, 3, 1, 2).float()
        fake, corr = self._translate(cond, batch["exemplar"], batch["exemplar_cond"],
                                     real=image if o.lambda_domain > 0 else None,
                                     cycle=o.lambda_cycle > 0, exemplar_onehot=onehot)
        self_ref = batch["self_ref"]
        sample_w = self_ref / (self_ref.sum() + 1e-5)  # official per-sample weights of fm / warp_self
        losses: Dict[str, torch.Tensor] = {}
        if o.lambda_domain > 0:
            losses["G_domain"] = o.lambda_domain * F.l1_loss(corr["feat_seg"], corr["feat_real"])
        if o.lambda_cycle > 0:
            losses["G_reg"] = o.lambda_cycle * F.l1_loss(corr["warp_cycle"], corr["cycle_target"])
        if o.lambda_warp_self > 0:
            losses["G_warp_self"] = o.lambda_warp_self * weighted_l1(corr["warp"], image, sample_w)
        if onehot is not None:
            losses["G_mask"] = o.lambda_mask * self._mask_loss(corr["warp_mask"], batch["label"], batch["exemplar_label"])
        if o.lambda_gan > 0 or o.lambda_gan_feat > 0:
            pred_fake, pred_real = self._discriminate(cond, fake, image)
            if o.lambda_gan > 0:
                losses["G_gan"] = o.lambda_gan * hinge_g_loss(pred_fake)
            if o.lambda_gan_feat > 0:
                losses["G_gan_feat"] = o.lambda_gan_feat * feature_matching_loss(pred_real, pred_fake)
        if self.vgg is not None:
            fake_f = list(self.vgg(fake).values())  # in VGG_LAYERS order
            with torch.no_grad():
                real_f = list(self.vgg(image).values()) if (o.lambda_feat_vgg > 0 or o.lambda_perc > 0) else None
                ref_f = list(self.vgg(batch["exemplar"]).values()) if o.lambda_context > 0 else None
            if o.lambda_feat_vgg > 0:
                fm = sum(w * weighted_l1(f, r, sample_w) for w, f, r in zip(FEAT_WEIGHTS, fake_f, real_f))
                losses["G_feat"] = o.lambda_feat_vgg * fm
            if o.lambda_perc > 0:
                i = PERC_LAYERS[o.perc_layer]
                losses["G_perc"] = o.lambda_perc * F.mse_loss(fake_f[i], real_f[i])
            if o.lambda_context > 0:
                losses["G_context"] = o.lambda_context * self._context(fake_f, ref_f)
        return losses, {"fake": fake, **corr}

    # ---- the harness interface -----------------------------------------------------------
    def train_step(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        o = self.options
        factor = self.lr_factor(step)
        for key, opt in self.optimizers().items():
            for group in opt.param_groups:
                group["lr"] = self._base_lr[key] * factor
        batch = self._pseudo_pairs(batch)
        losses, out = self.generator_losses(batch)
        if not losses:
            raise ValueError("cocosnet: every loss weight is 0; nothing to train")
        g_total = sum(losses.values())
        self.opt_g.zero_grad(set_to_none=True)
        g_total.backward()
        self.opt_g.step()
        result = {k: float(v.detach()) for k, v in losses.items()}
        result["G_total"] = float(g_total.detach())
        if o.lambda_gan > 0:
            # D on the fake of this G step (official pix2pix_trainer: GforD = the G step's output).
            pred_fake, pred_real = self._discriminate(batch["cond"], out["fake"].detach(), batch["image"])
            d_total = o.lambda_gan * hinge_d_loss(pred_real, pred_fake)
            self.opt_d.zero_grad(set_to_none=True)
            d_total.backward()
            self.opt_d.step()
            result["D_total"] = float(d_total.detach())
        result["self_ref_fraction"] = float(batch["self_ref"].mean())
        result["lr_factor"] = factor
        return result

    @torch.no_grad()
    def generate(self, batch: Dict[str, torch.Tensor]) -> MethodOutput:
        fake, corr = self._translate(batch["cond"], batch["exemplar"], batch["exemplar_cond"])
        warp = corr["warp_low"]
        return MethodOutput(output=fake, warps={str(warp.shape[-1]): warp})
