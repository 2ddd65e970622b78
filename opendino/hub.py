"""`opendino.hub`: the named DINOv2 backbones, as in `torch.hub.load("facebookresearch/dinov2", name)` but offline.

`opendino.hub.dinov2_vits14(pretrained="path/to/dinov2_vits14_pretrain.pth")`; see `opendino.models.hub`.
"""

from opendino.models.hub import (
    HUB_MODELS,
    build_backbone,
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
    load_backbone,
)

__all__ = [
    "HUB_MODELS",
    "build_backbone",
    "dinov2_vitb14",
    "dinov2_vitb14_reg",
    "dinov2_vitg14",
    "dinov2_vitg14_reg",
    "dinov2_vitl14",
    "dinov2_vitl14_reg",
    "dinov2_vits14",
    "dinov2_vits14_reg",
    "load_backbone",
]
