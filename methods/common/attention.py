"""SAGAN self-attention (Zhang et al. 2019) as CoCosNet's ``architecture.Attention``: used in
CoCosNet v1's generator (before ``up_2``) and discriminator (on the input of the last 4x4 conv),
both with ``--use_attention``, which every official command sets."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm


class Attention(nn.Module):
    """theta/phi 1x1 convs to C/8, g to C/2, keys and values 2x2 max-pooled, output conv back to C,
    learnable gain ``gamma`` initialised to 0 (the block starts as the identity; its convs get
    gradient only once gamma moves). Spectral norm on the four convs when ``use_sn`` (official:
    ``'spectral' in norm_G / norm_D``, true in every command). Channel counts are at least 1 so
    tiny-width runs still build (official: exactly C // 8 and C // 2)."""

    def __init__(self, ch: int, use_sn: bool = True):
        super().__init__()
        sn = spectral_norm if use_sn else (lambda m: m)
        self.ch = ch
        self.ck, self.cv = max(1, ch // 8), max(1, ch // 2)
        self.theta = sn(nn.Conv2d(ch, self.ck, 1, bias=False))
        self.phi = sn(nn.Conv2d(ch, self.ck, 1, bias=False))
        self.g = sn(nn.Conv2d(ch, self.cv, 1, bias=False))
        self.o = sn(nn.Conv2d(self.cv, ch, 1, bias=False))
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).view(b, self.ck, h * w)
        phi = F.max_pool2d(self.phi(x), 2).view(b, self.ck, h * w // 4)
        g = F.max_pool2d(self.g(x), 2).view(b, self.cv, h * w // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(b, self.cv, h, w))
        return self.gamma * o + x
