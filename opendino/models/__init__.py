"""Models: the DINOv2 vision transformer, its layers, the DINO head, named presets and checkpoint I/O."""

from opendino.models.heads import DINOHead
from opendino.models.vit import PRESETS, DinoVisionTransformer, build_vit

__all__ = ["PRESETS", "DINOHead", "DinoVisionTransformer", "build_vit"]
