"""Classification metrics shared by the kNN, linear, logistic-regression and robustness evaluations.

Top-k accuracy follows the official `dinov2/eval/metrics.py` (a query counts as correct at k when its label is among
the k highest scores; ties broken by `torch.topk`), per-class accuracy is the recall of each class, and the confusion
matrix counts (true label, predicted label) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["classification_metrics", "confusion_matrix", "topk_accuracy"]


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: fraction of rows whose label is among the k highest scores}; k is capped at the number of classes."""
    if scores.ndim != 2 or labels.ndim != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores (n, C) and labels (n,) expected, got {tuple(scores.shape)} and {tuple(labels.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("no rows to score")
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (n, max_k)
    hits = top == labels[:, None]
    return {k: hits[:, : min(k, scores.shape[1])].any(dim=1).float().mean().item() for k in ks}


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, C) int64 counts: row = true label, column = prediction."""
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape")
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(scores: Tensor, labels: Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """top1, top5, mean per-class accuracy, per-class accuracy {name: value} and the confusion matrix (lists)."""
    acc = topk_accuracy(scores, labels, (1, 5))
    cm = confusion_matrix(scores.argmax(dim=1), labels, len(classes))
    support = cm.sum(dim=1)
    per_class = torch.where(
        support > 0, cm.diag() / support.clamp(min=1), torch.full_like(support, float("nan"), dtype=torch.float64)
    )
    present = per_class[~per_class.isnan()]
    return {
        "top1": acc[1],
        "top5": acc[5],
        "mean_per_class": present.mean().item() if present.numel() else float("nan"),
        "per_class": {name: per_class[i].item() for i, name in enumerate(classes)},
        "confusion": cm.tolist(),
    }
