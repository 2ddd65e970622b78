"""DINOv2 training losses: DINO (CLS token), iBOT (masked patches), KoLeo, and the teacher targets they use.

Pure functions of tensors (plus the small `CenterEMA` state); they import only torch and `opendino.dist`. Loss
weights and the teacher temperature schedule belong to the training step.
"""

from opendino.losses.centering import CenterEMA, sinkhorn_knopp, softmax_center
from opendino.losses.dino import dino_loss, dino_multicrop_loss
from opendino.losses.ibot import ibot_loss, ibot_loss_dense, ibot_masks_weight
from opendino.losses.koleo import koleo_loss, koleo_multicrop

__all__ = [
    "CenterEMA",
    "dino_loss",
    "dino_multicrop_loss",
    "ibot_loss",
    "ibot_loss_dense",
    "ibot_masks_weight",
    "koleo_loss",
    "koleo_multicrop",
    "sinkhorn_knopp",
    "softmax_center",
]
