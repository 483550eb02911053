"""CoCosNet v2's official per-dataset recipes: the options its official training command sets.

Source: the microsoft/CoCosNet-v2 README (DeepFashion-HD is its only released configuration).
Every other flag of that command is already a default of ``CoCosNetV2Options`` (``--nef 32
--iteration_count 5 --temperature 0.01 --match_kernel 1 --featEnc_kernel 3 --PONO --PONO_C
--vgg_normal_correct --which_perceptual 4_2 --weight_perceptual 0.001 --weight_fm_ratio 1.0
--weight_warp_self 500 --weight_warp_cycle 1.0 --no_flip``); the optimiser (``--lr 1e-4`` with
TTUR: G 5e-5, D 2e-4, betas (0, 0.9)) is the method's official default (``OFFICIAL_OPTIM``).

``--video_like --real_reference_probability 0.0``: every training exemplar is the same person in
another pose and the photo is its ground truth (self_ref = 1). Here: take the dataset's exemplar
and its ``target`` for every sample; the dataset entry must provide same-person exemplars
(``options: {train_exemplars: self_pair}``, a dataset option a recipe cannot set).
"""
from __future__ import annotations

from typing import Any, Dict

RECIPES: Dict[str, Dict[str, Any]] = {
    "deepfashion-hd": {"real_reference_probability": 1.0, "use_target_as_gt": True},
}
