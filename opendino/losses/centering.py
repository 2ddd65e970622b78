"""Teacher targets: centring + sharpening (DINO) and Sinkhorn-Knopp (SwAV-style), as in official DINOv2.

Reference: `dinov2/loss/dino_clstoken_loss.py` and `dinov2/loss/ibot_patch_loss.py` at b8931f7
(`softmax_center_teacher`, `update_center`, `sinkhorn_knopp_teacher`); `train.centering` picks one per run.
Differences from the official modules, none of which changes a number on float32 inputs:

- the centre update is synchronous (the official starts an asynchronous all-reduce in `update_center` and applies it
  at the next `softmax_center_teacher` call); call `softmax_center` with the old centre, then `CenterEMA.update`;
- one `CenterEMA` serves both losses: a 2-D input is the DINO update, a 3-D input the iBOT one (per-sample token
  mean first), and the centre is always stored as (1, K);
- `sinkhorn_knopp` does not all-reduce its `n_masked_patches` argument in place (the official mutates the tensor),
  and computes in float32 whatever the input dtype, like the official.

Teacher targets carry no gradient: every function here runs under `torch.no_grad()`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from opendino.dist import all_reduce, world_size

__all__ = ["CenterEMA", "sinkhorn_knopp", "softmax_center"]


@torch.no_grad()
def softmax_center(teacher_logits: Tensor, center: Tensor, temp: float) -> Tensor:
    """softmax((teacher_logits - center) / temp) over the last dim, in float32.

    `teacher_logits` (..., K), `center` broadcastable to it (the (1, K) buffer of `CenterEMA`); returns (..., K).
    """
    if temp <= 0:
        raise ValueError(f"teacher temperature must be > 0, got {temp}")
    if center.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"center has {center.shape[-1]} prototypes but teacher_logits has {teacher_logits.shape[-1]}")
    return torch.softmax((teacher_logits.float() - center) / temp, dim=-1)


class CenterEMA(nn.Module):
    """Running mean of the teacher logits across processes, subtracted before the teacher softmax.

    `center` is a persistent (1, K) float32 buffer (zeros at start), so it is saved with the module's state dict.
    One step: `probs = softmax_center(t, ema.center, temp)` then `ema.update(t)` (the target uses the centre of the
    previous steps, as in the official code).
    """

    center: Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"number of prototypes must be >= 1, got {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"centre momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def forward(self, teacher_logits: Tensor, temp: float) -> Tensor:
        """`softmax_center` with this module's centre (does not update it)."""
        return softmax_center(teacher_logits, self.center, temp)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        """center <- momentum * center + (1 - momentum) * batch centre, identical on every process.

        - (rows, K), the DINO update: batch centre = (sum of the rows, all-reduced) / (rows * world size), i.e. the
          mean over the global batch when every process has the same number of rows.
        - (n, M, K), the iBOT update: each of the n samples is first averaged over its M tokens; batch centre =
          (sum of those means, all-reduced) / (n * world size). The official iBOT step passes its masked tokens as
          (1, M, K): the centre is then the unweighted mean over processes of each process's masked-token mean,
          whatever the number of masked tokens on each.
        """
        if teacher_logits.ndim not in (2, 3) or teacher_logits.shape[-1] != self.center.shape[-1]:
            raise ValueError(
                f"teacher_logits must be (rows, {self.center.shape[-1]}) or (n, tokens, {self.center.shape[-1]}), "
                f"got shape {tuple(teacher_logits.shape)}"
            )
        if teacher_logits.shape[0] == 0 or teacher_logits.shape[1] == 0:
            raise ValueError(f"cannot update the centre from an empty batch, shape {tuple(teacher_logits.shape)}")
        per_sample = teacher_logits.float()
        if per_sample.ndim == 3:
            per_sample = per_sample.mean(1)  # (n, K)
        batch_center = all_reduce(per_sample.sum(dim=0, keepdim=True))  # (1, K)
        batch_center = batch_center / (len(teacher_logits) * world_size())
        self.center.copy_(self.center * self.momentum + batch_center * (1 - self.momentum))


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    temp: float,
    n_iterations: int = 3,
    n_masked_patches: int | Tensor | None = None,
) -> Tensor:
    """Balanced soft assignment of the rows of all processes to the K prototypes; returns (rows, K) float32.

    With Q = exp(teacher_logits / temp).T (K, B) over the B rows of all processes: Q /= sum(Q), then
    `n_iterations` times: each prototype row divided by its sum over all processes and by K, each column divided by
    its sum and by B; finally Q *= B, so every returned row sums to 1. The order of these operations is the
    official one, so results match it bit for bit on one process.

    B is `rows * world_size` (the DINO CLS-token case, same rows on every process) unless `n_masked_patches` is
    given: the iBOT case, where each process passes its own number of masked patches (which equals its rows and
    may differ between processes) and B is their all-reduced sum. Note that exp is taken without subtracting a
    maximum, as in the official code: logits / temp above ~88 overflow float32 (DINO head logits are cosines,
    |logit| <= 1, so this needs temp < 0.011).
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be (rows, K), got shape {tuple(teacher_logits.shape)}")
    if temp <= 0:
        raise ValueError(f"teacher temperature must be > 0, got {temp}")
    if n_iterations < 0:
        raise ValueError(f"n_iterations must be >= 0, got {n_iterations}")
    q = torch.exp(teacher_logits.float() / temp).t()  # (K, rows)
    n_prototypes = q.shape[0]
    n_total: int | Tensor
    if n_masked_patches is None:
        n_total = q.shape[1] * world_size()
    else:
        if isinstance(n_masked_patches, int) and n_masked_patches != q.shape[1]:
            raise ValueError(
                f"n_masked_patches ({n_masked_patches}) must equal the number of teacher rows ({q.shape[1]})"
            )
        # a tensor, like the official n_masked_patches_tensor: the division below is then elementwise, not by a
        # Python scalar, which on CUDA rounds differently
        n_total = all_reduce(torch.as_tensor(n_masked_patches, device=q.device).reshape(1).clone())

    q /= all_reduce(torch.sum(q))
    for _ in range(n_iterations):
        q /= all_reduce(torch.sum(q, dim=1, keepdim=True))  # each prototype: total weight 1/K
        q /= n_prototypes
        q /= torch.sum(q, dim=0, keepdim=True)  # each row: total weight 1/B
        q /= n_total
    q *= n_total
    return q.t()
