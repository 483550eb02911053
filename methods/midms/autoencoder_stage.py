"""The first stage when no pretrained LDM is given: training the autoencoder from scratch, its
latent scale, and an optional content-keyed cache so the trials of a sweep share one stage.

MIDMs itself never trains the autoencoder (it uses LDM's frozen vq-f4 / kl-f8). Here the trial's
first ``ae_fraction`` of steps train it with L1 reconstruction (+ VQ codebook/commitment loss, or
LDM's tiny KL weight); LDM's LPIPS and patch-GAN terms are left out at this scale.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import VQModel

from methods.midms.components import FirstStage

KL_WEIGHT = 1e-6  # LDM autoencoder configs' kl_weight
CACHE_FORMAT = 1  # bump when what is stored (or how it is trained) changes


def encode(ae: FirstStage, images: torch.Tensor) -> torch.Tensor:
    """Unscaled latent: VQ models give the pre-quantisation latent (LDM's ``VQModelInterface``);
    KL models the posterior mode (deterministic evaluation; the official code samples)."""
    if isinstance(ae, VQModel):
        return ae.encode(images).latents
    return ae.encode(images).latent_dist.mode()


def decode(ae: FirstStage, latents: torch.Tensor) -> torch.Tensor:
    """Image in [-1, 1] (VQ models quantise first, straight-through for gradients)."""
    return ae.decode(latents).sample


@torch.no_grad()
def init_codebook_from_data(ae: VQModel, images: torch.Tensor) -> None:
    """Initialise the codebook with encoder outputs of the first batch (plus a little jitter), so
    training starts with codes covering the latent distribution instead of a tiny ball at 0 (a
    from-scratch VQ otherwise collapses onto a handful of codes)."""
    z = ae.encode(images).latents.permute(0, 2, 3, 1).reshape(-1, ae.config.vq_embed_dim or ae.config.latent_channels)
    emb = ae.quantize.embedding.weight
    idx = torch.randint(0, z.shape[0], (emb.shape[0],), device=z.device)
    emb.copy_(z[idx] + 0.01 * z.std() * torch.randn_like(emb))


def reconstruction_loss(ae: FirstStage, images: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
    if isinstance(ae, VQModel):
        out = ae(images)
        rec = F.l1_loss(out.sample, images)
        commit = out.commit_loss.mean()
        return rec + commit, {"ae_rec": float(rec.detach()), "ae_codebook": float(commit.detach())}
    post = ae.encode(images).latent_dist
    rec = F.l1_loss(ae.decode(post.sample()).sample, images)
    kl = post.kl().mean() / images[0].numel()
    return rec + KL_WEIGHT * kl, {"ae_rec": float(rec.detach()), "ae_kl": float(kl.detach())}


class FirstStageCache:
    """``<dir>/midms_ae_<key>.pt``: a trained first stage under a hash of everything that made it."""

    def __init__(self, directory: str):
        self.dir = Path(os.path.expandvars(os.path.expanduser(directory)))

    @staticmethod
    def key(content: Dict[str, Any]) -> str:
        blob = json.dumps({"format": CACHE_FORMAT, **content}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def path(self, key: str) -> Path:
        return self.dir / f"midms_ae_{key}.pt"

    def load(self, key: str) -> Optional[Dict[str, Any]]:
        p = self.path(key)
        if not p.is_file():
            return None
        return torch.load(p, map_location="cpu", weights_only=True)

    def save(self, key: str, ae: FirstStage, content: Dict[str, Any]) -> Path:
        """Atomic write (temp file + rename), so concurrent trials never read half a file."""
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path(key)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        state = {k: v.detach().cpu() for k, v in ae.state_dict().items()}
        torch.save({"state_dict": state, "content": json.dumps(content, sort_keys=True, default=str)}, tmp)
        os.replace(tmp, p)
        return p


def is_vq(ae: FirstStage) -> bool:
    return isinstance(ae, VQModel)
