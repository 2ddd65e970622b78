"""Weighted k-nearest-neighbour classification of frozen features, as the official DINOv2 kNN evaluation, and the
`opendino eval knn` command.

Protocol (`dinov2/eval/knn.py` at b8931f7, facts sheet §6): CLS features after the final norm, L2-normalised;
cosine similarity; each query's max(ks) nearest training features weighted by softmax(similarity / T) over those
max(ks) neighbours; the score of a class at k is the sum of the weights of the class's neighbours among the first k.
As in the official code the softmax is taken once over max(ks), so at a smaller k the scores sum to less than 1 (a
per-query factor: the ranking of the classes is that of a softmax over the first k). T = 0.07, k in {10, 20, 100,
200}; top-1 / top-5 accuracy, mean per-class accuracy.

Scale: `knn_search` walks query chunks x training chunks on the chosen device and merges each training chunk's top
k into a running top k, so memory is O(chunk_size x train_chunk_size) whatever the set sizes. Neighbours are ranked
by similarity, then by lower training index: an order no chunking can change, so chunked and unchunked searches
return the same neighbours, ties included (the official `torch.topk` leaves the order of ties unspecified). Under
torchrun every process searches its block of queries and the neighbours are gathered.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from opendino import dist
from opendino.eval.common import LabelledImages, list_labelled_images

if TYPE_CHECKING:
    from opendino.config import KnnEvalConfig
    from opendino.eval.common import EvalContext

__all__ = [
    "LabelledImages",
    "knn_accuracy",
    "knn_eval_folders",
    "knn_scores",
    "knn_search",
    "labelled_features",
    "list_labelled_images",
    "neighbour_scores",
    "run",
]

_LOW = 1 << 32  # search keys: (ordered similarity bits) * 2**32 + (2**32 - 1 - training index)


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or any(not isinstance(k, numbers.Integral) or isinstance(k, bool) or k <= 0 for k in ks):
        raise ValueError(f"ks={ks}: give one or more positive integer numbers of neighbours")
    return ks


def _check_features(train: Tensor, queries: Tensor) -> None:
    if train.ndim != 2 or queries.ndim != 2 or train.shape[1] != queries.shape[1]:
        raise ValueError(
            f"train (n, D) and queries (m, D) features expected, got {tuple(train.shape)} and {tuple(queries.shape)}"
        )
    if train.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError(f"kNN needs training and query features, got {train.shape[0]} and {queries.shape[0]}")
    if len(train) >= _LOW:
        raise ValueError(f"{len(train)} training features: at most {_LOW - 1} are supported")
    for name, x in (("train", train), ("queries", queries)):
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} features hold NaN or infinite values")


def _keys(sims: Tensor, index: Tensor) -> Tensor:
    """int64 keys of float32 similarities and their training indices: a larger key is a better neighbour."""
    bits = (sims + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes +0.0, the two zeros get one key
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # integer order = float order
    return bits.long() * _LOW + (_LOW - 1 - index)


def _block_top(sims: Tensor, first_index: int, k: int) -> Tensor:
    """Keys (c, min(k, n)), best first, of the top of a (c, n) similarity block of training rows first_index..

    A float `topk` of k + 1 does the work; where the (k+1)-th similarity equals the k-th (a tie at the cut, the
    only case where the float `topk` may choose differently from the (similarity, lower index) order) the row is
    redone on the keys.
    """
    n = sims.shape[1]
    vals, index = sims.topk(min(k + 1, n), dim=1)  # (c, k + 1), or all n
    if k >= n:
        return _keys(vals, index + first_index).sort(dim=1, descending=True).values
    keys = _keys(vals[:, :k], index[:, :k] + first_index)
    tied = (vals[:, k] == vals[:, k - 1]).nonzero().squeeze(1)
    if len(tied):
        block_index = torch.arange(first_index, first_index + n, device=sims.device)
        keys[tied] = _keys(sims[tied], block_index).topk(k, dim=1).values
    return keys.sort(dim=1, descending=True).values


def _decode(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Keys -> (float32 similarities, int64 training indices)."""
    high = torch.div(keys, _LOW, rounding_mode="floor")
    index = _LOW - 1 - (keys - high * _LOW)
    bits = high.int()
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.view(torch.float32), index


@torch.no_grad()
def knn_search(
    train: Tensor,
    queries: Tensor,
    k: int,
    *,
    chunk_size: int = 1024,
    train_chunk_size: int = 65536,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """The k nearest training features of every query by cosine similarity, best first, ties to the lower index.

    `train` (n, D) and `queries` (m, D), any float dtype, are L2-normalised here in float32, chunk by chunk, on
    `device` (default: the queries' device; chunks are copied there). k is capped at n. Returns (similarities (m, k)
    float32, training indices (m, k) int64), both on the CPU. Memory: the (chunk_size, train_chunk_size) float32
    similarity block, plus integer keys for its rows with a tie at the k-th place.
    """
    _check_features(train, queries)
    if k <= 0 or chunk_size <= 0 or train_chunk_size <= 0:
        raise ValueError(f"k={k}, chunk_size={chunk_size}, train_chunk_size={train_chunk_size}: must be positive")
    k = min(k, train.shape[0])
    device = torch.device(device) if device is not None else queries.device
    sims_out: list[Tensor] = []
    index_out: list[Tensor] = []
    starts = range(0, queries.shape[0], chunk_size)
    for start in tqdm(starts, desc="kNN search", unit="chunk", disable=None if progress else True):
        q = F.normalize(queries[start : start + chunk_size].to(device).float(), dim=1)  # (c, D)
        best: Tensor | None = None  # (c, <= k) keys, sorted descending
        for first in range(0, train.shape[0], train_chunk_size):
            t = F.normalize(train[first : first + train_chunk_size].to(device, non_blocking=True).float(), dim=1)
            top = _block_top(q @ t.T, first, k)  # (c, min(k, n_chunk)) keys
            if best is not None:
                merged = torch.cat((best, top), dim=1)
                top = merged.topk(min(k, merged.shape[1]), dim=1).values
            best = top
        assert best is not None
        sims, index = _decode(best)
        sims_out.append(sims.cpu())
        index_out.append(index.cpu())
    return torch.cat(sims_out), torch.cat(index_out)


def neighbour_scores(
    sims: Tensor, neighbour_labels: Tensor, ks: Sequence[int], temperature: float, num_classes: int
) -> dict[int, Tensor]:
    """{min(k, K): (m, num_classes) class scores} from the sorted similarities (m, K) of each query's K nearest
    neighbours and their labels (m, K): softmax(sims / T) over all K, summed per class over the first min(k, K).

    A k beyond K is keyed by the number of neighbours it uses (K), so several such ks give one entry."""
    ks = _check_ks(ks)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be positive")
    if sims.shape != neighbour_labels.shape or sims.ndim != 2:
        raise ValueError(f"similarities {tuple(sims.shape)} and labels {tuple(neighbour_labels.shape)}: same (m, K)")
    labels = neighbour_labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"neighbour labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    weights = (sims.float() / temperature).softmax(dim=1)  # (m, K)
    out = {}
    for k in sorted({min(k, sims.shape[1]) for k in ks}):
        scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        out[k] = scores.scatter_add_(1, labels[:, :k], weights[:, :k])  # (m, C)
    return out


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
    train_chunk_size: int = 65536,
    device: str | torch.device | None = None,
) -> dict[int, Tensor]:
    """{k: (n_queries, num_classes) class scores} of the official weighted kNN, on the CPU.

    `train` (n, D) with integer `train_labels` (n,), `queries` (m, D): raw features (normalised here). A k larger
    than n uses all n training features and is keyed n (the keys are min(k, n)). See `knn_search` for the chunks
    and the device.
    """
    ks = _check_ks(ks)
    if train_labels.ndim != 1 or train.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train.shape[0]} training features but labels of shape {tuple(train_labels.shape)}")
    needed = int(train_labels.max()) + 1 if train_labels.numel() else 0
    num_classes = num_classes or needed
    if num_classes < needed:
        raise ValueError(f"num_classes={num_classes} but the training labels go up to {needed - 1}")
    sims, index = knn_search(
        train, queries, max(ks), chunk_size=chunk_size, train_chunk_size=train_chunk_size, device=device
    )
    return neighbour_scores(sims, train_labels.cpu()[index], ks, temperature, num_classes)


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
    return {k: (s.argmax(dim=1) == query_labels.cpu()).float().mean().item() for k, s in scores.items()}


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


# ---------------------------------------------------------------------------------------------- opendino eval knn
def labelled_features(
    ctx: EvalContext, data: LabelledImages, transform, *, desc: str
) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
    """CLS features (n, D) of the readable images of `data` (cached), their labels (n,) and the unreadable images."""
    fs = ctx.features(data.paths, transform, outputs=("cls",), desc=desc)
    if not fs.paths:
        raise ValueError(f"{desc}: none of the {len(data.paths)} images could be read")
    where = {p: i for i, p in enumerate(data.paths)}
    labels = data.labels[torch.tensor([where[p] for p in fs.paths], dtype=torch.long)]
    return torch.from_numpy(fs.features["cls"]), labels, fs.bad


def _search_by_rank(train: Tensor, queries: Tensor, k: int, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """`knn_search` with the queries split in contiguous blocks over processes; every process gets all results."""
    world, rank = dist.world_size(), dist.rank()
    per = -(-queries.shape[0] // world)
    mine = queries[rank * per : (rank + 1) * per]
    if len(mine):
        part = knn_search(train, mine, k, progress=dist.is_main(), **kwargs)
    else:  # more processes than queries
        k = min(k, train.shape[0])
        part = (torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long))
    parts = dist.all_gather_object(part)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _train_on_device(train: Tensor, device: torch.device) -> Tensor:
    """The training features moved once to a CUDA device when they take under a quarter of its free memory (saves
    one copy per query chunk); else left on the CPU and copied chunk by chunk."""
    if device.type != "cuda":
        return train
    free, _ = torch.cuda.mem_get_info(device)
    return train.to(device) if train.numel() * 4 < free // 4 else train


def run(cfg: KnnEvalConfig) -> dict[str, Any]:
    """`opendino eval knn`: the official weighted kNN from a labelled train folder to a labelled val folder."""
    from opendino.data.augment import make_eval_transform
    from opendino.eval.common import markdown_table, setup
    from opendino.eval.metrics import classification_metrics
    from opendino.eval.pictures import save_confusion_matrix

    ctx = setup("knn", cfg)
    train = list_labelled_images(cfg.train)
    val = list_labelled_images(cfg.val, classes=train.classes)
    transform = make_eval_transform(cfg.resize_size, cfg.crop_size)
    train_x, train_y, train_bad = labelled_features(ctx, train, transform, desc="train features")
    val_x, val_y, val_bad = labelled_features(ctx, val, transform, desc="val features")

    sims, index = _search_by_rank(
        _train_on_device(train_x, ctx.device), val_x, max(cfg.ks), chunk_size=cfg.chunk_size,
        train_chunk_size=cfg.train_chunk_size, device=ctx.device,
    )  # fmt: skip
    scores = neighbour_scores(sims, train_y[index], cfg.ks, cfg.temperature, len(train.classes))
    ks = list(scores)  # sorted; a k beyond the training set is keyed by the training set's size
    per_k = {k: classification_metrics(scores[k], val_y, train.classes) for k in ks}
    best = max(ks, key=lambda k: (per_k[k]["top1"], -k))  # ties: the smaller k

    picture = f"confusion_k{best}.png"
    if dist.is_main():
        title = f"kNN k={best}: top-1 {per_k[best]['top1']:.3f} ({len(val_y)} val images)"
        save_confusion_matrix(per_k[best]["confusion"], train.classes, ctx.picture_path(picture), title=title)
    headline = ("top1", "top5", "mean_per_class")
    metrics = {
        **{name: per_k[best][name] for name in headline},
        "best_k": best,
        "by_k": {str(k): {name: per_k[k][name] for name in headline} for k in ks},
    }
    rows = [[f"{k} (all)" if k == len(train_y) else k, *(per_k[k][n] for n in headline)] for k in ks]
    table = markdown_table(["k", "top-1", "top-5", "mean per-class"], rows)
    dataset = {
        "train": cfg.train, "val": cfg.val, "classes": len(train.classes), "train_images": len(train_y),
        "val_images": len(val_y), "transform": f"resize {cfg.resize_size}, centre crop {cfg.crop_size}",
        "temperature": cfg.temperature, "device": str(ctx.device), "world_size": dist.world_size(),
    }  # fmt: skip
    extra = {
        "per_k": {str(k): {"per_class": per_k[k]["per_class"], "confusion": per_k[k]["confusion"]} for k in ks},
        "pictures": [picture],
    }
    return ctx.write_results(
        dataset=dataset, metrics=metrics, tables=[table], extra=extra, bad_images=[*train_bad, *val_bad]
    )
