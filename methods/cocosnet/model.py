"""CoCosNet v1 (Zhang et al., "Cross-domain Correspondence Learning for Exemplar-based Image
Translation", CVPR 2020) following the official code (microsoft/CoCosNet @de0c1bb; reference/methods.md
1.1, 2.1, 7), which it matches to float64 rounding on the parity fixtures (bench/parity/cocosnet.py).

Pipeline: the correspondence network (``correspondence.py``) adapts condition and exemplar to a
shared domain, matches them densely at 1/4 resolution and soft-warps the exemplar; the translation
network (``translation.py``) is a SPADE generator with positional normalisation conditioned on
(warped exemplar ++ condition); a multi-scale spectral-norm PatchGAN with self-attention judges
(condition, image).

Option defaults are the official ``train_options.py``/``base_options.py`` defaults, except the
flags set in *every* official README command, which are on here: ``--PONO --PONO_C
--use_attention --vgg_normal_correct``. Per-dataset flags (``--maskmix``, ``--warp_bilinear``,
``--adaptor_kernel 4``, ``--fm_ratio 1.0``, ``--which_perceptual 4_2 --weight_perceptual 0.001``,
``--warp_cycle_w``, ``--weight_mask``, ``--warp_self_w``, ``--no_flip``, ``--video_like``) are
options with the README values in their comments; ``recipes.py`` holds each dataset's command.

Training pairs (official ``pix2pix_dataset.py``): a sample's exemplar comes from the dataset
(official: the retrieved exemplar list, dataset option ``train_exemplars: ref_list``); with
probability ``self_ref_probability`` (1 - ``--real_reference_probability`` = 0.3) it is replaced by
a self-reference, the photo itself re-cropped and flipped (``pseudo_pair: recrop``, see
``augment.py``), and the sample's ``self_ref`` flag is 1. L_feat and L_warp_self only count
self-reference samples. Losses (each 0 = off: the term is not computed and not returned):

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
                   (``contextual``)
``G_domain``       L_domain: L1(adaptor_seg(cond), adaptor_img(photo))     lambda_domain     10
                   (``no_vgg_feat``)
``G_reg``          L_reg: L1(cycle warp, pooled exemplar) (``G_warp_cycle``) lambda_cycle      0 (1 edge)
``G_mask``         NLL of the warped exemplar one-hot vs the label (``mask``) lambda_mask       0 (100 ADE)
``G_warp_self``    L1(warp, photo) on self-ref samples (``G_warp_self``)    lambda_warp_self  0 (100 DF)
``D_real``         hinge real term, mean over scales, x lambda_gan (``D_real``)
``D_fake``         hinge fake term, mean over scales, x lambda_gan (``D_Fake``)
=================  =====================================================  ================  ===========

Remaining differences from the official code (docs/methods.md, CoCosNet, has the full list):
* Self-references are drawn here, from the unaugmented training photo (official: the data loader,
  whose input photo is itself a random crop; see ``augment.py``).
* L_feat / L_warp_self keep the official per-sample weights self_ref / sum(self_ref) inside a mean
  over the batch, i.e. an extra 1/B: their effective weight depends on the batch size (the
  official per-GPU batch was 4).
* ``--warp_patch`` folds to the run's resolution (official: a hard-coded 256).
* Not implemented: ``--two_cycle``, ``--noise_for_mask``/``--mask_noise``, ``--use_coordconv``,
  EMA, the domain classifier, the D's unused ``dec`` decoder, ``--warp_mask_losstype cycle``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

from methods.base import ExemplarMethod, MethodContext, MethodOutput, scaled
from methods.cocosnet.augment import distort, distort_label, random_grids, recrop_grids, select
from methods.cocosnet.correspondence import CorrespondenceNet
from methods.cocosnet.recipes import RECIPES
from methods.cocosnet.translation import CoCosNetGenerator
from methods.common.contextual import contextual_loss
from methods.common.discriminator import MultiscaleDiscriminator
from methods.common.init import official_init
from methods.common.losses import feature_matching_loss, hinge_d_terms, hinge_g_loss
from methods.common.vgg_caffe import OFFICIAL_NAMES, VGG19Features
from methods.registry import METHODS

VGG_LAYERS = tuple(OFFICIAL_NAMES.values())  # relu1_2 ... relu5_2 = official r12, r22, r32, r42, r52
FEAT_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)  # official fm weights for r12..r52
PERC_LAYERS = {"relu4_2": 3, "relu5_2": 4}  # index in the r12..r52 list
PSEUDO_PAIRS = ("recrop", "distort", "exemplar")
# Official Adam with TTUR (pix2pix_model.create_optimizers, lr 2e-4): G + Corr at lr / 2, D at
# 2 lr, betas (0, 0.9); the G optimiser's eps is 1e-3 (``adam_eps_g``), D's torch's 1e-8.
OFFICIAL_OPTIM = dict(lr_g=1e-4, lr_d=4e-4, beta1=0.0, beta2=0.9)


@dataclass
class CoCosNetOptions:
    # --- architecture ---
    ngf: int = 64  # generator/adaptor width at scale.width = 1 (official --ngf)
    ndf: int = 64  # discriminator width (official --ndf)
    num_d: int = 2  # discriminator scales (official --num_D)
    n_layers_d: int = 4  # PatchGAN depth (official --n_layers_D)
    d_padding: int = 1  # padding of the D's 4x4 convs: 1 official (int((4 - 1) / 2)); 2 = SPADE's ceil
    spade_hidden: int = 128  # SPADE MLP channels (official nhidden, hard-coded)
    norm: str = "positional"  # SPADE param-free norm: positional (official --PONO, all commands), batch, instance
    use_attention: bool = True  # self-attention in G before up_2 and in D before its last 4x4 conv group (official --use_attention, all commands)
    adaptor_kernel: int = 3  # stride-2 kernels of the domain adaptors (official --adaptor_kernel; 4 for the CelebA-HQ/edge/DeepFashion releases)
    corr_nc: int = 256  # theta/phi channels at width 1 (official inter_channels, hard-coded)
    match_kernel: int = 3  # neighbourhood matched per position (official --match_kernel)
    corr_centre: str = "channel"  # descriptor centring: channel (official --PONO_C, all commands) or spatial
    alpha: float = 100.0  # softmax sharpness (paper alpha; official temperature=0.01 default argument)
    warp_down: int = 4  # matching at 1/warp_down resolution: 4 or 2 (official --warp_stride)
    warp_bilinear: bool = False  # bilinear (else nearest) upsampling of the warp (official --warp_bilinear; on for CelebA-HQ/edge/DeepFashion)
    warp_patch: bool = False  # warp warp_down^2 RGB patches instead of the pooled exemplar (official --warp_patch, DeepFashion)
    maskmix: bool = False  # concatenate the (exemplar) condition before matching (official --maskmix; ADE20k, CelebA-HQ mask and edge)
    cbn_input: str = "warp_mask"  # generator conditioning: warp_mask = warp ++ condition, or warp (official --CBN_intype)
    init_type: str = "xavier"  # weight init of G, Corr and D: xavier, normal, kaiming, orthogonal, xavier_uniform, none (official --init_type)
    init_gain: float = 0.02  # (official --init_variance)
    # Official GPU path (.cuda() before init_weights): spectral-norm layers keep torch's default init
    # (methods/common/init.py). False = the official CPU path: init_type/init_gain written into them too.
    init_sn_keep_default: bool = True
    vgg: str = "caffe"  # VGG19 of the losses: caffe = the official vgg19_conv.pth (common/vgg_caffe.py), or torchvision
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
    # --- self-reference (pseudo exemplar) pairs ---
    self_ref_probability: float = 0.3  # 1 - official --real_reference_probability (0.7; 0.0 -> 1.0 for DeepFashion)
    # recrop: the photo through the official training crop + flip, drawn afresh (official self-reference);
    # distort: recrop-like crop + flip plus a smooth elastic warp (the paper's "image warping");
    # exemplar: the batch's exemplar already is a same-subject pair (official --video_like, DeepFashion).
    pseudo_pair: str = "recrop"
    pseudo_flip: bool = True  # random horizontal flip of self-references (official unless --no_flip, which DeepFashion sets)
    recrop_scale: float = 256 / 286  # recrop: crop side / resized side (official crop_size / load_size)
    distort_crop_min: float = 0.895  # distort: smallest crop side kept (256/286)
    distort_elastic: float = 0.05  # distort: max smooth displacement, fraction of the side
    # --- optimisation ---
    adam_eps_g: float = 1e-3  # Adam eps of G + Corr (official, hard-coded); D uses the default 1e-8
    lr_decay_start: float = 0.5  # fraction of steps before the linear decay to 0 (official niter / (niter + niter_decay)); 1 = none


def weighted_l1(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Official ``util.weighted_l1_loss``: mean over all elements of |x - y| * w[sample].

    With w = self_ref / sum(self_ref) this is (1/B) x the mean over self-ref samples -- an extra
    1/B of the official code (its per-GPU batch was 4), kept for fidelity.
    """
    return ((x - y).abs() * w.view(-1, 1, 1, 1)).mean()


@METHODS.register("cocosnet")
class CoCosNetMethod(ExemplarMethod):
    Options = CoCosNetOptions
    sync_batchnorm = True  # official: SynchronizedBatchNorm2d across GPUs (train.sync_bn)
    has_warp = True
    recipes = RECIPES
    pretrained_exclude = ("vgg.",)

    def __init__(self, options: CoCosNetOptions, ctx: MethodContext):
        super().__init__(options, ctx)
        o, r = options, ctx.resolution
        if r < 32 or r & (r - 1):
            raise ValueError(f"cocosnet: resolution must be a power of two >= 32, got {r}")
        checks = [(o.norm in ("positional", "batch", "instance"), f"norm {o.norm!r}"),
                  (o.corr_centre in ("channel", "spatial"), f"corr_centre {o.corr_centre!r}"),
                  (o.cbn_input in ("warp_mask", "warp"), f"cbn_input {o.cbn_input!r}"),
                  (o.perc_layer in PERC_LAYERS, f"perc_layer {o.perc_layer!r} (relu4_2 or relu5_2)"),
                  (o.pseudo_pair in PSEUDO_PAIRS, f"pseudo_pair {o.pseudo_pair!r} (one of {PSEUDO_PAIRS})"),
                  (o.match_kernel % 2 == 1, f"match_kernel {o.match_kernel} (must be odd)"),
                  (o.d_padding in (1, 2), f"d_padding {o.d_padding} (1 or 2)"),
                  (0.0 <= o.self_ref_probability <= 1.0, "self_ref_probability outside [0, 1]"),
                  (0.0 < o.recrop_scale <= 1.0, "recrop_scale outside (0, 1]"),
                  (0.0 < o.distort_crop_min <= 1.0, "distort_crop_min outside (0, 1]")]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("cocosnet: invalid options: " + "; ".join(bad))
        if ctx.training and ctx.data.params.get("exemplars") == "pseudo" and o.pseudo_pair != "exemplar" \
                and o.self_ref_probability < 1:
            # Every training exemplar is already a pseudo pair: L_feat would count only the
            # self_ref_probability share of them. Official sampling wants train_exemplars: ref_list.
            warnings.warn("cocosnet: the dataset's training exemplars are all pseudo pairs; set the dataset "
                          "option train_exemplars: ref_list (official sampling) or self_ref_probability: 1.0")
        if ctx.training:
            side = r // 2 ** (o.num_d - 1)  # the coarsest D scale's input
            for n in range(1, o.n_layers_d + 1):  # the normed 4x4 convs: stride 2, the last stride 1
                side = (side + 2 * o.d_padding - 4) // (2 if n < o.n_layers_d else 1) + 1
            if side < 2:  # its instance norm needs more than one position (train mode)
                raise ValueError(f"cocosnet: at resolution {r} the discriminator's coarsest scale shrinks to {side}x{side} "
                                 f"before its last instance norm; use fewer scales (num_d), d_padding 2 or a larger resolution")
        if o.lambda_mask > 0 and ctx.data.num_classes != ctx.data.cond_channels:
            raise ValueError("cocosnet: lambda_mask > 0 needs a one-hot label-map condition (num_classes = "
                             f"cond_channels), got num_classes={ctx.data.num_classes}, cond_channels={ctx.data.cond_channels}")
        cond_nc = ctx.data.cond_channels
        ngf, ndf = scaled(o.ngf, ctx.width), scaled(o.ndf, ctx.width)
        hidden = scaled(o.spade_hidden, ctx.width)
        self.netCorr = CorrespondenceNet(
            cond_nc, ngf, scaled(o.corr_nc, ctx.width), adaptor_kernel=o.adaptor_kernel, down=o.warp_down,
            hidden=hidden, norm=o.norm, maskmix=o.maskmix, match_kernel=o.match_kernel,
            centre=o.corr_centre, alpha=o.alpha, warp_bilinear=o.warp_bilinear, warp_patch=o.warp_patch)
        cbn_nc = 3 + (cond_nc if o.cbn_input == "warp_mask" else 0)
        self.netG = CoCosNetGenerator(cbn_nc, ngf, r, hidden, o.norm, o.use_attention)
        # Training-only networks: none for evaluation-only trials (ctx.training False).
        self.netD = (MultiscaleDiscriminator(cond_nc + 3, ndf, o.n_layers_d, o.num_d, padding=o.d_padding,
                                             use_attention=o.use_attention) if ctx.training else None)
        for net in (self.netCorr, self.netG, self.netD):
            if net is not None:
                official_init(net, o.init_type, o.init_gain, spectral_norm_keeps_default=o.init_sn_keep_default)
        self.vgg = None
        if ctx.training and (o.lambda_feat_vgg > 0 or o.lambda_perc > 0 or o.lambda_context > 0):
            self.vgg = VGG19Features(o.vgg, VGG_LAYERS, ctx.backbones, f"CoCosNet's VGG losses (vgg: {o.vgg})")
            self.provenance[f"vgg19_{o.vgg}"] = self.vgg.provenance
        # Private RNG for self-reference sampling: reproducible per seed and saved in checkpoints.
        self._rng = torch.Generator().manual_seed(ctx.seed * 7919 + 17)
        self.to(ctx.device)
        self.opt_g = self.opt_d = None
        self._base_lr: Dict[str, float] = {}
        if ctx.training:
            optim = ctx.official_optim(**OFFICIAL_OPTIM)
            betas = (optim["beta1"], optim["beta2"])
            g_params = list(self.netG.parameters()) + list(self.netCorr.parameters())
            self.opt_g = torch.optim.Adam(g_params, lr=optim["lr_g"], betas=betas, eps=o.adam_eps_g)
            self.opt_d = torch.optim.Adam(self.netD.parameters(), lr=optim["lr_d"], betas=betas)
            self._base_lr = {"g": optim["lr_g"], "d": optim["lr_d"]}
            self.resolved.update(optim, adam_eps_g=o.adam_eps_g, adam_eps_d=1e-8)

    # ---- bookkeeping ---------------------------------------------------------------------
    def optimizers(self):
        return {"g": self.opt_g, "d": self.opt_d} if self.opt_g is not None else {}

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
    def _self_reference_grid(self, b: int, size: int, device) -> torch.Tensor:
        o = self.options
        if o.pseudo_pair == "recrop":
            return recrop_grids(b, size, self._rng, o.recrop_scale, flip=o.pseudo_flip, device=device)
        return random_grids(b, size, self._rng, o.distort_crop_min, o.distort_elastic, flip=o.pseudo_flip,
                            device=device)

    def _pseudo_pairs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The training inputs with self-reference samples swapped in; adds ``self_ref`` (B,) float."""
        o = self.options
        cond, image = batch["cond"], batch["image"]
        b, dev = cond.shape[0], cond.device
        flags = torch.rand(b, generator=self._rng) < o.self_ref_probability
        ex, ex_cond, ex_label = batch["exemplar"], batch["exemplar_cond"], batch.get("exemplar_label")
        if o.pseudo_pair != "exemplar":
            # The grid is drawn for every sample so the RNG stream does not depend on the flags.
            grid = self._self_reference_grid(b, image.shape[-1], dev)
            sel = flags.to(dev)
            ex = select(sel, distort(grid, image, "bilinear"), ex)
            ex_cond = select(sel, distort(grid, cond, "nearest"), ex_cond)
            if ex_label is not None and "label" in batch:
                ex_label = select(sel, distort_label(grid, batch["label"]), ex_label)
        out = dict(batch, exemplar=ex, exemplar_cond=ex_cond, self_ref=flags.to(dev, image.dtype))
        if ex_label is not None:
            out["exemplar_label"] = ex_label
        return out

    def _translate(self, cond, exemplar, exemplar_cond, **corr_kwargs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        corr = self.netCorr(cond, exemplar, exemplar_cond, **corr_kwargs)
        cbn = torch.cat([corr["warp"], cond], 1) if self.options.cbn_input == "warp_mask" else corr["warp"]
        return self.netG(cbn), corr

    def _discriminate(self, cond, fake, real):
        """D on (condition ++ fake) and (condition ++ real) in one batch, fakes first (official)."""
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
        # float32 weights whatever the run's dtype, as the official ``.float()``: in a float64 run
        # the + 1e-5 then vanishes into the float32 sum, as it does there.
        weight = torch.gather(present, 1, gt.flatten(1)).view_as(gt).float()
        if self.options.mask_ignore_label >= 0:
            weight = weight * (gt != self.options.mask_ignore_label).float()
        nll = F.nll_loss(torch.log(warp_mask + 1e-10), gt, reduction="none")
        return (nll * weight).sum() / (weight.sum() + 1e-5)

    def generator_losses(self, batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """Weighted generator-side loss terms (only the switched-on ones) and the forward outputs:
        the correspondence outputs, ``fake``, and when computed the D predictions (``pred_fake``,
        ``pred_real``) and VGG features (``vgg_fake``, ``vgg_real``, ``vgg_ref``: lists r12..r52)."""
        o = self.options
        cond, image = batch["cond"], batch["image"]
        if o.lambda_mask > 0 and ("label" not in batch or "exemplar_label" not in batch):
            raise ValueError("cocosnet: lambda_mask > 0 needs 'label' and 'exemplar_label' in the batch")
        # The mask loss warps the exemplar's one-hot condition (official ref_semantics) with the match.
        fake, corr = self._translate(cond, batch["exemplar"], batch["exemplar_cond"],
                                     real=image if o.lambda_domain > 0 else None, cycle=o.lambda_cycle > 0,
                                     exemplar_onehot=batch["exemplar_cond"] if o.lambda_mask > 0 else None)
        out: Dict[str, Any] = {"fake": fake, **corr}
        self_ref = batch["self_ref"]
        sample_w = self_ref / (self_ref.sum() + 1e-5)  # official per-sample weights of fm / warp_self
        losses: Dict[str, torch.Tensor] = {}
        if o.lambda_domain > 0:
            losses["G_domain"] = o.lambda_domain * F.l1_loss(corr["feat_seg"], corr["feat_real"])
        if o.lambda_cycle > 0:
            losses["G_reg"] = o.lambda_cycle * F.l1_loss(corr["warp_cycle"], corr["cycle_target"])
        if o.lambda_warp_self > 0:
            losses["G_warp_self"] = o.lambda_warp_self * weighted_l1(corr["warp"], image, sample_w)
        if o.lambda_mask > 0:
            losses["G_mask"] = o.lambda_mask * self._mask_loss(corr["warp_mask"], batch["label"], batch["exemplar_label"])
        if o.lambda_gan > 0 or o.lambda_gan_feat > 0:
            pred_fake, pred_real = self._discriminate(cond, fake, image)
            out.update(pred_fake=pred_fake, pred_real=pred_real)
            if o.lambda_gan > 0:
                losses["G_gan"] = o.lambda_gan * hinge_g_loss(pred_fake)
            if o.lambda_gan_feat > 0:
                losses["G_gan_feat"] = o.lambda_gan_feat * feature_matching_loss(pred_real, pred_fake)
        if self.vgg is not None:
            fake_f = list(self.vgg(fake).values())  # in VGG_LAYERS order
            out["vgg_fake"] = fake_f
            with torch.no_grad():
                if o.lambda_feat_vgg > 0 or o.lambda_perc > 0:
                    out["vgg_real"] = list(self.vgg(image).values())
                if o.lambda_context > 0:
                    out["vgg_ref"] = list(self.vgg(batch["exemplar"]).values())
            if o.lambda_feat_vgg > 0:
                fm = sum(w * weighted_l1(f, r, sample_w) for w, f, r in zip(FEAT_WEIGHTS, fake_f, out["vgg_real"]))
                losses["G_feat"] = o.lambda_feat_vgg * fm
            if o.lambda_perc > 0:
                i = PERC_LAYERS[o.perc_layer]
                losses["G_perc"] = o.lambda_perc * F.mse_loss(fake_f[i], out["vgg_real"][i])
            if o.lambda_context > 0:
                losses["G_context"] = o.lambda_context * self._context(fake_f, out["vgg_ref"])
        return losses, out

    def discriminator_losses(self, batch: Dict[str, torch.Tensor], fake: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The weighted hinge terms of D on ``fake`` (detached) and the photo (official ``D_real``,
        ``D_Fake``); empty when the GAN loss is off."""
        if self.options.lambda_gan <= 0:
            return {}
        pred_fake, pred_real = self._discriminate(batch["cond"], fake.detach(), batch["image"])
        real_term, fake_term = hinge_d_terms(pred_real, pred_fake)
        return {"D_real": self.options.lambda_gan * real_term, "D_fake": self.options.lambda_gan * fake_term}

    # ---- the harness interface -----------------------------------------------------------
    def train_step(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        if self.opt_g is None:
            raise RuntimeError("cocosnet: built for evaluation only (ctx.training is False); cannot train")
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
        # D on the fake of this G step (official pix2pix_trainer: GforD = the G step's output).
        d_losses = self.discriminator_losses(batch, out["fake"])
        if d_losses:
            d_total = sum(d_losses.values())
            self.opt_d.zero_grad(set_to_none=True)
            d_total.backward()
            self.opt_d.step()
            result.update({k: float(v.detach()) for k, v in d_losses.items()})
            result["D_total"] = float(d_total.detach())
        result["self_ref_fraction"] = float(batch["self_ref"].mean())
        result["lr_factor"] = factor
        return result

    @torch.no_grad()
    def generate(self, batch: Dict[str, torch.Tensor]) -> MethodOutput:
        fake, corr = self._translate(batch["cond"], batch["exemplar"], batch["exemplar_cond"])
        warp = corr["warp_low"]
        return MethodOutput(output=fake, warps={str(warp.shape[-1]): warp})
