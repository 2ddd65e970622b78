"""Collapse monitors: cheap statistics of one step's outputs that show the two ways self-distillation fails.

- *Dimensional collapse* (every image mapped to the same prototype / feature): the entropy of the teacher's
  batch-mean output drops towards 0, the features' spread across the batch and their effective rank drop.
- *Uniform collapse* (the teacher outputs the uniform distribution for every image): the mean per-image teacher
  entropy rises to log K while the targets carry no information.

`collapse_stats` returns numbers in [0, 1]-ish normalised units so that one threshold fits every model size:

    teacher_mean_entropy    H(mean_b p_b) / log K   healthy: close to 1 (all prototypes used); collapse: -> 0
    teacher_sample_entropy  mean_b H(p_b) / log K   healthy: well below 1 (confident targets); uniform: -> 1
    student_std, teacher_std  std over the batch of L2-normalised CLS features, times sqrt(D): ~1 for spread-out
                            features, -> 0 when every image has the same feature
    effective_rank          exp(entropy of the normalised singular values) of the centred teacher features,
                            divided by min(n, D): -> 0 when the features span a line
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["CollapseMonitor", "collapse_stats"]


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def _spread(features: Tensor) -> float:
    z = torch.nn.functional.normalize(features.float(), dim=-1)
    return float(z.std(dim=0).mean() * math.sqrt(z.shape[1]))


def _effective_rank(features: Tensor) -> float:
    x = features.float()
    x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    if float(s.sum()) <= 0:
        return 0.0
    p = s / s.sum()
    return float(_entropy(p).exp()) / min(x.shape)


@torch.no_grad()
def collapse_stats(teacher_probs: Tensor, student_cls: Tensor, teacher_cls: Tensor) -> dict[str, float]:
    """Statistics of one step: teacher DINO probabilities (n, K), student / teacher CLS features (n, D)."""
    k = teacher_probs.shape[-1]
    log_k = math.log(k)
    p = teacher_probs.float()
    return {
        "collapse/teacher_mean_entropy": float(_entropy(p.mean(0))) / log_k,
        "collapse/teacher_sample_entropy": float(_entropy(p).mean()) / log_k,
        "collapse/student_std": _spread(student_cls),
        "collapse/teacher_std": _spread(teacher_cls),
        "collapse/effective_rank": _effective_rank(teacher_cls),
    }


class CollapseMonitor:
    """Turns `collapse_stats` into plain-language warnings (once per kind, again after it recovers)."""

    def __init__(
        self,
        *,
        min_mean_entropy: float = 0.1,
        max_sample_entropy: float = 0.98,
        min_std: float = 0.05,
        min_effective_rank: float = 0.02,
    ) -> None:
        self.min_mean_entropy = min_mean_entropy
        self.max_sample_entropy = max_sample_entropy
        self.min_std = min_std
        self.min_effective_rank = min_effective_rank
        self._active: set[str] = set()

    def check(self, stats: dict[str, float]) -> list[str]:
        """The warnings that newly apply to `stats`."""
        found: dict[str, str] = {}
        if stats["collapse/teacher_mean_entropy"] < self.min_mean_entropy:
            found["dimensional"] = (
                "collapse: the teacher sends almost every image to the same few prototypes "
                f"(normalised entropy of its mean output {stats['collapse/teacher_mean_entropy']:.3f}). "
                "Try: teacher.centering=sinkhorn_knopp, a lower learning rate (optim.base_lr), a longer warm-up "
                "(schedules.warmup_epochs), or more varied images."
            )
        if stats["collapse/teacher_sample_entropy"] > self.max_sample_entropy:
            found["uniform"] = (
                "collapse: the teacher's targets are almost uniform for every image "
                f"(normalised entropy {stats['collapse/teacher_sample_entropy']:.3f}), so the student learns nothing. "
                "Try: a lower teacher temperature (teacher.teacher_temp, teacher.warmup_teacher_temp), "
                "fewer prototypes (dino.head_n_prototypes) for a small image set, or teacher.centering=sinkhorn_knopp."
            )
        if min(stats["collapse/student_std"], stats["collapse/teacher_std"]) < self.min_std or (
            stats["collapse/effective_rank"] < self.min_effective_rank
        ):
            found["features"] = (
                "collapse: the backbone gives nearly the same feature to every image "
                f"(spread {stats['collapse/teacher_std']:.3f}, effective rank {stats['collapse/effective_rank']:.3f}). "
                "Try: a lower learning rate, a larger batch, koleo.loss_weight > 0, or check that the images differ."
            )
        new = [msg for kind, msg in found.items() if kind not in self._active]
        self._active = set(found)
        return new
