"""KoLeo regulariser: spreads the student's CLS features by pushing each one away from its nearest neighbour.

Reference: Sablayrolles et al. 2019, "Spreading vectors for similarity search" (the Kozachenko-Leonenko entropy
estimator); `KoLeoLoss` in `dinov2/loss/koleo_loss.py` and its use in `dinov2/train/ssl_meta_arch.py` (L311-L320) at
b8931f7: on the backbone's CLS tokens of the global crops (before the head), separately for each crop, so that two
crops of one image are never each other's neighbour. Always computed in float32 with autocast off. One deviation: the
diagonal is excluded with -inf (the official writes -1, so with exactly antipodal neighbours a vector can pick itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["koleo_loss", "koleo_multicrop"]

# the official module's PairwiseDistance eps, fixed whatever the `eps` passed to its forward
_PDIST_EPS = 1e-8


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """-mean_i log(|x_i - x_nn(i)| + eps) over the L2-normalised rows x of `features` (n, D), n >= 2; a scalar.

    Definition::

        x = normalize(features, dim=-1, eps=eps)
        loss = 0
        for i in range(n):
            j = argmax(x[i] @ x[k] for k in range(n) if k != i)   # nearest neighbour on the sphere
            loss -= log(norm(x[i] - x[j] + 1e-8) + eps) / n      # torch.pairwise_distance adds 1e-8

    The neighbour choice carries no gradient; the distance does.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"KoLeo needs features of shape (n >= 2, D), got {tuple(features.shape)}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()  # (n, n)
            dots.fill_diagonal_(float("-inf"))
            neighbour = dots.argmax(dim=1)  # (n,)
        distances = F.pairwise_distance(x, x[neighbour], p=2, eps=_PDIST_EPS)  # (n,)
        return -torch.log(distances + eps).mean()


def koleo_multicrop(student_global_cls: Tensor, n_global_crops: int = 2, eps: float = 1e-8) -> Tensor:
    """Sum over the global crops of `koleo_loss` of that crop's B CLS tokens; a scalar.

    `student_global_cls` (n_global_crops * B, D), crop-major (crop 0 of all images, then crop 1, ...): the student
    backbone's normed CLS tokens. The official step adds `dino.koleo_loss_weight` times this to the total and logs
    that divided by 2 as `koleo_loss` (L314-L320).
    """
    if student_global_cls.ndim != 2 or n_global_crops < 1 or student_global_cls.shape[0] % n_global_crops:
        raise ValueError(
            f"student_global_cls must be (n_global_crops * B, D) with n_global_crops={n_global_crops}, "
            f"got {tuple(student_global_cls.shape)}"
        )
    return torch.stack([koleo_loss(crop, eps) for crop in student_global_cls.chunk(n_global_crops)]).sum()
