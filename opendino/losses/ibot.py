"""iBOT loss: cross-entropy from the teacher's targets to the student's softmax on the masked patch tokens.

Reference: `iBOTPatchLoss.forward_masked` and `.forward` in `dinov2/loss/ibot_patch_loss.py`, the weights of
`collate_data_and_cast` in `dinov2/data/collate.py` (L40) and the scaling in `SSLMetaArch.forward_backward`
(`dinov2/train/ssl_meta_arch.py` L154, L291, L322-L340) at b8931f7. The student sees the global crops with some patch
tokens replaced by the mask token; the teacher sees them unmasked. Only masked tokens enter the loss, and each image
weighs the same whatever its number of masked tokens. Computed in float32; teacher targets come from
`losses.centering` (for iBOT centring, `CenterEMA.update(teacher_masked_logits.unsqueeze(0))`, as the official).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ibot_loss", "ibot_loss_dense", "ibot_masks_weight"]


def ibot_masks_weight(masks: Tensor) -> Tensor:
    """(M,) float32: 1 / (number of masked tokens of its image) for each masked token of `masks` (n_images, N) bool.

    Tokens are in row-major order of `masks` (the order of `masks.flatten().nonzero()`), as the official collate.
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a (n_images, N) bool tensor, got {masks.dtype} {tuple(masks.shape)}")
    per_image = 1 / masks.sum(-1).clamp(min=1.0)  # (n_images,)
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


def ibot_loss(
    student_masked_logits: Tensor,
    teacher_masked_probs: Tensor,
    masks_weight: Tensor,
    n_images: int,
    *,
    student_temp: float = 0.1,
) -> Tensor:
    """Weighted cross-entropy over the M masked tokens of all global crops, divided by the number of images; a scalar.

    `student_masked_logits` (M, K): the student head on the masked patch tokens of the `n_images` global-crop images
    (n_global_crops * B, crop-major), in the order of `masks.flatten().nonzero()`; `teacher_masked_probs` (M, K): the
    teacher's targets for the same tokens; `masks_weight` (M,): `ibot_masks_weight(masks)`; `n_images`:
    `masks.shape[0]`, all images, masked or not. Definition::

        loss = 0
        for m in range(M):
            log_p = log_softmax(student_masked_logits[m] / student_temp)
            loss -= masks_weight[m] * (teacher_masked_probs[m] * log_p).sum()
        loss /= n_images

    With those weights this is the mean over the images of each image's mean token cross-entropy, an image without
    masked tokens counting as 0 (see `ibot_loss_dense`). The official step multiplies it by
    `loss_scales * ibot_loss_scale` = 2 * (1 / n_global_crops) = 1, adds `ibot.loss_weight` times that to the total
    and logs half of it as `ibot_loss` (L324-L340).
    """
    if student_masked_logits.ndim != 2 or student_masked_logits.shape != teacher_masked_probs.shape:
        raise ValueError(
            f"student_masked_logits {tuple(student_masked_logits.shape)} and teacher_masked_probs "
            f"{tuple(teacher_masked_probs.shape)} must both be (M, K)"
        )
    if masks_weight.shape != student_masked_logits.shape[:1]:
        raise ValueError(f"masks_weight must be ({student_masked_logits.shape[0]},), got {tuple(masks_weight.shape)}")
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    log_p = F.log_softmax(student_masked_logits.float() / student_temp, dim=-1)  # (M, K)
    per_token = (teacher_masked_probs.float() * log_p).sum(dim=-1)  # (M,)
    return -(per_token * masks_weight).sum() / n_images


def ibot_loss_dense(
    student_patch_logits: Tensor, teacher_patch_probs: Tensor, masks: Tensor, *, student_temp: float = 0.1
) -> Tensor:
    """The same loss from all patch tokens (official `iBOTPatchLoss.forward`); a scalar.

    `student_patch_logits` (n_images, N, K), `teacher_patch_probs` (n_images, N, K), `masks` (n_images, N) bool.
    Definition: the mean over images of each image's mean cross-entropy over its masked tokens (0 for an image
    without any); equal to `ibot_loss` with `ibot_masks_weight(masks)`, but the head runs on every token.
    """
    if student_patch_logits.ndim != 3 or student_patch_logits.shape != teacher_patch_probs.shape:
        raise ValueError(
            f"student_patch_logits {tuple(student_patch_logits.shape)} and teacher_patch_probs "
            f"{tuple(teacher_patch_probs.shape)} must both be (n_images, N, K)"
        )
    if masks.shape != student_patch_logits.shape[:2]:
        raise ValueError(f"masks must be {tuple(student_patch_logits.shape[:2])}, got {tuple(masks.shape)}")
    log_p = F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)
    per_token = (teacher_patch_probs.float() * log_p).sum(dim=-1)  # (n_images, N)
    masks = masks.float()
    per_image = (per_token * masks).sum(dim=-1) / masks.sum(dim=-1).clamp(min=1.0)  # (n_images,)
    return -per_image.mean()
