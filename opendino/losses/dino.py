"""DINO loss on the CLS token: cross-entropy from the teacher's targets to the student's softmax, across crops.

Reference: `DINOLoss.forward` in `dinov2/loss/dino_clstoken_loss.py` and the crop pairing and averaging of
`SSLMetaArch.forward_backward` in `dinov2/train/ssl_meta_arch.py` (L147-L148, L163-L164, L278-L309) at b8931f7.
Here the double loop over crops is one elementwise product of crop sums, computed in float32 (the official
log-softmax also runs in float32 under autocast). Teacher targets come from `losses.centering`; loss weights are
applied by the training step, not here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dino_loss", "dino_multicrop_loss"]


def _stack(tensors: Sequence[Tensor] | Tensor, name: str) -> Tensor:
    """(n, B, K) from a (n, B, K) tensor or a sequence of n (B, K) tensors."""
    if isinstance(tensors, Tensor):
        stacked = tensors
    else:
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"{name} must be a non-empty sequence of same-shape (B, K) tensors, got shapes {shapes}")
        stacked = torch.stack(list(tensors))
    if stacked.ndim != 3 or stacked.shape[0] == 0 or stacked.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one non-empty (B, K) tensor, got shape {tuple(stacked.shape)}")
    return stacked


def dino_loss(
    student_logits: Sequence[Tensor] | Tensor, teacher_probs: Sequence[Tensor] | Tensor, *, student_temp: float = 0.1
) -> Tensor:
    """Sum over every (student crop, teacher crop) pair of the batch-mean cross-entropy; a scalar.

    `student_logits`: S crops of (B, K) logits, as a sequence or an (S, B, K) tensor; `teacher_probs`: T crops of
    (B, K) target distributions (rows summing to 1), likewise. Row b of every crop is image b. Definition::

        loss = 0
        for s in student_logits:
            log_p = log_softmax(s / student_temp, dim=-1)
            for t in teacher_probs:
                loss -= (t * log_p).sum(dim=-1).mean()

    which is -sum_{b,k} (sum_t t)[b, k] * (sum_s log_p)[b, k] / B.
    """
    s = _stack(student_logits, "student_logits")
    t = _stack(teacher_probs, "teacher_probs")
    if s.shape[1:] != t.shape[1:]:
        raise ValueError(f"student crops are {tuple(s.shape[1:])} but teacher crops are {tuple(t.shape[1:])} (B, K)")
    log_p = F.log_softmax(s.float() / student_temp, dim=-1)  # (S, B, K)
    return -(log_p.sum(0) * t.float().sum(0)).sum() / s.shape[1]


def dino_multicrop_loss(
    student_global_logits: Tensor,
    student_local_logits: Tensor | None,
    teacher_probs: Tensor,
    *,
    n_global_crops: int = 2,
    student_temp: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """(global_loss, local_loss): the official `dino_global_crops_loss` and `dino_local_crops_loss`.

    Shapes, all crop-major (rows = crop 0 of images 0..B-1, then crop 1 of images 0..B-1, ...):
    `student_global_logits` (n_global_crops * B, K); `student_local_logits` (n_local_crops * B, K), or None / 0 rows
    without local crops; `teacher_probs` (n_global_crops * B, K), the teacher's targets for the same global crops in
    the same order as the student's (the official code reverses the teacher's two crops instead, so that a plain
    row-by-row cross-entropy pairs student crop 0 with teacher crop 1 and vice versa). Definition::

        n_terms = n_global_crops * (n_global_crops - 1) + max(n_local_crops * n_global_crops, 1)
        ce(s, t) = -(t * log_softmax(s / student_temp, dim=-1)).sum(dim=-1).mean()   # mean over the B images
        global_loss = sum(ce(student_global[i], teacher[j]) for i in range(n_global) for j in range(n_global) if i != j)
        local_loss = sum(ce(student_local[l], teacher[j]) for l in range(n_local) for j in range(n_global))
        return global_loss / n_terms, local_loss / n_terms

    i.e. every student crop against every teacher crop of a different view, averaged over the pairs. The training
    step adds `dino.loss_weight * (global_loss + local_loss)` to the total (official L288, L309). Official quirk kept
    for parity: without local crops the denominator still counts one local term (`max(..., 1)`, L147), so with two
    global crops the global loss is divided by 3, not 2; `local_loss` is then 0 (the official does not log it). The
    official asserts n_global_crops == 2; any n >= 1 works here (n = 1 has no global term).
    """
    if n_global_crops < 1:
        raise ValueError(f"n_global_crops must be >= 1, got {n_global_crops}")
    if teacher_probs.ndim != 2 or student_global_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"student_global_logits {tuple(student_global_logits.shape)} and teacher_probs "
            f"{tuple(teacher_probs.shape)} must both be (n_global_crops * B, K)"
        )
    rows, n_prototypes = teacher_probs.shape
    if rows == 0 or rows % n_global_crops:
        raise ValueError(f"{rows} global-crop rows is not a positive multiple of n_global_crops={n_global_crops}")
    batch = rows // n_global_crops
    if student_local_logits is None:
        student_local_logits = student_global_logits.new_zeros(0, n_prototypes)
    if student_local_logits.ndim != 2 or student_local_logits.shape[1] != n_prototypes:
        raise ValueError(
            f"student_local_logits must be (n_local_crops * B, {n_prototypes}), got {tuple(student_local_logits.shape)}"
        )
    if student_local_logits.shape[0] % batch:
        raise ValueError(f"{student_local_logits.shape[0]} local-crop rows is not a multiple of B={batch}")
    n_local_crops = student_local_logits.shape[0] // batch
    n_terms = n_global_crops * (n_global_crops - 1) + max(n_local_crops * n_global_crops, 1)

    t = teacher_probs.float().reshape(n_global_crops, batch, n_prototypes)
    log_p = F.log_softmax(student_global_logits.float() / student_temp, dim=-1).view(n_global_crops, batch, -1)
    # shifting the teacher crops by 1..n-1 pairs each student crop i once with every teacher crop j != i
    global_loss = log_p.new_zeros(())
    for shift in range(1, n_global_crops):
        global_loss = global_loss - (log_p * t.roll(shift, dims=0)).sum() / batch
    if n_local_crops == 0:
        local_loss = log_p.new_zeros(())
    else:
        local = student_local_logits.reshape(n_local_crops, batch, n_prototypes)
        local_loss = dino_loss(local, t, student_temp=student_temp)
    return global_loss / n_terms, local_loss / n_terms
