"""Robustness to common corruptions: `opendino eval robustness`, ImageNet-C applied on the fly.

Protocol (facts sheet `dense_eval_facts.md` §4): DINOv2 runs its best ImageNet linear classifier, fitted on clean
features, on the shifted sets (paper §7.1, Table 6). Here the classifier (the best head of the fast linear protocol,
or the weighted kNN with k = 20, T = 0.07) is fitted on the clean features of a labelled train folder; each
validation image is resized and centre-cropped (as ImageNet-C was made: Resize 256 + CenterCrop 224), corrupted on
the device by `opendino.eval.corruptions` at every (corruption, severity), normalised and passed through the
backbone, and its prediction scored. Errors err(c, s) = 1 - top-1 give, against a baseline run (an earlier results.json
of this evaluation on the same images, or the published AlexNet errors),
    CE_c = 100 * sum_s err(c, s) / sum_s err_base(c, s),   mCE = mean_c CE_c        (amx:imagenet.py:L187-194)
and, with the clean errors e and e_base, the relative
    rCE_c = 100 * sum_s (err(c, s) - e) / sum_s (err_base(c, s) - e_base),   relative mCE = mean_c rCE_c.
Without a baseline the headline is the unnormalised mean error over corruptions and severities (hendrycks' test.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from opendino import dist
from opendino.eval.common import markdown_table
from opendino.eval.corruptions import CORRUPTIONS, corrupt
from opendino.eval.features import iter_features

__all__ = [
    "ALEXNET_ERRORS",
    "Baseline",
    "Classifier",
    "corrupted_accuracies",
    "corruption_errors",
    "corruption_examples",
    "knn_classifier",
    "linear_classifier",
    "load_baseline",
    "run",
    "save_error_heatmap",
    "stratified_subset",
]

# AlexNet's ImageNet-C top-1 errors averaged over severities 1-5 (fractions; amx:imagenet.py:L148-152, facts §4.2)
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}  # fmt: skip

BySet = dict[str, dict[int, float]]  # corruption -> severity -> a top-1 accuracy or error


# ---------------------------------------------------------------------------------------------------- classifiers
@dataclass
class Classifier:
    """Class scores from backbone features: `outputs` names the features it reads (see opendino.eval.features)."""

    name: str
    outputs: tuple[str, ...]
    scores: Callable[[dict[str, Tensor]], Tensor]  # features of n images -> (n, C)


def knn_classifier(
    train: Tensor, train_labels: Tensor, *, num_classes: int, k: int = 20, temperature: float = 0.07
) -> Classifier:
    """Weighted kNN on CLS features (the official kNN protocol, one k)."""
    from opendino.eval.knn import knn_scores

    def scores(feats: dict[str, Tensor]) -> Tensor:
        return knn_scores(train, train_labels, feats["cls"], ks=(k,), temperature=temperature,
                          num_classes=num_classes)[min(k, train.shape[0])]  # fmt: skip

    return Classifier(name=f"knn (k={k}, T={temperature:g})", outputs=("cls",), scores=scores)


def linear_classifier(head: Any) -> Classifier:
    """A trained `opendino.eval.linear.LinearClassifier` head (reads cls_blocks and the mean patch token)."""

    def scores(feats: dict[str, Tensor]) -> Tensor:
        return head.logits(feats["cls_blocks"], feats["mean"])

    return Classifier(name=f"linear ({head.name})", outputs=("cls_blocks", "mean"), scores=scores)


# ----------------------------------------------------------------------------------------- corrupted evaluation
def _generator(device: torch.device, seed: int, corruption: str, severity: int, first: int) -> torch.Generator:
    """A generator on the images' device, seeded by (seed, corruption, severity, first image of the batch)."""
    digest = hashlib.sha256(f"{seed}/{corruption}/{severity}/{first}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.inference_mode()
def corrupted_accuracies(
    model: torch.nn.Module,
    loader: Iterable,
    labels: Tensor,
    classifier: Classifier,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    device: torch.device | str = "cpu",
    amp: str = "bf16",
    seed: int = 0,
    total: int | None = None,
) -> tuple[BySet, int, list[tuple[int, str]]]:
    """Top-1 accuracy {corruption: {severity: acc}} of `classifier` on every corruption of the images of `loader`.

    `loader` yields `(uint8 crops (B, 3, H, W) | None, dataset indices, bad)` (a `make_loader` over a transform that
    ends in uint8 tensors); `labels` holds the label of every dataset index. Each batch is decoded once and corrupted
    on `device` at every (corruption, severity), normalised with the ImageNet mean / std and run through `model`
    (autocast on GPU). Under torchrun each process passes its shard and the counts are summed. Returns the
    accuracies, the number of images scored and the (index, reason) of unreadable images.
    """
    from opendino.data.augment import IMAGENET_MEAN, IMAGENET_STD

    device = torch.device(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    sets = [(c, s) for c in corruptions for s in severities]
    correct = torch.zeros(len(sets), dtype=torch.float64)
    seen, bad = 0, []
    bar = tqdm(total=(total or 0) * len(sets) or None, unit="img", desc="corrupted", dynamic_ncols=True,
               disable=None if dist.is_main() else True)  # fmt: skip
    for images, indices, batch_bad in loader:
        bad += batch_bad
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        target = labels[indices]
        first = int(indices[0])
        for j, (name, severity) in enumerate(sets):
            x = corrupt(images, name, severity, _generator(device, seed, name, severity, first))
            x = (x.float() / 255 - mean) / std
            (fb,) = iter_features(model, [(x, indices, [])], outputs=classifier.outputs, device=device, amp=amp)
            correct[j] += (classifier.scores(fb.features).argmax(dim=1).cpu() == target).sum().item()
            bar.update(len(indices))
        seen += len(indices)
    bar.close()
    if dist.world_size() > 1:
        counts = dist.all_reduce(torch.cat([correct, torch.tensor([float(seen)], dtype=torch.float64)]))
        correct, seen = counts[:-1], int(counts[-1])
    if seen == 0:
        raise ValueError("no readable validation images to corrupt")
    accuracies: BySet = {c: {} for c in corruptions}
    for j, (name, severity) in enumerate(sets):
        accuracies[name][severity] = correct[j].item() / seen
    return accuracies, seen, bad


def stratified_subset(labels: Tensor, max_per_class: int) -> Tensor:
    """Sorted indices of at most `max_per_class` images of each class, evenly spaced through the class's images in
    listing order (no randomness: the same folder always gives the same subset); 0 keeps everything."""
    if max_per_class < 0:
        raise ValueError(f"max_per_class={max_per_class}: must be >= 0")
    if max_per_class == 0:
        return torch.arange(labels.shape[0])
    keep = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) > max_per_class:
            members = members[np.linspace(0, len(members) - 1, max_per_class).round().astype(np.int64)]
        keep.append(members)
    return torch.cat(keep).sort().values


# -------------------------------------------------------------------------------------------------------- errors
def _check_errors(name: str, errors: Mapping[str, Mapping[int, float]]) -> None:
    for c, by_severity in errors.items():
        for s, e in by_severity.items():
            if not 0.0 <= e <= 1.0:
                raise ValueError(f"{name}: error {e} of {c} at severity {s} is not a fraction in [0, 1]")


def corruption_errors(
    errors: Mapping[str, Mapping[int, float]],
    baseline: Mapping[str, Mapping[int, float]] | None = None,
    *,
    clean_error: float | None = None,
    baseline_clean_error: float | None = None,
) -> dict[str, Any]:
    """Summary of top-1 errors {corruption: {severity: error}} (fractions).

    Always: `mean_error` (%, over every corruption and severity) and `mean_error_per_corruption` (%). With a
    `baseline` holding every (corruption, severity) of `errors`: `ce` {corruption: CE in %} and `mce`; with both
    clean errors too: `relative_ce` and `relative_mce`. A relative CE is None where the baseline's corrupted errors
    do not exceed its clean error (nothing to normalise by), and the relative mCE is then None too.
    """
    _check_errors("errors", errors)
    if not errors or any(not v for v in errors.values()):
        raise ValueError("errors: give at least one severity for every corruption")
    per_corruption = {c: 100 * sum(v.values()) / len(v) for c, v in errors.items()}
    out: dict[str, Any] = {
        "mean_error": 100 * sum(e for v in errors.values() for e in v.values()) / sum(len(v) for v in errors.values()),
        "mean_error_per_corruption": per_corruption,
    }
    if baseline is None:
        return out
    _check_errors("baseline", baseline)
    missing = [f"{c}@{s}" for c, v in errors.items() for s in v if s not in baseline.get(c, {})]
    if missing:
        raise ValueError(f"the baseline lacks {len(missing)} of the evaluated sets, e.g. {missing[:5]}")
    ce = {}
    for c, v in errors.items():
        denominator = sum(baseline[c][s] for s in v)
        if denominator <= 0:
            raise ValueError(f"the baseline's errors on {c} are all zero: CE is undefined")
        ce[c] = 100 * sum(v.values()) / denominator
    out["ce"], out["mce"] = ce, sum(ce.values()) / len(ce)
    if clean_error is not None and baseline_clean_error is not None:
        rel: dict[str, float | None] = {}
        for c, v in errors.items():
            denominator = sum(baseline[c][s] - baseline_clean_error for s in v)
            numerator = sum(e - clean_error for e in v.values())
            rel[c] = 100 * numerator / denominator if denominator > 0 else None
        defined = [r for r in rel.values() if r is not None]
        out["relative_ce"] = rel
        out["relative_mce"] = sum(defined) / len(defined) if len(defined) == len(rel) else None
    return out


@dataclass
class Baseline:
    """Errors to normalise by: {corruption: {severity: error}}, the clean error if known, where they come from."""

    errors: BySet
    clean_error: float | None
    source: str


# dataset facts that must agree with a baseline run for its errors to be comparable
_COMPARABLE = ("val", "images", "subset_sha256", "classes", "resize_size", "crop_size")


def load_baseline(
    source: str | os.PathLike[str],
    *,
    corruptions: Sequence[str],
    severities: Sequence[int],
    dataset: Mapping[str, Any] | None = None,
) -> Baseline:
    """The baseline errors: "alexnet" (the published ImageNet-C errors, averaged over severities, so all five
    severities are required) or the results.json (or its folder) of an earlier robustness run, whose dataset facts
    (val folder, subset, classes, resize and crop sizes) must equal `dataset` and which must cover every
    (corruption, severity) evaluated now."""
    if str(source).lower() == "alexnet":
        if sorted(severities) != [1, 2, 3, 4, 5]:
            raise ValueError(f"baseline=alexnet holds errors averaged over severities 1-5; got severities {severities}")
        return Baseline({c: dict.fromkeys(severities, ALEXNET_ERRORS[c]) for c in corruptions}, None, "AlexNet")
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ValueError(f"baseline {source}: no such results.json (give an earlier robustness run or 'alexnet')")
    record = json.loads(path.read_text())
    if record.get("evaluation") != "robustness":
        raise ValueError(f"baseline {path}: a results.json of '{record.get('evaluation')}', not of robustness")
    if dataset is not None:
        theirs = record.get("dataset", {})
        diff = [f"{k}: {dataset.get(k)!r} here, {theirs.get(k)!r} in the baseline" for k in _COMPARABLE
                if dataset.get(k) != theirs.get(k)]  # fmt: skip
        if diff:
            raise ValueError(f"baseline {path} was run on other images: " + "; ".join(diff))
    stored = record["extra"]["errors"]
    errors = {c: {int(s): float(e) for s, e in v.items()} for c, v in stored.items()}
    missing = [f"{c}@{s}" for c in corruptions for s in severities if s not in errors.get(c, {})]
    if missing:
        raise ValueError(f"baseline {path} lacks {len(missing)} (corruption, severity) sets, e.g. {missing[:5]}")
    return Baseline(errors, record["extra"].get("clean_error"), str(path))


# ------------------------------------------------------------------------------------------------------ pictures
def save_error_heatmap(errors: BySet, path: str | os.PathLike[str], title: str = "") -> Path:
    """Top-1 error (%) per corruption (rows) and severity (columns), numbers written in the cells."""
    from opendino.eval.pictures import pyplot, save_figure

    plt = pyplot()
    names = list(errors)
    severities = sorted({s for v in errors.values() for s in v})
    grid = np.array([[100 * errors[c].get(s, np.nan) for s in severities] for c in names])
    fig, ax = plt.subplots(figsize=(1.0 * len(severities) + 3.2, 0.38 * len(names) + 1.4))
    image = ax.imshow(grid, cmap="magma_r", vmin=0, vmax=100, aspect="auto")
    for i in range(len(names)):
        for j in range(len(severities)):
            ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] > 55 else "black")  # fmt: skip
    ax.set_xticks(range(len(severities)), [str(s) for s in severities])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("severity")
    ax.set_title(title or "top-1 error (%)", fontsize=10)
    fig.colorbar(image, ax=ax, label="top-1 error (%)")
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def corruption_examples(
    image: Tensor, corruptions: Sequence[str], severities: Sequence[int], seed: int = 0
) -> list[list[np.ndarray]]:
    """Rows [clean, severity s...] of one uint8 (3, H, W) crop under each corruption, as (H, W, 3) arrays in [0, 1]."""
    clean = image.permute(1, 2, 0).numpy() / 255
    rows = []
    for c in corruptions:
        row = [clean]
        for s in severities:
            out = corrupt(image[None], c, s, _generator(torch.device("cpu"), seed, c, s, 0))
            row.append(out[0].permute(1, 2, 0).numpy() / 255)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------ run
def _clean_features(ctx: Any, paths: Sequence[str], labels: Tensor, transform: Any, outputs, desc: str):
    """Cached clean features of `paths` as tensors, the paths and labels of their rows (readable images only) and
    the unreadable images."""
    fs = ctx.features(paths, transform, outputs=outputs, desc=desc)
    label_of = dict(zip(paths, labels.tolist(), strict=True))
    kept = torch.tensor([label_of[p] for p in fs.paths], dtype=torch.long)
    return {k: torch.from_numpy(v) for k, v in fs.features.items()}, kept, fs.paths, list(fs.bad)


def _fit_classifier(
    ctx: Any, cfg: Any, train: Any, val: Any, subset: Tensor, transform: Any
) -> tuple[Classifier, float, list]:
    """The classifier fitted on clean train features, its clean top-1 on the val subset and the unreadable images.
    The linear head is picked on all of val (the official protocol picks it on ImageNet val)."""
    from opendino.eval.linear import fit_linear_probes

    outputs = ("cls",) if cfg.classifier == "knn" else ("cls_blocks", "mean")
    train_feats, train_labels, _, bad = _clean_features(ctx, train.paths, train.labels, transform, outputs, "train")
    if cfg.classifier == "knn":
        subset_paths = [val.paths[i] for i in subset]
        feats, labels, _, val_bad = _clean_features(ctx, subset_paths, val.labels[subset], transform, outputs, "val")
        classifier = knn_classifier(train_feats["cls"], train_labels, num_classes=len(train.classes))
    else:
        val_feats, val_labels, val_paths, val_bad = _clean_features(
            ctx, val.paths, val.labels, transform, outputs, "val"
        )
        result = fit_linear_probes(
            train_feats, train_labels, val_feats, val_labels, num_classes=len(train.classes),
            epochs=cfg.linear_epochs, epoch_length=cfg.linear_epoch_length, seed=cfg.seed, device=ctx.device,
        )  # fmt: skip
        classifier = linear_classifier(result.best)
        chosen = {val.paths[i] for i in subset.tolist()}
        rows = torch.tensor([i for i, p in enumerate(val_paths) if p in chosen], dtype=torch.long)
        feats, labels = {k: v[rows] for k, v in val_feats.items()}, val_labels[rows]
    with torch.no_grad():
        clean_top1 = (classifier.scores(feats).argmax(dim=1) == labels).double().mean().item()
    return classifier, clean_top1, bad + val_bad


def _dataset_facts(cfg: Any, n_classes: int, subset_paths: Sequence[str], device: torch.device) -> dict[str, Any]:
    names = "\n".join(os.path.relpath(p, cfg.val) for p in subset_paths)  # the subset, whatever the mount point
    return {
        "train": cfg.train, "val": cfg.val, "classes": n_classes, "images": len(subset_paths),
        "max_per_class": cfg.max_per_class, "subset_sha256": hashlib.sha256(names.encode()).hexdigest(),
        "resize_size": cfg.resize_size, "crop_size": cfg.crop_size, "classifier": cfg.classifier,
        "corruptions": "opendino.eval.corruptions (ImageNet-C parameters, on the fly)", "device": str(device),
    }  # fmt: skip


def _save_pictures(ctx: Any, cfg: Any, errors: BySet, clean_top1: float, example: str, crop: Any) -> None:
    from opendino.data.sources import ImageDataset
    from opendino.eval.pictures import save_image_grid

    title = f"{cfg.backbone}: top-1 error (%), clean {100 * (1 - clean_top1):.1f}"
    save_error_heatmap(errors, ctx.picture_path("errors.png"), title=title)
    shown = [s for s in cfg.severities if s in (1, 3, 5)] or list(cfg.severities)
    image = ImageDataset([example], crop)[0][0]
    if image is not None:
        rows = corruption_examples(image, cfg.corruptions, shown, seed=cfg.seed)
        titles = ["clean", *(f"severity {s}" for s in shown)]
        save_image_grid(rows, ctx.picture_path("corruptions.png"), column_titles=titles,
                        row_titles=list(cfg.corruptions), cell_size=1.8)  # fmt: skip


def run(cfg: Any) -> dict[str, Any]:
    """`opendino eval robustness`: accuracy under corruptions, CE / mCE against a baseline, tables and pictures."""
    from torchvision.transforms import v2

    from opendino.data.augment import make_eval_transform
    from opendino.eval.common import list_labelled_images, setup
    from opendino.eval.features import make_loader

    # data: the val subset, its facts, the baseline (checked before the long part)
    ctx = setup("robustness", cfg)
    train = list_labelled_images(cfg.train)
    val = list_labelled_images(cfg.val, classes=train.classes)
    transform = make_eval_transform(cfg.resize_size, cfg.crop_size)
    crop = v2.Compose([*transform.transforms[:2], v2.PILToTensor()])  # the same resize and crop, as uint8
    subset = stratified_subset(val.labels, cfg.max_per_class)
    dataset = _dataset_facts(cfg, len(train.classes), [val.paths[i] for i in subset], ctx.device)
    baseline = None
    if cfg.baseline:
        baseline = load_baseline(cfg.baseline, corruptions=cfg.corruptions, severities=cfg.severities, dataset=dataset)
        if baseline.source == "AlexNet":
            warnings.warn("baseline=alexnet: the published AlexNet errors are comparable only on the full ImageNet "
                          "validation set at 224 px", UserWarning, stacklevel=2)  # fmt: skip

    # classifier on clean features; clean top-1 on the subset
    classifier, clean_top1, bad = _fit_classifier(ctx, cfg, train, val, subset, transform)

    # every corruption x severity of the subset, this process's shard
    mine = subset[dist.rank() :: dist.world_size()].tolist()
    loader = make_loader(val.paths, crop, batch_size=cfg.batch_size, num_workers=cfg.num_workers, sampler=mine,
                         pin_memory=ctx.device.type == "cuda")  # fmt: skip
    accuracy, scored, corrupted_bad = corrupted_accuracies(
        ctx.model, loader, val.labels, classifier, corruptions=cfg.corruptions, severities=cfg.severities,
        device=ctx.device, amp=cfg.amp, seed=cfg.seed, total=len(mine),
    )  # fmt: skip
    errors = {c: {s: 1 - a for s, a in v.items()} for c, v in accuracy.items()}
    summary = corruption_errors(
        errors, baseline.errors if baseline else None, clean_error=1 - clean_top1,
        baseline_clean_error=baseline.clean_error if baseline else None,
    )  # fmt: skip

    # results
    n_sets = len(cfg.corruptions) * len(cfg.severities)
    metrics: dict[str, Any] = {
        "clean_top1": clean_top1,
        "corrupted_top1": sum(a for v in accuracy.values() for a in v.values()) / n_sets,
        "mean_error": summary["mean_error"],
    }
    if baseline:
        metrics.update({k: summary[k] for k in ("mce", "relative_mce") if k in summary}, baseline=baseline.source)
    metrics["classifier"] = classifier.name
    if dist.is_main():
        _save_pictures(ctx, cfg, errors, clean_top1, val.paths[int(subset[0])], crop)
    extra: dict[str, Any] = {
        "accuracy": {c: {str(s): a for s, a in v.items()} for c, v in accuracy.items()},
        "errors": {c: {str(s): e for s, e in v.items()} for c, v in errors.items()},
        "clean_error": 1 - clean_top1,
        "scored_images": scored,
        **{k: summary[k] for k in ("mean_error_per_corruption", "ce", "relative_ce") if k in summary},
    }  # fmt: skip
    bad += [(val.paths[i], reason) for i, reason in corrupted_bad]
    tables = [_results_table(cfg, accuracy, summary), _summary_table(metrics, summary)]
    return ctx.write_results(dataset=dataset, metrics=metrics, tables=tables, extra=extra, bad_images=sorted(set(bad)))


def _results_table(cfg: Any, accuracy: BySet, summary: dict[str, Any]) -> str:
    columns = [k for k in ("ce", "relative_ce") if k in summary]
    headers = ["corruption", *(f"s{s} top-1 %" for s in cfg.severities), "mean error %"]
    headers += [{"ce": "CE", "relative_ce": "relative CE"}[k] for k in columns]
    rows = []
    for c in cfg.corruptions:
        row = [c, *(f"{100 * accuracy[c][s]:.1f}" for s in cfg.severities)]
        row += [f"{summary['mean_error_per_corruption'][c]:.1f}", *(_number(summary[k][c], 1) for k in columns)]
        rows.append(row)
    return "Top-1 accuracy under each corruption and severity:\n\n" + markdown_table(headers, rows)


def _summary_table(metrics: dict[str, Any], summary: dict[str, Any]) -> str:
    headers = ["clean top-1 %", "corrupted top-1 %", "mean error %"]
    row = [
        f"{100 * metrics['clean_top1']:.2f}",
        f"{100 * metrics['corrupted_top1']:.2f}",
        f"{summary['mean_error']:.2f}",
    ]
    if "mce" in summary:
        headers.append("mCE")
        row.append(f"{summary['mce']:.2f}")
    if "relative_mce" in summary:
        headers.append("relative mCE")
        row.append(_number(summary["relative_mce"], 2))
    baseline = f" CE and mCE are relative to {metrics['baseline']}." if "mce" in summary else ""
    return f"\nSummary ({metrics['classifier']}).{baseline}\n\n" + markdown_table(headers, [row])


def _number(value: float | None, decimals: int) -> str:
    return "undefined" if value is None else f"{value:.{decimals}f}"
