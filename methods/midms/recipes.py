"""MIDMs' official per-dataset recipes: the options its per-dataset setting changes.

Source: MIDMs ``utils_training/optimize.py`` and the LDM configs it expects (reference/methods.md
1.3 and 2.3). The defaults are the CelebA-HQ edge setting (LDM celebahq-ldm-vq-4, perceptual r42
x 0.002), which DeepFashion shares. LSUN-Churches uses LDM lsun_churches-ldm-kl-8 and perceptual
r52 x 0.05. Not modelled: LSUN's extra 100 x warped-segmentation loss during warm-up.
"""
from __future__ import annotations

from typing import Any, Dict

RECIPES: Dict[str, Dict[str, Any]] = {
    "lsun_church": {
        "w_perc": 0.05, "perc_layer": "relu5_2",  # which_perceptual -1, weight_perceptual 0.05
        # first stage kl-f8: AutoencoderKL, ch 128 x (1, 2, 4, 4), z_channels 4
        "ae_type": "kl", "ae_channel_mult": [1, 2, 4, 4], "ae_latent_channels": 4,
        # UNet: model_channels 192 x (1, 2, 2, 4, 4), attention at downsampling 1, 2, 4, 8
        "unet_channels": 192, "unet_channel_mult": [1, 2, 2, 4, 4], "unet_attention_levels": [0, 1, 2, 3],
        "beta_end": 0.0155,  # linear 0.0015 -> 0.0155
    },
}
