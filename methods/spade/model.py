"""SPADE (Park et al., CVPR 2019) as an exemplar-based baseline.

The exemplar enters through SPADE's style encoder (its VAE mode): an image is encoded to a
style code ``z`` that initialises the generator, and the condition map modulates every block.
This is how the CoCosNet papers run SPADE as an exemplar baseline. Training follows the
official VAE protocol: the style code comes from the condition's own photo (``image``), so the
generator learns to reconstruct it; at evaluation the exemplar is encoded instead.
Defaults are the official ones (reference/methods.md 1.4): hinge GAN (1), discriminator
feature matching (10), VGG19 loss (10), KLD (0.05), TTUR Adam.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import ExemplarMethod, MethodContext, MethodOutput, scaled
from methods.common.discriminator import MultiscaleDiscriminator
from methods.common.losses import (VGGLoss, feature_matching_loss, hinge_d_loss, hinge_g_loss,
                                   kld_loss)
from methods.common.spade_blocks import SPADEDecoder
from methods.registry import METHODS


@dataclass
class SPADEOptions:
    ngf: int = 64  # generator width at scale.width = 1 (official --ngf)
    ndf: int = 64  # discriminator width at scale.width = 1 (official --ndf)
    z_dim: int = 256  # style code size (official --z_dim)
    num_d: int = 2  # discriminator scales (official --num_D)
    n_layers_d: int = 4  # PatchGAN depth (official --n_layers_D, 4 after issue #50)
    spade_hidden: int = 128  # SPADE MLP hidden channels (official nhidden)
    norm: str = "batch"  # SPADE param-free norm: batch (official, sync-BN), instance, positional
    use_vae: bool = True  # style encoder; False = plain SPADE with a condition-only input
    lambda_gan: float = 1.0
    lambda_feat: float = 10.0  # discriminator feature matching (official --lambda_feat)
    lambda_vgg: float = 10.0  # VGG19 perceptual loss (official --lambda_vgg); 0 = off
    lambda_kld: float = 0.05  # KL of the style code (official --lambda_kld)
    style_source: str = "image"  # training style input: "image" (official VAE) or "exemplar"


class StyleEncoder(nn.Module):
    """SPADE's ``ConvEncoder``: stride-2 3x3 convs with instance norm, then mu/logvar from a 4x4 map.

    The official encoder resizes its input to 256; here stride-2 convs run until 4x4 (adaptive
    pooling below 4) so small resolutions keep every pixel.
    """

    def __init__(self, ndf: int, z_dim: int, resolution: int):
        super().__init__()
        n_down = max(1, int(math.log2(resolution // 4)))
        layers, cin = [], 3
        for i in range(n_down):
            cout = ndf * min(2 ** i, 8)
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.2)]
            cin = cout
        self.net = nn.Sequential(*layers)
        self.fc_mu = nn.Linear(cin * 16, z_dim)
        self.fc_var = nn.Linear(cin * 16, z_dim)

    def forward(self, x: torch.Tensor):
        h = F.adaptive_avg_pool2d(self.net(x), 4).flatten(1)
        return self.fc_mu(h), self.fc_var(h)


@METHODS.register("spade")
class SPADEMethod(ExemplarMethod):
    Options = SPADEOptions
    has_warp = False

    def __init__(self, options: SPADEOptions, ctx: MethodContext):
        super().__init__(options, ctx)
        o, r = options, ctx.resolution
        if r < 32 or r & (r - 1):
            raise ValueError(f"spade: resolution must be a power of two >= 32, got {r}")
        if o.style_source not in ("image", "exemplar"):
            raise ValueError(f"spade: style_source must be 'image' or 'exemplar', got {o.style_source!r}")
        ngf, ndf = scaled(o.ngf, ctx.width), scaled(o.ndf, ctx.width)
        self.sh = r // 32  # five upsamplings, as SPADE's "normal" setting at 256 -> 8x8 start
        label_nc = ctx.data.cond_channels
        self.z_dim = scaled(o.z_dim, ctx.width, minimum=8)
        if o.use_vae:
            self.encoder = StyleEncoder(ndf, self.z_dim, r)
            self.fc = nn.Linear(self.z_dim, 16 * ngf * self.sh * self.sh)
        else:
            self.fc = nn.Conv2d(label_nc, 16 * ngf, 3, padding=1)
        self.decoder = SPADEDecoder(ngf, label_nc, num_up=5, hidden=scaled(o.spade_hidden, ctx.width), norm=o.norm)
        self.ngf = ngf
        self.netD = MultiscaleDiscriminator(label_nc + 3, ndf, o.n_layers_d, o.num_d)
        self.vgg_loss = VGGLoss(ctx.backbones) if o.lambda_vgg > 0 else None
        if self.vgg_loss is not None:
            self.provenance["vgg19_loss"] = self.vgg_loss.provenance
        self.to(ctx.device)
        g_params = [p for n, p in self.named_parameters() if not n.startswith("netD.")]
        self.opt_g = torch.optim.Adam(g_params, lr=ctx.lr_g, betas=(ctx.beta1, ctx.beta2))
        self.opt_d = torch.optim.Adam(self.netD.parameters(), lr=ctx.lr_d, betas=(ctx.beta1, ctx.beta2))

    def optimizers(self):
        return {"g": self.opt_g, "d": self.opt_d}

    def _generate(self, cond: torch.Tensor, style: torch.Tensor, sample: bool):
        mu = logvar = None
        if self.options.use_vae:
            mu, logvar = self.encoder(style)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
            x = self.fc(z).view(-1, 16 * self.ngf, self.sh, self.sh)
        else:
            x = self.fc(F.interpolate(cond, size=(self.sh, self.sh), mode="nearest"))
        return self.decoder(x, cond), mu, logvar

    def _discriminate(self, cond, fake, real):
        both = self.netD(torch.cat([torch.cat([cond, fake], dim=1), torch.cat([cond, real], dim=1)], dim=0))
        n = fake.shape[0]
        return ([[f[:n] for f in s] for s in both], [[f[n:] for f in s] for s in both])

    def train_step(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        o = self.options
        cond, real = batch["cond"], batch["image"]
        style = batch["image"] if o.style_source == "image" else batch["exemplar"]
        # Generator step.
        fake, mu, logvar = self._generate(cond, style, sample=True)
        pred_fake, pred_real = self._discriminate(cond, fake, real)
        losses = {"G_gan": o.lambda_gan * hinge_g_loss(pred_fake)}
        if o.lambda_feat > 0:
            losses["G_feat"] = o.lambda_feat * feature_matching_loss(pred_real, pred_fake)
        if self.vgg_loss is not None:
            losses["G_vgg"] = o.lambda_vgg * self.vgg_loss(fake, real)
        if o.use_vae and o.lambda_kld > 0:
            losses["G_kld"] = o.lambda_kld * kld_loss(mu, logvar) / mu.shape[0]
        g_total = sum(losses.values())
        self.opt_g.zero_grad(set_to_none=True)
        g_total.backward()
        self.opt_g.step()
        # Discriminator step.
        pred_fake, pred_real = self._discriminate(cond, fake.detach(), real)
        d_total = hinge_d_loss(pred_real, pred_fake)
        self.opt_d.zero_grad(set_to_none=True)
        d_total.backward()
        self.opt_d.step()
        out = {k: float(v.detach()) for k, v in losses.items()}
        out.update(G_total=float(g_total.detach()), D_total=float(d_total.detach()))
        return out

    @torch.no_grad()
    def generate(self, batch: Dict[str, torch.Tensor]) -> MethodOutput:
        fake, _, _ = self._generate(batch["cond"], batch["exemplar"], sample=False)
        return MethodOutput(output=fake)
