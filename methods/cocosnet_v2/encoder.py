"""Multi-level domain alignment network (CoCosNet v2 Sec. 3.1, appendix Table 6) and the
reconstruction network R of the mapping loss (Eq. 13-14).

The official ``AdaptiveFeatureGenerator`` (reference/methods.md 1.2) is a U-Net: at 512 with
nef = 32 the encoder is conv(in->nef) @512, conv(nef->2nef)+RB @512, then three stride-2
conv+RB stages (4nef) @256, @128, @64; the decoder goes back up with SPADE residual blocks
conditioned on the encoder's own input, adding the skip connections (bilinear x2, align_corners)
and emits one feature map per level: 64^2 x 4nef, 128^2 x 4nef, 256^2 x 2nef, 512^2 x nef.

Here the ladder is expressed by downsampling *factors* relative to the run's resolution
(8, 4, 2, 1 = the paper's 64/128/256/512 at 512^2), so the same architecture runs at 64^2 as
8/16/32/64. The encoder always goes down to the coarsest requested factor and the decoder stops
at the finest requested one (Table 4's "64" variant has no decoder above 64^2).
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from methods.common.spade_blocks import SPADEResBlock

# CoCosNet v2's ``PositionalNorm2d`` epsilon (unbiased variance across channels + 1e-8).
PONO_EPS = 1e-8


class ResidualBlock(nn.Module):
    """Official ``architecture.ResidualBlock``: reflection-padded 3x3 convs, instance norm, PReLU."""

    def __init__(self, ch: int):
        super().__init__()
        self.relu = nn.PReLU()
        self.model = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch), self.relu,
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.model(x))


def sn_in_conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    """A conv with the official encoder norm ``spectralinstance``: spectral norm, no bias (the
    official ``get_nonspade_norm_layer`` deletes it: the affine-free InstanceNorm cancels it)."""
    return nn.Sequential(spectral_norm(nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, bias=False)),
                         nn.InstanceNorm2d(cout, affine=False))


def level_channels(nef: int, factor: int) -> int:
    """Decoder output channels at a level: nef * min(factor, 4) (official: 4nef@/8, 4nef@/4,
    2nef@/2, nef@/1)."""
    return nef * min(factor, 4)


def skip_channels(nef: int, factor: int) -> int:
    """Encoder channels at a factor: 2nef at full resolution, 4nef below (official x2..x5)."""
    return 2 * nef if factor == 1 else 4 * nef


class MultiLevelEncoder(nn.Module):
    """M_A or M_B (Eq. 1-2): an image-like input -> features at the requested factors, coarsest first."""

    def __init__(self, in_nc: int, nef: int, factors: Sequence[int], kernel: int = 3, spade_hidden: int = 128):
        super().__init__()
        self.factors = list(factors)
        coarsest, finest = self.factors[0], self.factors[-1]
        n_down = int(math.log2(coarsest))
        self.layer1 = sn_in_conv(in_nc, nef, 3, 1)
        self.layer2 = nn.Sequential(sn_in_conv(nef, 2 * nef, 3, 1), ResidualBlock(2 * nef))
        downs, cin = [], 2 * nef
        for i in range(n_down):
            # official featEnc_kernel (3) with stride 2; the appendix table says k4s2
            downs.append(nn.Sequential(sn_in_conv(cin, 4 * nef, kernel, 2), ResidualBlock(4 * nef)))
            cin = 4 * nef
        self.downs = nn.ModuleList(downs)
        # Decoder: head at the coarsest factor, then one block per finer factor down to ``finest``.
        block = lambda cin, cout: SPADEResBlock(cin, cout, in_nc, spade_hidden, "positional",  # noqa: E731
                                                padding="reflect", pono_eps=PONO_EPS)
        ups = [block(skip_channels(nef, coarsest), level_channels(nef, coarsest))]
        f, cin = coarsest, level_channels(nef, coarsest)
        while f > finest:
            f //= 2
            ups.append(block(cin, level_channels(nef, f)))
            cin = level_channels(nef, f)
        self.ups = nn.ModuleList(ups)

    @staticmethod
    def actvn(x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, 2e-1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        seg = x  # the SPADE blocks are conditioned on the encoder's own input (official)
        h = self.layer1(x)
        h = self.layer2(self.actvn(h))
        skips = {1: h}
        f = 1
        for down in self.downs:
            h = down(self.actvn(h))
            f *= 2
            skips[f] = h
        f = self.factors[0]
        h = self.ups[0](skips[f], seg)
        feats = [h]
        for block in self.ups[1:]:
            f //= 2
            up = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True)
            if up.shape[1] != skips[f].shape[1]:
                raise RuntimeError("encoder channel schedule mismatch")  # guarded by the schedule
            h = block(up + skips[f], seg)
            feats.append(h)
        return feats


class Reconstructor(nn.Module):
    """R of Eq. 13-14: latent features of the finest used level -> an image in the target domain.

    Not in the official code (its losses have no L_map), so the architecture is ours: two 3x3
    convs and tanh, then bilinear upsampling to the output resolution when the finest level is
    coarser than the image.
    """

    def __init__(self, in_ch: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_ch, hidden, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(hidden, 3, 3, padding=1), nn.Tanh())

    def forward(self, feat: torch.Tensor, size: int) -> torch.Tensor:
        y = self.net(feat)
        if y.shape[-1] != size:
            y = F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False)
        return y
