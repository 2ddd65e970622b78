"""Weighted k-nearest-neighbour classification of frozen features, as the official DINOv2 kNN evaluation.

Protocol (`dinov2/eval/knn.py` at b8931f7): L2-normalised features, cosine similarity, the top-k training
neighbours of each query weighted by softmax(similarity / T) over those k, class score = sum of the weights of the
neighbours of that class; T = 0.07, k in {10, 20, 100, 200}. Queries are processed in chunks so that memory is
(chunk x n_train), whatever the number of queries.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from opendino.eval.common import LabelledImages, list_labelled_images

__all__ = ["LabelledImages", "knn_accuracy", "knn_eval_folders", "knn_scores", "list_labelled_images"]


@torch.no_grad()
def knn_scores(
    train: Tensor,
    train_labels: Tensor,
    queries: Tensor,
    *,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, Tensor]:
    """{k: (n_queries, num_classes) class scores}. `train` (n, D), `queries` (m, D); normalised here."""
    if train.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError(f"kNN needs training and query features, got {train.shape[0]} and {queries.shape[0]}")
    if train.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train.shape[0]} training features but {train_labels.shape[0]} labels")
    num_classes = num_classes or int(train_labels.max()) + 1
    ks = [min(k, train.shape[0]) for k in ks]
    max_k = max(ks)
    train = F.normalize(train.float(), dim=1)
    scores: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, queries.shape[0], chunk_size):
        q = F.normalize(queries[start : start + chunk_size].float(), dim=1)
        sims, idx = (q @ train.T).topk(max_k, dim=1)  # (c, max_k), sorted descending
        neighbour_labels = train_labels[idx]  # (c, max_k)
        for k in ks:
            weights = (sims[:, :k] / temperature).softmax(dim=1)  # (c, k)
            onehot = F.one_hot(neighbour_labels[:, :k], num_classes).to(weights.dtype)  # (c, k, C)
            scores[k].append(torch.einsum("ck,ckn->cn", weights, onehot))
    return {k: torch.cat(v) for k, v in scores.items()}


def knn_accuracy(
    train: Tensor,
    train_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    *,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
) -> dict[int, float]:
    """{k: top-1 accuracy} of the weighted kNN classifier."""
    if train_labels.numel() == 0 or query_labels.numel() == 0:
        raise ValueError(
            f"kNN needs labelled training and query sets, got {train_labels.numel()} and {query_labels.numel()}"
        )
    num_classes = int(max(train_labels.max(), query_labels.max())) + 1
    scores = knn_scores(train, train_labels, queries, ks=ks, temperature=temperature, num_classes=num_classes)
    return {k: (s.argmax(dim=1) == query_labels).float().mean().item() for k, s in scores.items()}


@torch.no_grad()
def knn_eval_folders(
    backbone: torch.nn.Module,
    train_folder: str | os.PathLike[str],
    val_folder: str | os.PathLike[str],
    *,
    size: int = 224,
    ks: Sequence[int] = (10, 20),
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    num_workers: int = 0,
) -> dict[int, float]:
    """Top-1 kNN accuracy of `backbone`'s CLS features from a labelled train folder to a labelled val folder.

    Images are resized to `size` (shorter side, bicubic) and centre-cropped to `size` (the evaluation transform at
    the training resolution); the backbone is used as given (the caller puts it in eval mode).
    """
    from opendino.data.augment import make_eval_transform
    from opendino.eval.features import extract_features

    train = list_labelled_images(train_folder)
    val = list_labelled_images(val_folder, classes=train.classes)
    transform = make_eval_transform(resize_size=size, crop_size=size)
    feats = {}
    for name, data in (("train", train), ("val", val)):
        fs = extract_features(
            backbone,
            data.paths,
            transform=transform,
            batch_size=batch_size,
            num_workers=num_workers,
            device=str(device),
        )
        keep = {p: i for i, p in enumerate(data.paths)}
        idx = torch.tensor([keep[p] for p in fs.paths], dtype=torch.long)
        feats[name] = (torch.from_numpy(fs.features["cls"]), data.labels[idx])
    return knn_accuracy(*feats["train"], *feats["val"], ks=ks)
