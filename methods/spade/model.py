"""SPADE (Park et al., CVPR 2019) as an exemplar-based baseline, equal to the official code
(NVlabs/SPADE @fecacc9) by default.

The exemplar enters through SPADE's style encoder (its VAE mode, ``--use_vae``): an image is
encoded to mu/logvar, a style code ``z`` is drawn from them and initialises the generator, and the
condition map modulates every block. This is how the CoCosNet papers run SPADE as an exemplar
baseline. Training follows the official VAE protocol: the style code comes from the condition's own
photo (``image``), so the generator learns to reconstruct it; at evaluation the exemplar is encoded
instead. ``use_vae=False`` is the plain SPADE of the released ADE20K generator (the condition,
downsampled to the first feature map, through a 3x3 conv).

Official behaviour kept by default (docs/methods.md, SPADE, lists every difference from the paper):
the style encoder resizes its input to 256x256; z is *sampled* at test time too (here from a
stream seeded with the trial seed, restarted at every evaluation, so evaluations are reproducible);
KLD is summed over batch and code; the VGG loss feeds the raw [-1, 1] image to torchvision's VGG19;
the discriminator step regenerates the fake with a fresh z; G, D and E get the official
``init_weights`` (xavier, gain 0.02) on the GPU path (spectral-norm weights keep torch's default);
Adam with TTUR (G 1e-4, D 4e-4, betas (0, 0.9)).

Losses (``generator_losses`` / ``discriminator_losses``; official names in brackets):
``G_gan`` [GAN] hinge x lambda_gan (1), ``G_feat`` [GAN_Feat] discriminator feature matching x
lambda_feat (10), ``G_vgg`` [VGG] x lambda_vgg (10), ``G_kld`` [KLD] x lambda_kld (0.05);
``D_real`` [D_real] and ``D_fake`` [D_Fake] hinge terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from methods.base import ExemplarMethod, MethodContext, MethodOutput, scaled
from methods.common.discriminator import MultiscaleDiscriminator
from methods.common.init import official_init
from methods.common.losses import (VGGLoss, feature_matching_loss, hinge_d_terms, hinge_g_loss,
                                   kld_loss)
from methods.common.spade_blocks import SPADEDecoder
from methods.registry import METHODS

# The official optimiser (TTUR: --lr 2e-4 halved for G, doubled for D; --beta1 0, --beta2 0.9).
OFFICIAL_OPTIM = dict(lr_g=1e-4, lr_d=4e-4, beta1=0.0, beta2=0.9)


@dataclass
class SPADEOptions:
    ngf: int = 64  # generator (and style encoder) width at scale.width = 1 (official --ngf)
    ndf: int = 64  # discriminator width at scale.width = 1 (official --ndf)
    z_dim: int = 256  # style code size (official --z_dim)
    num_d: int = 2  # discriminator scales (official --num_D)
    n_layers_d: int = 4  # PatchGAN depth (official --n_layers_D, 4 after issue #50)
    spade_hidden: int = 128  # SPADE MLP hidden channels (official nhidden, hard-coded)
    norm: str = "batch"  # SPADE param-free norm: batch (official, sync-BN), instance, positional
    num_upsampling_layers: str = "normal"  # official option: normal (5 x2 upsamplings), more (6), most (7)
    use_vae: bool = True  # style encoder; False = plain SPADE with a condition-only input (the released G)
    # The style encoder resizes its input to encoder_size x encoder_size (bilinear) and downsamples it
    # to 4x4: official 256 (six stride-2 layers). Smaller sizes (fewer layers) keep tiny runs cheap.
    encoder_size: int = 256
    # z at evaluation: "sample" (official test.py: reparameterised from the exemplar's mu/logvar, with
    # a stream seeded by the trial seed) or "mean" (z = mu, deterministic).
    eval_z: str = "sample"
    lambda_gan: float = 1.0
    lambda_feat: float = 10.0  # discriminator feature matching (official --lambda_feat); 0 = off
    lambda_vgg: float = 10.0  # VGG19 perceptual loss (official --lambda_vgg); 0 = off
    lambda_kld: float = 0.05  # KL of the style code, summed over batch and code (official --lambda_kld)
    # False (official): the [-1, 1] image goes into the VGG19 as it is; True: ImageNet mean/std first.
    vgg_imagenet_norm: bool = False
    style_source: str = "image"  # training style input: "image" (official VAE) or "exemplar"
    init_type: str = "xavier"  # official --init_type (BaseNetwork.init_weights)
    init_variance: float = 0.02  # official --init_variance (the init's gain)


class StyleEncoder(nn.Module):
    """SPADE's ``ConvEncoder`` (``norm_E`` spectralinstance): stride-2 3x3 spectral-norm convs without
    bias, each followed by an affine-free InstanceNorm (``layerN`` = that pair, official names),
    LeakyReLU(0.2) between, then ``fc_mu`` / ``fc_var`` on the flattened 4x4 map.

    The input is first resized to ``input_size`` (bilinear, align_corners=False; official 256, where
    six layers reach 4x4 -- the official code builds the sixth only for crop_size >= 256 and cannot
    run below); ``input_size`` 2^k gives k - 2 layers with ``nf * min(2^i, 8)`` channels.
    """

    def __init__(self, nf: int, z_dim: int, input_size: int = 256):
        super().__init__()
        if input_size < 8 or input_size & (input_size - 1):
            raise ValueError(f"spade: encoder_size must be a power of two >= 8, got {input_size}")
        self.input_size = input_size
        cin = 3
        self.num_layers = int(math.log2(input_size)) - 2
        for i in range(self.num_layers):
            cout = nf * min(2 ** i, 8)
            conv = spectral_norm(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False))
            setattr(self, f"layer{i + 1}", nn.Sequential(conv, nn.InstanceNorm2d(cout, affine=False)))
            cin = cout
        self.fc_mu = nn.Linear(cin * 16, z_dim)
        self.fc_var = nn.Linear(cin * 16, z_dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        s = self.input_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        for i in range(self.num_layers):
            x = F.leaky_relu(getattr(self, f"layer{i + 1}")(x), 0.2)
        x = x.flatten(1)
        return self.fc_mu(x), self.fc_var(x)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """z = eps * exp(logvar / 2) + mu, with eps ~ N(0, 1) drawn from the global stream unless given."""
    std = torch.exp(0.5 * logvar)
    if eps is None:
        eps = torch.randn_like(std)
    return eps * std + mu


@METHODS.register("spade")
class SPADEMethod(ExemplarMethod):
    Options = SPADEOptions
    sync_batchnorm = True  # official: SynchronizedBatchNorm2d across GPUs (train.sync_bn)
    has_warp = False

    def __init__(self, options: SPADEOptions, ctx: MethodContext):
        super().__init__(options, ctx)
        o, r = options, ctx.resolution
        for name, value, allowed in (("style_source", o.style_source, ("image", "exemplar")),
                                     ("eval_z", o.eval_z, ("sample", "mean"))):
            if value not in allowed:
                raise ValueError(f"spade: {name} must be one of {allowed}, got {value!r}")
        down = SPADEDecoder.downsampling(o.num_upsampling_layers)
        if r < down or r % down:
            raise ValueError(f"spade: resolution must be a multiple of {down} (num_upsampling_layers "
                             f"{o.num_upsampling_layers!r}), got {r}")
        self.sh = r // down  # official sw = crop_size / 2^(upsamplings), square images (aspect ratio 1)
        self.ngf = ngf = scaled(o.ngf, ctx.width)
        label_nc = ctx.data.cond_channels
        self.z_dim = scaled(o.z_dim, ctx.width, minimum=8)
        # The official netG: fc + the SPADE trunk.
        if o.use_vae:
            self.fc = nn.Linear(self.z_dim, 16 * ngf * self.sh * self.sh)
        else:
            self.fc = nn.Conv2d(label_nc, 16 * ngf, 3, padding=1)
        self.decoder = SPADEDecoder(ngf, label_nc, o.num_upsampling_layers, hidden=scaled(o.spade_hidden, ctx.width),
                                    norm=o.norm)
        networks = [self.fc, self.decoder]
        if o.use_vae:
            self.encoder = StyleEncoder(ngf, self.z_dim, o.encoder_size)  # official: ndf = opt.ngf
            networks.append(self.encoder)
        self.netD = self.vgg_loss = None
        if ctx.training:
            # official define_D: padding 2 (ceil(3/2)); input = condition + image
            self.netD = MultiscaleDiscriminator(label_nc + 3, scaled(o.ndf, ctx.width), o.n_layers_d, o.num_d,
                                                padding=2)
            networks.append(self.netD)
            if o.lambda_vgg > 0:
                self.vgg_loss = VGGLoss(ctx.backbones, imagenet_normalize=o.vgg_imagenet_norm)
                self.provenance["vgg19_loss"] = self.vgg_loss.provenance
        for net in networks:
            # official define_G/D/E: init_weights after .cuda() -- spectral-norm weights keep torch's
            # default init on that (GPU) path, where the published models were trained.
            official_init(net, o.init_type, o.init_variance)
        self._eval_rng: Optional[torch.Generator] = None
        self.to(ctx.device)
        self.opt_g = self.opt_d = None
        if ctx.training:
            optim = ctx.official_optim(**OFFICIAL_OPTIM)
            self.resolved.update(optim)
            betas = (optim["beta1"], optim["beta2"])
            g_params = [p for n, p in self.named_parameters() if not n.startswith("netD.")]
            self.opt_g = torch.optim.Adam(g_params, lr=optim["lr_g"], betas=betas)
            self.opt_d = torch.optim.Adam(self.netD.parameters(), lr=optim["lr_d"], betas=betas)

    def optimizers(self):
        return {"g": self.opt_g, "d": self.opt_d} if self.opt_g is not None else {}

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self._eval_rng = None  # every evaluation draws the same z stream (restarts at the trial seed)
        return self

    # ---- networks -------------------------------------------------------------------------------
    def generator(self, cond: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The official netG(seg, z): the image from a style code (VAE) or from the condition alone."""
        if self.options.use_vae:
            x = self.fc(z).view(-1, 16 * self.ngf, self.sh, self.sh)
        else:
            x = self.fc(F.interpolate(cond, size=(self.sh, self.sh), mode="nearest"))
        return self.decoder(x, cond)

    def discriminate(self, cond: torch.Tensor, fake: torch.Tensor, real: torch.Tensor):
        """(pred_fake, pred_real): fakes and reals go through D in one batch, fakes first (official)."""
        both = self.netD(torch.cat([torch.cat([cond, fake], dim=1), torch.cat([cond, real], dim=1)], dim=0))
        n = fake.shape[0]
        return [[f[:n] for f in s] for s in both], [[f[n:] for f in s] for s in both]

    def generate_fake(self, batch: Dict[str, torch.Tensor], eps: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The training-time fake (official ``generate_fake``): z reparameterised from the style
        input's mu/logvar (``eps`` from the global stream unless given). Keys fake, mu, logvar."""
        out: Dict[str, torch.Tensor] = {}
        z = None
        if self.options.use_vae:
            style = batch["image"] if self.options.style_source == "image" else batch["exemplar"]
            out["mu"], out["logvar"] = self.encoder(style)
            z = reparameterize(out["mu"], out["logvar"], eps)
        out["fake"] = self.generator(batch["cond"], z)
        return out

    # ---- losses ---------------------------------------------------------------------------------
    def generator_losses(self, batch: Dict[str, torch.Tensor], eps: Optional[torch.Tensor] = None):
        """(weighted G losses by name, the ``generate_fake`` outputs) of one official generator step."""
        o = self.options
        gen = self.generate_fake(batch, eps)
        losses: Dict[str, torch.Tensor] = {}
        if o.use_vae and o.lambda_kld > 0:
            losses["G_kld"] = o.lambda_kld * kld_loss(gen["mu"], gen["logvar"])
        pred_fake, pred_real = self.discriminate(batch["cond"], gen["fake"], batch["image"])
        losses["G_gan"] = o.lambda_gan * hinge_g_loss(pred_fake)
        if o.lambda_feat > 0:
            losses["G_feat"] = o.lambda_feat * feature_matching_loss(pred_real, pred_fake)
        if self.vgg_loss is not None:
            losses["G_vgg"] = o.lambda_vgg * self.vgg_loss(gen["fake"], batch["image"])
        return losses, gen

    def discriminator_losses(self, batch: Dict[str, torch.Tensor], eps: Optional[torch.Tensor] = None):
        """(D losses by name, the ``generate_fake`` outputs) of one official discriminator step, which
        regenerates the fake (without gradients) with a fresh z."""
        with torch.no_grad():
            gen = self.generate_fake(batch, eps)
        pred_fake, pred_real = self.discriminate(batch["cond"], gen["fake"].detach(), batch["image"])
        d_real, d_fake = hinge_d_terms(pred_real, pred_fake)
        return {"D_real": d_real, "D_fake": d_fake}, gen

    def train_step(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        g_losses, _ = self.generator_losses(batch)
        g_total = sum(g_losses.values())
        self.opt_g.zero_grad(set_to_none=True)
        g_total.backward()
        self.opt_g.step()
        d_losses, _ = self.discriminator_losses(batch)
        d_total = sum(d_losses.values())
        self.opt_d.zero_grad(set_to_none=True)
        d_total.backward()
        self.opt_d.step()
        out = {k: float(v.detach()) for k, v in {**g_losses, **d_losses}.items()}
        out.update(G_total=float(g_total.detach()), D_total=float(d_total.detach()))
        return out

    # ---- evaluation -----------------------------------------------------------------------------
    def _eval_noise(self, like: torch.Tensor) -> torch.Tensor:
        if self._eval_rng is None:
            self._eval_rng = torch.Generator(device=like.device).manual_seed(self.ctx.seed)
        return torch.randn(like.shape, generator=self._eval_rng, device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def generate(self, batch: Dict[str, torch.Tensor]) -> MethodOutput:
        z = None
        if self.options.use_vae:
            mu, logvar = self.encoder(batch["exemplar"])
            z = mu if self.options.eval_z == "mean" else reparameterize(mu, logvar, self._eval_noise(mu))
        return MethodOutput(output=self.generator(batch["cond"], z))
