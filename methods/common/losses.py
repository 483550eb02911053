"""Losses shared by the GAN-based methods: hinge GAN, discriminator feature matching, VGG
perceptual loss and KL divergence, with the official code's weightings."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import BackboneSettings
from methods.common.vgg import VGGFeatures


def hinge_d_terms(real: List[List[torch.Tensor]], fake: List[List[torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The discriminator hinge loss's real and fake terms, each averaged over scales (official
    ``GANLoss(for_discriminator=True)``: ``D_real`` = mean relu(1 - D(real)), ``D_Fake`` = mean
    relu(1 + D(fake)))."""
    real_term = sum(F.relu(1 - r[-1]).mean() for r in real) / len(real)
    fake_term = sum(F.relu(1 + f[-1]).mean() for f in fake) / len(fake)
    return real_term, fake_term


def hinge_d_loss(real: List[List[torch.Tensor]], fake: List[List[torch.Tensor]]) -> torch.Tensor:
    """Discriminator hinge loss, averaged over scales (real term + fake term)."""
    real_term, fake_term = hinge_d_terms(real, fake)
    return real_term + fake_term


def hinge_g_loss(fake: List[List[torch.Tensor]]) -> torch.Tensor:
    return sum(-f[-1].mean() for f in fake) / len(fake)


def feature_matching_loss(real: List[List[torch.Tensor]], fake: List[List[torch.Tensor]]) -> torch.Tensor:
    """L1 between the discriminator's intermediate features of fake and (detached) real, averaged
    over scales as in pix2pixHD/SPADE (``GAN_Feat_loss`` / num_D)."""
    loss = 0.0
    for r, f in zip(real, fake):
        for rf, ff in zip(r[:-1], f[:-1]):
            loss = loss + F.l1_loss(ff, rf.detach())
    return loss / len(real)


class VGGLoss(nn.Module):
    """SPADE's perceptual loss: L1 of VGG19 relu1_1..relu5_1 with weights 1/32 .. 1 (the sum; the
    caller applies lambda_vgg).

    ``imagenet_normalize=False`` (default) is the official SPADE loss: the [-1, 1] images go into
    torchvision's VGG19 as they are, without the ImageNet mean/std the weights were trained with.
    ``features`` replaces the shared pretrained VGG19 (see ``VGGFeatures``).
    """

    LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)

    def __init__(self, settings: BackboneSettings, layers: Sequence[str] = LAYERS,
                 weights: Sequence[float] = WEIGHTS, imagenet_normalize: bool = False,
                 features: Optional[nn.Module] = None):
        super().__init__()
        self.vgg = VGGFeatures(layers, settings, purpose="the VGG perceptual loss",
                               imagenet_normalize=imagenet_normalize, features=features)
        self.weights = dict(zip(layers, weights))

    @property
    def provenance(self) -> str:
        return self.vgg.provenance

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.vgg(x), self.vgg(y)
        return sum(w * F.l1_loss(fx[k], fy[k].detach()) for k, w in self.weights.items())


def kld_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over the batch and the code (the official
    ``KLDLoss``: not averaged over the batch)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
