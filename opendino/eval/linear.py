"""Linear probes on a frozen backbone: the official DINOv2 linear evaluation (`dinov2/eval/linear.py` at b8931f7).

Protocol (facts sheet §6): one linear head per (n_last_blocks, avgpool, learning rate), all trained together for
epochs x epoch_length iterations (official 10 x 1250) on batches of 128. A head's input is the CLS tokens of the last
n blocks (each through the final norm) in block order, then, with avgpool, the mean patch token of the last block.
Heads start from N(0, 0.01) weights and zero biases and train with SGD (momentum 0.9, no weight decay), each at its
grid rate x batch / 256, cosine-annealed to 0; the loss is the sum over heads of the cross-entropy. The head with
the best top-1 on the selection set wins (official: the validation set itself; here optionally a held-out part of
train, `val_fraction`), ties going to the first head in (n_last_blocks, avgpool, lr) order as in the official code.

Two ways to feed the heads: `fast` trains on cached centre-crop features (no backbone in the loop; our default), and
`augment` runs the frozen backbone every step on RandomResizedCrop + flip images (the official recipe). Heads that
share an input are one (L, C, in) weight applied with one einsum, and SGD is written out so that every head keeps its
own learning rate: this equals L separate `nn.Linear` + `torch.optim.SGD` heads (tested). Deviation: head names are
written with `%g`, because the official `lr:.5f` names merge two heads at batch 128 (5e-6 and 1e-5 both print as
0.00001) so one of them is trained but never evaluated.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from opendino.data.sampler import derive_seed
from opendino.eval.features import CLS_BLOCKS, autocast_for

__all__ = [
    "OFFICIAL_LEARNING_RATES",
    "LinearClassifier",
    "LinearHeads",
    "LinearProbeResult",
    "augmented_batches",
    "backbone_features",
    "cosine_factor",
    "feature_batches",
    "fit_linear_probes",
    "head_name",
    "linear_input",
    "make_linear_train_transform",
    "run",
    "train_linear_heads",
]

OFFICIAL_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
MOMENTUM = 0.9
INIT_STD = 0.01
_INIT, _BATCHES, _SPLIT = range(3)  # derive_seed tags of the random streams: head weights, batch order, held-out

Batch = tuple[Tensor, Tensor, Tensor]  # cls_blocks (B, 4, D), mean (B, D), labels (B,)


def linear_input(cls_blocks: Tensor, mean: Tensor | None, n_last_blocks: int, avgpool: bool) -> Tensor:
    """A head's float32 input: the CLS tokens of the last `n_last_blocks` blocks in block order, then `mean` (the
    last block's mean patch token) if `avgpool`. (n, 4, D), (n, D) -> (n, n_last_blocks * D [+ D])."""
    if cls_blocks.ndim != 3 or not 1 <= n_last_blocks <= cls_blocks.shape[1]:
        raise ValueError(
            f"cls_blocks must be (n, blocks, D) with at least n_last_blocks={n_last_blocks} blocks, "
            f"got {tuple(cls_blocks.shape)}"
        )
    x = cls_blocks[:, -n_last_blocks:].flatten(1)  # (n, n_last_blocks * D), oldest block first
    if avgpool:
        if mean is None or mean.shape != (cls_blocks.shape[0], cls_blocks.shape[2]):
            got = None if mean is None else tuple(mean.shape)
            raise ValueError(f"avgpool needs mean (n, D) = {(cls_blocks.shape[0], cls_blocks.shape[2])}, got {got}")
        x = torch.cat([x, mean.to(x.dtype)], dim=1)  # (n, (n_last_blocks + 1) * D)
    return x.float()


def cosine_factor(iteration: int, total: int) -> float:
    """Learning-rate factor at `iteration` of `total`: CosineAnnealingLR(total, eta_min=0) stepped per iteration."""
    return 0.5 * (1.0 + math.cos(math.pi * iteration / total))


def head_name(n_last_blocks: int, avgpool: bool, lr: float) -> str:
    return f"{n_last_blocks}_blocks_avgpool_{avgpool}_lr_{lr:g}"


@dataclass
class LinearClassifier:
    """One trained head; `lr` is its grid rate (SGD applied `scaled_lr` = lr x batch / 256)."""

    n_last_blocks: int
    avgpool: bool
    lr: float
    weight: Tensor  # (C, in)
    bias: Tensor  # (C,)
    scaled_lr: float | None = None

    @property
    def name(self) -> str:
        return head_name(self.n_last_blocks, self.avgpool, self.lr)

    def logits(self, cls_blocks: Tensor, mean: Tensor) -> Tensor:
        """(n, 4, D), (n, D) -> (n, C) on the device of the features."""
        x = linear_input(cls_blocks, mean, self.n_last_blocks, self.avgpool)
        return F.linear(x, self.weight.to(x.device), self.bias.to(x.device))


@dataclass
class LinearProbeResult:
    """The best head, every head's top-1 on the selection set, and how training went."""

    best: LinearClassifier
    accuracies: dict[str, float]  # head name -> top-1 on the selection ("val") set
    heads: list[LinearClassifier] = field(default_factory=list)  # all heads, in (n_last_blocks, avgpool, lr) order
    curve: list[dict[str, float]] = field(default_factory=list)  # per epoch: iteration, loss, best selection top-1
    iterations: int = 0
    seconds: float = 0.0


class LinearHeads:
    """Every (n_last_blocks, avgpool, lr) head. Heads with the same input share one weight tensor (L, C, in) and
    bias (L, C), L = number of rates; `step` is one SGD iteration of all heads with per-head learning rates."""

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        learning_rates: Sequence[float] = OFFICIAL_LEARNING_RATES,
        n_last_blocks: Sequence[int] = (1, 4),
        avgpool: Sequence[bool] = (False, True),
        batch_size: int = 128,
        total_iterations: int = 12500,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if not learning_rates or min(learning_rates) <= 0:
            raise ValueError(f"learning_rates={list(learning_rates)}: give one or more positive rates")
        if not n_last_blocks or min(n_last_blocks) < 1 or max(n_last_blocks) > CLS_BLOCKS:
            raise ValueError(f"n_last_blocks={list(n_last_blocks)}: give block counts in 1..{CLS_BLOCKS}")
        if not avgpool or num_classes < 2 or batch_size < 1 or total_iterations < 1:
            raise ValueError(
                f"need avgpool choices, num_classes >= 2, batch_size >= 1, total_iterations >= 1; got {list(avgpool)},"
                f" {num_classes}, {batch_size}, {total_iterations}"
            )
        self.device = torch.device(device)
        self.configs = [(int(n), bool(a)) for n in n_last_blocks for a in avgpool]  # official loop order
        self.learning_rates = [float(lr) for lr in learning_rates]
        self.scaled_lrs = torch.tensor(self.learning_rates, dtype=torch.float32) * (batch_size / 256)
        self.total_iterations = total_iterations
        self.iteration = 0
        gen = torch.Generator().manual_seed(derive_seed(seed, _INIT))
        n_lr = len(self.learning_rates)
        self.weights: list[Tensor] = []
        self.biases: list[Tensor] = []
        for n, pool in self.configs:
            in_dim = (n + pool) * embed_dim
            w = torch.empty(n_lr, num_classes, in_dim).normal_(0.0, INIT_STD, generator=gen)
            self.weights.append(w.to(self.device).requires_grad_())
            self.biases.append(torch.zeros(n_lr, num_classes, device=self.device, requires_grad=True))
        self._momentum: list[Tensor | None] = [None] * (2 * len(self.configs))
        self._lrs = self.scaled_lrs.to(self.device)

    @property
    def names(self) -> list[str]:
        return [head_name(n, pool, lr) for n, pool in self.configs for lr in self.learning_rates]

    def logits(self, cls_blocks: Tensor, mean: Tensor) -> list[Tensor]:
        """Per feature config, the logits of its L heads: (L, n, C)."""
        out = []
        for (n, pool), w, b in zip(self.configs, self.weights, self.biases, strict=True):
            x = linear_input(cls_blocks, mean, n, pool)  # (n, in)
            out.append(torch.einsum("bi,lci->lbc", x, w) + b[:, None, :])
        return out

    def step(self, cls_blocks: Tensor, mean: Tensor, labels: Tensor) -> Tensor:
        """One SGD iteration of every head on a batch; returns the summed loss (detached)."""
        batch = labels.shape[0]
        per_config = [  # sum over the config's heads of the batch-mean cross-entropy
            F.cross_entropy(z.flatten(0, 1), labels.repeat(z.shape[0]), reduction="sum") / batch
            for z in self.logits(cls_blocks, mean)
        ]
        loss = torch.stack(per_config).sum()
        params = [p for pair in zip(self.weights, self.biases, strict=True) for p in pair]
        grads = torch.autograd.grad(loss, params)
        lrs = self._lrs * cosine_factor(self.iteration, self.total_iterations)  # (L,)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                buf = self._momentum[i]
                if buf is None:  # torch.optim.SGD starts its momentum buffer at the first gradient
                    buf = self._momentum[i] = g.clone()
                else:
                    buf.mul_(MOMENTUM).add_(g)
                p.sub_(lrs.view(-1, *[1] * (p.ndim - 1)) * buf)
        self.iteration += 1
        return loss.detach()

    @torch.no_grad()
    def correct(self, cls_blocks: Tensor, mean: Tensor, labels: Tensor, chunk_size: int = 4096) -> Tensor:
        """(n_heads,) int64: how many rows each head classifies right (top-1), heads in `names` order."""
        counts = torch.zeros(len(self.configs) * len(self.learning_rates), dtype=torch.long, device=self.device)
        for s in range(0, labels.shape[0], chunk_size):
            sl = slice(s, s + chunk_size)
            z = torch.cat(self.logits(cls_blocks[sl].to(self.device), mean[sl].to(self.device)))  # (heads, c, C)
            counts += (z.argmax(dim=2) == labels[sl].to(self.device)).sum(dim=1)
        return counts

    def heads(self) -> list[LinearClassifier]:
        """All heads as standalone classifiers (CPU tensors), in `names` order."""
        out = []
        scaled = self.scaled_lrs.tolist()
        for (n, pool), w, b in zip(self.configs, self.weights, self.biases, strict=True):
            w, b = w.detach().cpu(), b.detach().cpu()
            out += [LinearClassifier(n, pool, lr, w[j].clone(), b[j].clone(), scaled_lr=scaled[j])
                    for j, lr in enumerate(self.learning_rates)]  # fmt: skip
        return out


@contextlib.contextmanager
def _cpu_threads(device: torch.device, n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads on a CPU device (restored afterwards); no-op elsewhere."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_linear_heads(
    heads: LinearHeads,
    batches: Iterable[Batch],
    selection: Batch,
    *,
    epoch_length: int,
    desc: str = "linear heads",
) -> LinearProbeResult:
    """Train `heads` for `heads.total_iterations` steps on `batches`; after every epoch (and at the end) score all
    heads on `selection` (cls_blocks, mean, labels), and return the best one by top-1 (first in order on ties)."""
    started = time.perf_counter()
    total = heads.total_iterations
    curve: list[dict[str, float]] = []
    counts = torch.zeros(0)
    bar = tqdm(total=total, unit="it", desc=desc, dynamic_ncols=True, disable=None)
    stream = iter(batches)
    running = torch.zeros((), device=heads.device)
    for it in range(total):
        cls_blocks, mean, labels = next(stream)  # augment mode: the backbone runs here, with every thread
        with _cpu_threads(heads.device, 1):  # small matmuls: threads cost more than they give on a shared CPU
            running += heads.step(cls_blocks, mean, labels)
        bar.update(1)
        if (it + 1) % epoch_length == 0 or it + 1 == total:
            with _cpu_threads(heads.device, 1):
                counts = heads.correct(*selection)
            steps = (it % epoch_length) + 1
            curve.append({"iteration": it + 1, "loss": running.item() / steps,
                          "best_top1": counts.max().item() / selection[2].shape[0]})  # fmt: skip
            bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}", best_top1=f"{curve[-1]['best_top1']:.4f}")
            running.zero_()
    bar.close()
    all_heads = heads.heads()
    accuracies = (counts.double() / selection[2].shape[0]).tolist()
    best = int(counts.argmax())  # the first of equal maxima, as the official strict ">" scan
    return LinearProbeResult(
        best=all_heads[best],
        accuracies=dict(zip(heads.names, accuracies, strict=True)),
        heads=all_heads,
        curve=curve,
        iterations=total,
        seconds=time.perf_counter() - started,
    )


def feature_batches(features: dict[str, Tensor], labels: Tensor, *, batch_size: int, seed: int = 0) -> Iterator[Batch]:
    """Endless batches of cached features: consecutive slices of a stream of seeded random permutations (every row
    once per epoch; a batch may straddle two epochs). Rows are gathered on the features' device."""
    n = labels.shape[0]
    gen = torch.Generator().manual_seed(derive_seed(seed, _BATCHES))  # on the CPU: the same stream on every device
    order = torch.zeros(0, dtype=torch.long, device=labels.device)
    while True:
        while order.numel() < batch_size:  # one host-to-device copy per epoch
            order = torch.cat([order, torch.randperm(n, generator=gen).to(labels.device)])
        idx, order = order[:batch_size], order[batch_size:]
        yield features["cls_blocks"][idx], features["mean"][idx], labels[idx]


def _check_features(name: str, feats: dict[str, Tensor], labels: Tensor) -> None:
    missing = {"cls_blocks", "mean"} - set(feats)
    if missing:
        raise ValueError(f"{name} features need 'cls_blocks' (n, 4, D) and 'mean' (n, D); missing {sorted(missing)}")
    cb, mean = feats["cls_blocks"], feats["mean"]
    if cb.ndim != 3 or mean.ndim != 2 or not cb.shape[0] == mean.shape[0] == labels.shape[0] or cb.shape[0] == 0:
        raise ValueError(
            f"{name}: cls_blocks (n, 4, D), mean (n, D) and labels (n,) with n > 0 expected, got "
            f"{tuple(cb.shape)}, {tuple(mean.shape)}, {tuple(labels.shape)}"
        )


def fit_linear_probes(
    train: dict[str, Tensor],
    train_labels: Tensor,
    val: dict[str, Tensor],
    val_labels: Tensor,
    *,
    num_classes: int,
    learning_rates: Sequence[float] = OFFICIAL_LEARNING_RATES,
    n_last_blocks: Sequence[int] = (1, 4),
    avgpool: Sequence[bool] = (False, True),
    epochs: int = 10,
    epoch_length: int = 1250,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> LinearProbeResult:
    """Train the grid of linear heads on cached features and pick the best by top-1 on `val`.

    `train` / `val` hold "cls_blocks" (n, 4, D) and "mean" (n, D) (as `ctx.features(..., outputs=("cls_blocks",
    "mean"))` gives them); labels are int in [0, num_classes). Features are moved to `device` once; the returned
    classifiers hold CPU tensors.
    """
    _check_features("train", train, train_labels)
    _check_features("val", val, val_labels)
    if train["cls_blocks"].shape[2] != val["cls_blocks"].shape[2]:
        raise ValueError(f"train and val feature dims differ: {train['cls_blocks'].shape} vs {val['cls_blocks'].shape}")
    if epochs < 1 or epoch_length < 1:
        raise ValueError(f"epochs={epochs} and epoch_length={epoch_length} must be >= 1")
    labels_max = int(max(train_labels.max(), val_labels.max()))
    if int(min(train_labels.min(), val_labels.min())) < 0 or labels_max >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got up to {labels_max}")
    dev = torch.device(device)
    heads = LinearHeads(
        train["cls_blocks"].shape[2], num_classes, learning_rates=learning_rates, n_last_blocks=n_last_blocks,
        avgpool=avgpool, batch_size=batch_size, total_iterations=epochs * epoch_length, seed=seed, device=dev,
    )  # fmt: skip
    on_dev = {k: train[k].to(dev, torch.float32) for k in ("cls_blocks", "mean")}
    batches = feature_batches(on_dev, train_labels.to(dev), batch_size=batch_size, seed=seed)
    selection = (val["cls_blocks"].to(dev, torch.float32), val["mean"].to(dev, torch.float32), val_labels.to(dev))
    return train_linear_heads(heads, batches, selection, epoch_length=epoch_length)


# ------------------------------------------------------------------------------------------------ augment mode
def make_linear_train_transform(crop_size: int = 224) -> Callable[[Any], Tensor]:
    """The official linear-probe training transform: RandomResizedCrop(crop_size, bicubic), horizontal flip with
    probability 0.5, to float tensor, ImageNet normalisation (`dinov2/data/transforms.py:55-65`)."""
    from torchvision.transforms import InterpolationMode, v2

    from opendino.data.augment import IMAGENET_MEAN, IMAGENET_STD

    return v2.Compose(
        [
            v2.RandomResizedCrop(crop_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        ]
    )


@torch.no_grad()
def backbone_features(model: torch.nn.Module, images: Tensor, *, amp: str = "bf16") -> tuple[Tensor, Tensor]:
    """cls_blocks (B, 4, D) and mean patch token (B, D) of the last block, float32, on the images' device."""
    if images.device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast_for(images.device, amp):
        layers = model.get_intermediate_layers(images, CLS_BLOCKS, return_class_token=True)  # type: ignore[operator]
    cls_blocks = torch.stack([c for _, c in layers], dim=1).float()  # (B, 4, D)
    return cls_blocks, layers[-1][0].float().mean(dim=1)


def _collate_augmented(samples: list) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
    images = torch.stack([s.crops for s in samples])
    return images, torch.tensor([s.index for s in samples]), [b for s in samples for b in s.bad_images]


def augmented_batches(
    model: torch.nn.Module,
    paths: Sequence[str],
    labels: Tensor,
    *,
    crop_size: int,
    batch_size: int,
    seed: int,
    num_workers: int,
    amp: str,
    device: torch.device,
    bad: list[tuple[str, str]],
) -> Iterator[Batch]:
    """Endless batches of backbone features of freshly augmented training images (seeded, resumable stream of
    `data.sampler.InfiniteSampler`); unreadable images are replaced and appended to `bad`."""
    from opendino.data.sampler import InfiniteSampler, TrainDataset, make_train_loader

    sampler = InfiniteSampler(len(paths), batch_size=batch_size, seed=derive_seed(seed, _BATCHES))
    dataset = TrainDataset(list(paths), make_linear_train_transform(crop_size))
    loader = make_train_loader(dataset, sampler=sampler, num_workers=num_workers, collate_fn=_collate_augmented,
                               pin_memory=device.type == "cuda", prefetch_factor=4)  # fmt: skip
    for images, index, replaced in loader:
        bad += replaced
        cls_blocks, mean = backbone_features(model, images.to(device, non_blocking=True), amp=amp)
        yield cls_blocks, mean, labels[index].to(device)


# ------------------------------------------------------------------------------------------------ opendino eval linear
def _config_label(n: int, pool: bool) -> str:
    return f"{n} block{'s' if n > 1 else ''}" + (" + avgpool" if pool else "")


def _split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit indices, held-out indices), sorted; held-out is round(fraction * n), at least 1, never all."""
    n_hold = min(max(1, round(fraction * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, _SPLIT)))
    return perm[n_hold:].sort().values, perm[:n_hold].sort().values


def _rows(fs, paths: Sequence[str], labels: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The FeatureSet's rows of `paths` (bad images dropped) with their labels."""
    label_of = dict(zip(paths, labels.tolist(), strict=True))
    keep = [i for i, p in enumerate(fs.paths) if p in label_of]
    idx = torch.tensor(keep, dtype=torch.long)
    feats = {k: torch.from_numpy(fs.features[k])[idx] for k in ("cls_blocks", "mean")}
    return feats, torch.tensor([label_of[fs.paths[i]] for i in keep], dtype=torch.long)


@dataclass
class _Data:
    """What `run` trains and reports on."""

    classes: list[str]
    fit_paths: list[str]  # training images of the heads (all of train unless part is held out)
    fit_labels: Tensor
    fit_features: tuple[dict[str, Tensor], Tensor] | None  # fast mode: their cached features and labels
    selection: tuple[dict[str, Tensor], Tensor]  # where the best head is picked: val, or the held-out train images
    val: tuple[dict[str, Tensor], Tensor]
    held_out: int
    bad: list[tuple[str, str]]


def _prepare(ctx, cfg) -> _Data:
    """Labelled folders, the held-out split and the cached centre-crop features the mode needs."""
    from opendino.data.augment import make_eval_transform
    from opendino.eval.common import list_labelled_images

    train = list_labelled_images(cfg.train)
    val = list_labelled_images(cfg.val, classes=train.classes)
    n = len(train.paths)
    fit_idx, hold_idx = (
        _split(n, cfg.val_fraction, cfg.seed) if cfg.val_fraction > 0 else (torch.arange(n), torch.zeros(0).long())
    )
    fit_paths, hold_paths = [train.paths[i] for i in fit_idx], [train.paths[i] for i in hold_idx]
    transform, outputs = make_eval_transform(cfg.resize_size, cfg.crop_size), ("cls_blocks", "mean")
    val_fs = ctx.features(val.paths, transform, outputs=outputs, desc="val features")
    val_rows = _rows(val_fs, val.paths, val.labels)
    data = _Data(train.classes, fit_paths, train.labels[fit_idx], None, val_rows, val_rows, len(hold_paths),
                 list(val_fs.bad))  # fmt: skip
    if cfg.mode == "fast":  # every train image once (the cache entry other evaluations share), split afterwards
        train_fs = ctx.features(train.paths, transform, outputs=outputs, desc="train features")
        data.bad += train_fs.bad
        data.fit_features = _rows(train_fs, fit_paths, data.fit_labels)
        if hold_paths:
            data.selection = _rows(train_fs, hold_paths, train.labels[hold_idx])
    elif hold_paths:  # augment: centre crops of the held-out part only
        hold_fs = ctx.features(hold_paths, transform, outputs=outputs, desc="held-out features")
        data.bad += hold_fs.bad
        data.selection = _rows(hold_fs, hold_paths, train.labels[hold_idx])
    return data


def _save_lr_curves(result: LinearProbeResult, accuracies: dict[str, float], configs, lrs, path, title: str) -> None:
    from opendino.eval.pictures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n, pool in configs:
        ys = [accuracies[head_name(n, pool, lr)] for lr in lrs]
        ax.plot(lrs, ys, marker="o", label=_config_label(n, pool))
    best = result.best
    label = f"best: {_config_label(best.n_last_blocks, best.avgpool)}, lr {best.lr:g}"
    ax.plot([best.lr], [accuracies[best.name]], marker="*", markersize=14, color="black", ls="none", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (grid value; SGD uses it x batch / 256)")
    ax.set_ylabel("top-1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)


def _accuracy_table(accuracies: dict[str, float], configs, lrs, scale: float, best: str) -> str:
    from opendino.eval.common import markdown_table

    def cell(name: str) -> str:
        return f"**{accuracies[name]:.4f}**" if name == best else f"{accuracies[name]:.4f}"

    rows = [[f"{lr:g}", f"{lr * scale:.3g}", *(cell(head_name(n, p, lr)) for n, p in configs)] for lr in lrs]
    return markdown_table(["lr", "applied lr", *(_config_label(n, p) for n, p in configs)], rows)


def run(cfg: Any) -> dict[str, Any]:
    """`opendino eval linear`: train the grid of linear heads on a labelled train folder, report on val."""
    from opendino import dist
    from opendino.eval.common import setup

    ctx = setup("linear", cfg)
    if cfg.mode == "augment" and dist.world_size() > 1:
        raise ValueError("mode=augment trains on one process; run it without torchrun (fast mode shards features)")
    depth = int(getattr(ctx.model, "n_blocks", CLS_BLOCKS))
    if max(cfg.n_last_blocks) > depth:
        raise ValueError(f"n_last_blocks={list(cfg.n_last_blocks)}: the backbone has only {depth} blocks")
    data = _prepare(ctx, cfg)
    dev = ctx.device
    heads = LinearHeads(
        ctx.embed_dim, len(data.classes), learning_rates=cfg.learning_rates, n_last_blocks=cfg.n_last_blocks,
        avgpool=cfg.avgpool, batch_size=cfg.train_batch_size, total_iterations=cfg.epochs * cfg.epoch_length,
        seed=cfg.seed, device=dev,
    )  # fmt: skip
    if data.fit_features is not None:
        feats, labels = data.fit_features
        on_dev = {k: v.to(dev) for k, v in feats.items()}
        batches = feature_batches(on_dev, labels.to(dev), batch_size=cfg.train_batch_size, seed=cfg.seed)
    else:
        batches = augmented_batches(
            ctx.model, data.fit_paths, data.fit_labels, crop_size=cfg.crop_size, batch_size=cfg.train_batch_size,
            seed=cfg.seed, num_workers=cfg.num_workers, amp=cfg.amp, device=dev, bad=data.bad,
        )  # fmt: skip
    sel_feats, sel_labels = data.selection
    selection = (sel_feats["cls_blocks"].to(dev), sel_feats["mean"].to(dev), sel_labels.to(dev))
    result = train_linear_heads(heads, batches, selection, epoch_length=cfg.epoch_length, desc=f"linear ({cfg.mode})")
    return _report(ctx, cfg, data, heads, result)


def _report(ctx, cfg, data: _Data, heads: LinearHeads, result: LinearProbeResult) -> dict[str, Any]:
    """The best head on val: metrics, tables, pictures, results files."""
    from opendino.eval.metrics import classification_metrics
    from opendino.eval.pictures import save_confusion_matrix

    (val_feats, val_labels), best = data.val, result.best
    val_acc = result.accuracies
    if data.held_out:
        counts = heads.correct(val_feats["cls_blocks"], val_feats["mean"], val_labels)
        val_acc = dict(zip(heads.names, (counts.double() / len(val_labels)).tolist(), strict=True))
    with torch.no_grad():
        m = classification_metrics(best.logits(val_feats["cls_blocks"], val_feats["mean"]), val_labels, data.classes)
    selected_on = f"held-out {data.held_out} train images (val_fraction {cfg.val_fraction})" if data.held_out else "val"
    metrics = {
        "top1": m["top1"], "top5": m["top5"], "mean_per_class": m["mean_per_class"],
        "best_head": best.name, "best_lr": best.lr, "best_n_last_blocks": best.n_last_blocks,
        "best_avgpool": best.avgpool, "selected_on": selected_on, "selection_top1": result.accuracies[best.name],
        "iterations": result.iterations, "train_seconds": round(result.seconds, 2),
        "iterations_per_second": round(result.iterations / max(result.seconds, 1e-9), 2),
    }  # fmt: skip
    lrs, scale = heads.learning_rates, cfg.train_batch_size / 256
    title = f"linear probe ({cfg.mode}): top-1 on {'held-out train' if data.held_out else 'val'}"
    _save_lr_curves(result, result.accuracies, heads.configs, lrs, ctx.picture_path("accuracy_vs_lr.png"), title)
    save_confusion_matrix(m["confusion"], data.classes, ctx.picture_path("confusion.png"),
                          title=f"best head {best.name}: val top-1 {m['top1']:.4f}")  # fmt: skip
    tables = [f"Top-1 of every head on {selected_on} (best in bold):\n\n"
              + _accuracy_table(result.accuracies, heads.configs, lrs, scale, best.name)]  # fmt: skip
    if data.held_out:
        tables.append(
            "Top-1 of every head on val:\n\n" + _accuracy_table(val_acc, heads.configs, lrs, scale, best.name)
        )
    augment = f"; train: RandomResizedCrop {cfg.crop_size} + flip" if cfg.mode == "augment" else ""
    dataset = {
        "train": cfg.train, "val": cfg.val, "classes": len(data.classes), "train_images": len(data.fit_paths),
        "held_out_images": data.held_out, "val_images": len(val_labels), "mode": cfg.mode,
        "transform": f"resize {cfg.resize_size}, centre crop {cfg.crop_size}{augment}", "device": str(ctx.device),
    }  # fmt: skip
    extra = {
        "per_class": m["per_class"], "confusion": m["confusion"], "classes": data.classes,
        "selection_accuracies": result.accuracies, "val_accuracies": val_acc, "curve": result.curve,
    }  # fmt: skip
    bad = sorted(set(data.bad))
    return ctx.write_results(dataset=dataset, metrics=metrics, tables=tables, extra=extra, bad_images=bad)
