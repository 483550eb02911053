"""CoCosNet v1's translation network (official ``SPADEGenerator`` with ``CBN_intype='warp_mask'``).

A constant-free SPADE generator: the conditioning map (warped exemplar ++ condition) is resized to
``resolution / 32`` and convolved to start the trunk, then every SPADE block is modulated by the
same map. The parameter-free norm is positional normalisation (``--PONO``), which keeps per-pixel
structure of the warped exemplar (Sec. 3.2). ``--use_attention`` (set in every official command)
adds a SAGAN self-attention block (``methods.common.attention``) before ``up_2``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.common.attention import Attention
from methods.common.spade_blocks import SPADEResBlock


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
