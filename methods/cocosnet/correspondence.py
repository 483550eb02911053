"""CoCosNet v1's cross-domain correspondence network (official ``NoVGGCorrespondence``).

Two domain adaptors map the condition and the exemplar to a shared domain S (Sec. 3.1); their
outputs are L2-normalised over channels so the domain-alignment loss cannot shrink them to zero.
Both go through a shared stack of residual blocks (with ``maskmix`` the downsampled condition /
exemplar condition is concatenated first), then 1x1 theta/phi projections. 3x3 neighbourhoods are
unfolded into descriptors, centred over channels and L2-normalised; their cosine matrix M, scaled
by alpha (official temperature 0.01 = alpha 100), softmax-ed over exemplar positions, warps the
exemplar average-pooled to the matching resolution (1/4 by default). The transposed softmax (over
condition positions) warps the result back for the cycle (L_reg) loss.
reference/methods.md 1.1 lists the official layer sizes; the notes below say where this differs.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from methods.common.correspondence import centre_normalize, feature_normalize, soft_warp, soft_weights
from methods.common.spade_blocks import SPADEResBlock


def sn_instance_conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    """``norm_E='spectralinstance'``: spectral-norm conv without bias, then affine-free instance norm
    (the official ``get_nonspade_norm_layer`` deletes the bias because the norm cancels it)."""
    pad = 1  # official pw = ceil((3 - 1) / 2), also for the k = 4 stride-2 layers (exact halving)
    return nn.Sequential(spectral_norm(nn.Conv2d(cin, cout, kernel, stride, pad, bias=False)),
                         nn.InstanceNorm2d(cout, affine=False))


class DomainAdaptor(nn.Module):
    """Official ``AdaptiveFeatureGenerator``: 5 convs (two stride-2 by default: 1/4 resolution), then
    three SPADE residual blocks conditioned on the adaptor's own input. Output: ``4 * nf`` channels."""

    def __init__(self, in_nc: int, nf: int, kernel: int, down: int, hidden: int, norm: str):
        super().__init__()
        self.layer1 = sn_instance_conv(in_nc, nf, 3, 1)
        self.layer2 = sn_instance_conv(nf, 2 * nf, kernel, 2)
        self.layer3 = sn_instance_conv(2 * nf, 4 * nf, 3, 1)
        # Official --warp_stride 2 keeps layer4 at stride 1 (matching at 1/2 resolution).
        self.layer4 = sn_instance_conv(4 * nf, 8 * nf, kernel if down == 4 else 3, 2 if down == 4 else 1)
        self.layer5 = sn_instance_conv(8 * nf, 8 * nf, 3, 1)
        self.head_0 = SPADEResBlock(8 * nf, 8 * nf, in_nc, hidden, norm, padding="reflect")
        self.G_middle_0 = SPADEResBlock(8 * nf, 8 * nf, in_nc, hidden, norm, padding="reflect")
        self.G_middle_1 = SPADEResBlock(8 * nf, 4 * nf, in_nc, hidden, norm, padding="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seg = x  # official: adaptive_model_seg(seg, seg) / adaptive_model_img(ref, ref)
        h = self.layer1(x)
        for layer in (self.layer2, self.layer3, self.layer4, self.layer5):
            h = layer(F.leaky_relu(h, 0.2))
        h = self.head_0(h, seg)
        h = self.G_middle_0(h, seg)
        return self.G_middle_1(h, seg)


class ResidualBlock(nn.Module):
    """Official correspondence ``ResidualBlock``: reflect-pad conv, instance norm, PReLU (one shared
    slope), twice, with an identity skip and a final PReLU. The official convs carry biases that the
    following affine-free instance norm cancels exactly; they are left out (same function, no
    parameters that can never learn)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, bias=False)
        self.norm1 = nn.InstanceNorm2d(channels)
        self.norm2 = nn.InstanceNorm2d(channels)
        self.prelu = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.prelu(self.norm1(self.conv1(F.pad(x, (1, 1, 1, 1), mode="reflect"))))
        out = self.norm2(self.conv2(F.pad(out, (1, 1, 1, 1), mode="reflect")))
        return self.prelu(out + x)


def unfold_descriptors(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C * k * k, H * W)``: each position described by its k x k
    neighbourhood (official ``match_kernel``, zero padding like ``F.unfold(..., padding=k // 2)``)."""
    if kernel == 1:
        return x.flatten(2)
    return F.unfold(x, kernel_size=kernel, padding=kernel // 2)


def match_scores(theta: torch.Tensor, phi: torch.Tensor, kernel: int, centre: str) -> torch.Tensor:
    """The correlation matrix M of Eq. 3: ``(B, N_cond, N_exemplar)`` cosines of centred descriptors."""
    t = centre_normalize(unfold_descriptors(theta, kernel), centre)
    p = centre_normalize(unfold_descriptors(phi, kernel), centre)
    return torch.bmm(t.transpose(1, 2), p)


class CorrespondenceNet(nn.Module):
    def __init__(self, cond_nc: int, nf: int, inter_nc: int, *, adaptor_kernel: int, down: int,
                 hidden: int, norm: str, maskmix: bool, match_kernel: int, centre: str, alpha: float,
                 warp_bilinear: bool, warp_patch: bool):
        super().__init__()
        if down not in (2, 4):
            raise ValueError(f"cocosnet: warp_down must be 2 or 4 (official --warp_stride), got {down}")
        self.down, self.maskmix, self.match_kernel = down, maskmix, match_kernel
        self.centre, self.alpha = centre, alpha
        self.warp_bilinear, self.warp_patch = warp_bilinear, warp_patch
        self.adaptor_seg = DomainAdaptor(cond_nc, nf, adaptor_kernel, down, hidden, norm)
        self.adaptor_img = DomainAdaptor(3, nf, adaptor_kernel, down, hidden, norm)
        ch = 4 * nf + (cond_nc if maskmix else 0)  # official: feature_channel * 4 (+ label_nc)
        self.layer = nn.Sequential(*[ResidualBlock(ch) for _ in range(4)])
        self.theta = nn.Conv2d(ch, inter_nc, 1)
        self.phi = nn.Conv2d(ch, inter_nc, 1)

    def adapt(self, cond: torch.Tensor, image: torch.Tensor):
        """Shared-domain features of a condition and of an image, channel-normalised (x_S, y_S)."""
        return feature_normalize(self.adaptor_seg(cond)), feature_normalize(self.adaptor_img(image))

    def forward(self, cond: torch.Tensor, exemplar: torch.Tensor, exemplar_cond: torch.Tensor, *,
                real: Optional[torch.Tensor] = None, cycle: bool = False,
                exemplar_onehot: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Warp ``exemplar`` onto ``cond``.

        ``real`` (the condition's own photo) also runs the image adaptor on it, for the domain
        loss; ``cycle`` adds the forward-backward warp; ``exemplar_onehot`` (B, K, H, W) is warped
        with the same matrix (official ``warp_mask``, for the mask loss).
        """
        b, _, hgt, wid = exemplar.shape
        feat_seg, feat_img = self.adapt(cond, exemplar)
        out: Dict[str, torch.Tensor] = {"feat_seg": feat_seg, "feat_img": feat_img}
        if real is not None:
            out["feat_real"] = feature_normalize(self.adaptor_img(real))
        h, w = feat_seg.shape[2:]
        if self.maskmix:
            seg = F.interpolate(cond, size=(h, w), mode="nearest")
            ref_seg = F.interpolate(exemplar_cond, size=(h, w), mode="nearest")
            cont = self.layer(torch.cat([feat_seg, seg], 1))
            ref = self.layer(torch.cat([feat_img, ref_seg], 1))
        else:
            cont, ref = self.layer(feat_seg), self.layer(feat_img)
        scores = match_scores(self.theta(cont), self.phi(ref), self.match_kernel, self.centre)
        weights = soft_weights(scores, self.alpha, dim=-1)  # softmax over exemplar positions
        out["scores"], out["weights"] = scores, weights
        d = self.down
        if self.warp_patch:
            # Official --warp_patch (DeepFashion): warp d x d RGB patches, fold at full resolution.
            # The official fold size is hard-coded to 256; here it is the input size.
            src = F.unfold(exemplar, d, stride=d)
            warped = soft_warp(weights, src)
            out["warp"] = F.fold(warped, (hgt, wid), d, stride=d)
            out["warp_low"] = out["warp"]
        else:
            src = F.avg_pool2d(exemplar, d)
            out["warp_low"] = soft_warp(weights, src, (h, w))
            mode = dict(mode="bilinear", align_corners=False) if self.warp_bilinear else dict(mode="nearest")
            out["warp"] = F.interpolate(out["warp_low"], scale_factor=d, **mode)
        if cycle:
            # r_{y->x->y}(v) = sum_u softmax_u(alpha M(u, v)) r_{y->x}(u)  (Eq. 12)
            back = soft_weights(scores.transpose(1, 2), self.alpha, dim=-1)
            if self.warp_patch:
                cyc = soft_warp(back, F.unfold(out["warp"], d, stride=d))
                out["warp_cycle"] = F.fold(cyc, (hgt, wid), d, stride=d)
                out["cycle_target"] = exemplar
            else:
                out["warp_cycle"] = soft_warp(back, out["warp_low"], (h, w))
                out["cycle_target"] = src
        if exemplar_onehot is not None:
            ref_lab = F.interpolate(exemplar_onehot, size=(h, w), mode="nearest")
            out["warp_mask"] = soft_warp(weights, ref_lab, (h, w))
        return out
