"""CoCosNet v1's translation network (official ``SPADEGenerator`` with ``CBN_intype='warp_mask'``).

A constant-free SPADE generator: the conditioning map (warped exemplar ++ condition) is resized to
``resolution / 32`` and convolved to start the trunk, then every SPADE block is modulated by the
same map. The parameter-free norm is positional normalisation (``--PONO``), which keeps per-pixel
structure of the warped exemplar (Sec. 3.2). ``--use_attention`` (set in every official command)
adds a SAGAN self-attention block before ``up_2``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from methods.common.spade_blocks import SPADEResBlock


class Attention(nn.Module):
    """Official ``architecture.Attention`` (SAGAN): theta/phi at C/8, g at C/2 with 2x2 max-pooling
    of the keys, output conv back to C, learnable gain ``gamma`` initialised to 0 (so the block
    starts as the identity and its convs get gradient only once gamma moves)."""

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


class CoCosNetGenerator(nn.Module):
    """Trunk 16-16-16-8-4-2-1 x ngf over five x2 upsamplings (from ``resolution / 32``)."""

    def __init__(self, cbn_nc: int, ngf: int, resolution: int, hidden: int, norm: str, use_attention: bool):
        super().__init__()
        self.sh = resolution // 32
        nf = ngf
        self.fc = nn.Conv2d(cbn_nc, 16 * nf, 3, padding=1)
        blk = lambda fin, fout: SPADEResBlock(fin, fout, cbn_nc, hidden, norm, padding="reflect")  # noqa: E731
        self.head_0 = blk(16 * nf, 16 * nf)
        self.G_middle_0 = blk(16 * nf, 16 * nf)
        self.G_middle_1 = blk(16 * nf, 16 * nf)
        self.up_0 = blk(16 * nf, 8 * nf)
        self.up_1 = blk(8 * nf, 4 * nf)
        self.attn = Attention(4 * nf) if use_attention else None
        self.up_2 = blk(4 * nf, 2 * nf)
        self.up_3 = blk(2 * nf, nf)
        self.conv_img = nn.Conv2d(nf, 3, 3, padding=1)

    def forward(self, cbn_in: torch.Tensor) -> torch.Tensor:
        up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
        x = self.fc(F.interpolate(cbn_in, size=(self.sh, self.sh), mode="nearest"))
        x = self.head_0(x, cbn_in)
        x = up(x)
        x = self.G_middle_0(x, cbn_in)
        x = self.G_middle_1(x, cbn_in)
        x = self.up_0(up(x), cbn_in)
        x = self.up_1(up(x), cbn_in)
        x = up(x)
        if self.attn is not None:
            x = self.attn(x)
        x = self.up_2(x, cbn_in)
        x = self.up_3(up(x), cbn_in)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 2e-1)))
