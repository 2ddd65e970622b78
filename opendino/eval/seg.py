"""Linear semantic segmentation on frozen patch tokens: DINOv2's "lin." and "+ms" protocols (paper §7.4).

Head (official `BNHead`, dense_eval_facts.md §1.2): BatchNorm over the feature channels, then a 1x1 convolution to
class logits (weights N(0, 0.01), bias 0). Features: `get_intermediate_layers(reshape=True, norm=True)` of the
centre-padded image; "linear" takes the last block, "ms" the last 4 blocks, bilinearly resized to the first map's size
and concatenated (resize_concat). Logits are bilinearly upsampled (align_corners False) to the label size and trained
with cross-entropy averaged over all pixels, ignored ones counting 0 (mmseg's avg_non_ignore=False), AdamW and a
poly schedule (power 1) after a linear warm-up from lr x 1e-6.

Training runs either on the fly (mode `augment`: random rescale, crop, flip, photometric distortion, one backbone pass
per step, as the official mmseg pipeline) or (mode `fast`) on cached token maps of the training images resized once to
a fixed size and of their mirror images, which makes the head trainable on a CPU. Inference resizes the shorter side to
`resize_size`, pads to the patch grid, upsamples the logits to the padded size and crops the padding off before
resizing to the label size (mmseg resizes the padded logits instead, shifting predictions by up to half the padding);
"ms" averages the softmax probabilities over test scales x {image, mirror image}. Optionally each view is predicted
by sliding windows. Metrics come from a confusion matrix accumulated over the whole set (mmseg's total-area rule).

The trained head is written to `head.safetensors` beside results.json with its description (blocks, classes, names,
palette, test sizes, backbone) in the file's metadata (`save_head`); `opendino viz seg` reads it back.

Under torchrun every process computes the same result (nothing is sharded): run it on one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from opendino import dist
from opendino.eval.dense import center_pad, token_maps
from opendino.eval.features import autocast_for
from opendino.eval.seg_data import (
    SegAugment,
    SegPairs,
    SegTrainStream,
    cached_size,
    colorize,
    infer_num_classes,
    list_seg_pairs,
    normalize,
    palette,
    rescale_size,
    seg_confusion,
    seg_metrics,
)

__all__ = [
    "LinearSegHead",
    "cached_train_maps",
    "evaluate",
    "poly_lr",
    "predict",
    "run",
    "save_head",
    "seg_blocks",
    "seg_confusion",
    "seg_features",
    "seg_loss",
    "seg_metrics",
    "train_head_augmented",
    "train_head_on_maps",
]

CACHE_VERSION = 1  # bump when the meaning of cached token maps changes


class LinearSegHead(nn.Module):
    """BatchNorm over the feature channels, then a 1x1 convolution to class logits (the official BNHead)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)  # official: SyncBatchNorm (eps 1e-5, momentum 0.1) over 8 GPUs
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)  # type: ignore[arg-type]

    def forward(self, maps: Tensor) -> Tensor:
        return self.conv(self.bn(maps))  # (B, C, h, w) -> (B, K, h, w)


def seg_blocks(n_blocks: int, variant: str) -> list[int]:
    """0-based blocks whose tokens the head reads: the last one ("linear") or the last 4 ("ms")."""
    if variant == "linear":
        return [n_blocks - 1]
    if variant != "ms":
        raise ValueError(f"variant={variant!r}: expected 'linear' or 'ms'")
    if n_blocks < 4:
        raise ValueError(f"variant 'ms' takes the last 4 blocks; the backbone has {n_blocks}")
    return list(range(n_blocks - 4, n_blocks))


def seg_features(model: nn.Module, images: Tensor, blocks: Sequence[int]) -> Tensor:
    """(B, len(blocks) * D, h, w): normed patch-token maps of `blocks` for centre-padded `images`, resized
    bilinearly to the first map's size and concatenated along channels."""
    maps = [m for m, _ in token_maps(model, images, blocks, norm=True, class_token=False)]
    size = maps[0].shape[-2:]
    maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear") for m in maps]
    return torch.cat(maps, dim=1)


def poly_lr(step: int, total: int, base_lr: float, warmup: int = 0, *, warmup_ratio: float = 1e-6) -> float:
    """mmcv's poly schedule (power 1, min 0) with linear warm-up: base_lr * (1 - step / total), multiplied during the
    first `warmup` steps by 1 - (1 - step / warmup) * (1 - warmup_ratio)."""
    lr = base_lr * (1 - step / total)
    if step < warmup:
        lr *= 1 - (1 - step / warmup) * (1 - warmup_ratio)
    return lr


def seg_loss(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Cross-entropy of (B, K, h, w) logits upsampled to the (B, H, W) labels, averaged over all pixels."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none").mean()


def _new_head(in_channels: int, num_classes: int, seed: int, device: torch.device) -> LinearSegHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LinearSegHead(in_channels, num_classes).to(device)


def _fit(
    head: LinearSegHead,
    batches: Iterator[tuple[Tensor, Tensor]],
    *,
    iterations: int,
    lr: float,
    weight_decay: float,
    warmup: int,
    ignore_index: int,
    desc: str,
) -> list[float]:
    """The training loop shared by both modes; returns the loss of every step."""
    device = next(head.parameters()).device
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    head.train()
    losses: list[float] = []
    bar = tqdm(range(iterations), unit="it", desc=desc, dynamic_ncols=True, disable=None)
    for step in bar:
        feats, labels = next(batches)
        for group in opt.param_groups:
            group["lr"] = poly_lr(step, iterations, lr, warmup)
        loss = seg_loss(head(feats.to(device).float()), labels.to(device), ignore_index)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    head.eval()
    return losses


def train_head_on_maps(
    maps: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    ignore_index: int = 255,
    iterations: int = 4000,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup: int = 150,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[LinearSegHead, list[float]]:
    """Train the head on stored token maps (N, C, h, w) with labels (N, H, W); batches are drawn epoch by epoch
    from a permutation seeded by `seed`. Returns the head (eval mode) and the loss of every step."""
    if maps.ndim != 4 or labels.ndim != 3 or maps.shape[0] != labels.shape[0] or maps.shape[0] == 0:
        raise ValueError(f"maps (N, C, h, w) and labels (N, H, W) expected, got {tuple(maps.shape)} and "
                         f"{tuple(labels.shape)}")  # fmt: skip
    head = _new_head(maps.shape[1], num_classes, seed, torch.device(device))
    n = maps.shape[0]
    take = min(batch_size, n)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(seed)
        while True:
            for idx in torch.randperm(n, generator=g)[: n - n % take].split(take):
                yield maps[idx], labels[idx]

    losses = _fit(head, batches(), iterations=iterations, lr=lr, weight_decay=weight_decay, warmup=warmup,
                  ignore_index=ignore_index, desc="head (cached maps)")  # fmt: skip
    return head, losses


def train_head_augmented(
    model: nn.Module,
    pairs: Sequence[tuple[str, str]],
    augment: SegAugment,
    *,
    blocks: Sequence[int],
    num_classes: int,
    iterations: int = 4000,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup: int = 150,
    seed: int = 0,
    reduce_zero: bool = False,
    amp: str = "bf16",
    num_workers: int = 0,
) -> tuple[LinearSegHead, list[float], list[tuple[str, str]]]:
    """Train the head on augmented crops, one frozen-backbone pass per step (the official protocol). Returns the
    head, the loss of every step and the unreadable images [(path, reason)] (their samples are skipped)."""
    device = next(model.parameters()).device
    stream = SegTrainStream(pairs, augment, seed=seed, reduce_zero=reduce_zero)
    loader = DataLoader(stream, batch_size=batch_size, sampler=range(1 << 62), num_workers=num_workers,
                        collate_fn=SegTrainStream.collate, pin_memory=device.type == "cuda")  # fmt: skip
    bad: list[tuple[str, str]] = []

    @torch.no_grad()
    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels, reasons in loader:
            bad.extend(reasons)
            if images is None:
                continue
            with autocast_for(device, amp):
                feats = seg_features(model, images.to(device, non_blocking=True), blocks)
            yield feats.float(), labels

    dim = int(model.embed_dim) * len(blocks)  # type: ignore[arg-type]
    head = _new_head(dim, num_classes, seed, device)
    losses = _fit(head, batches(), iterations=iterations, lr=lr, weight_decay=weight_decay, warmup=warmup,
                  ignore_index=augment.ignore_index, desc="head (augmented)")  # fmt: skip
    return head, losses, sorted(set(bad))


# ---------------------------------------------------------------------------------------------- cached token maps
def _pairs_digest(pairs: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for path in (p for pair in pairs for p in pair):
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()


def cached_train_maps(
    model: nn.Module,
    pairs: Sequence[tuple[str, str]],
    size: tuple[int, int],
    blocks: Sequence[int],
    *,
    flips: bool = True,
    ignore_index: int = 255,
    reduce_zero: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    identity: dict[str, Any] | None = None,
    amp: str = "bf16",
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
    """Token maps (V, C, h, w) float16 and labels (V, H, W) (uint8 when every value fits, else int32) of the pairs
    resized to `size` = (H, W) (their mirror images follow when `flips`), and the unreadable images [(path, reason)].

    Stored under `cache_dir` (when given with the backbone `identity`), keyed by the backbone, the files (sizes and
    modification times), size, blocks, flips, label handling and precision.
    """
    device = next(model.parameters()).device
    amp = amp if device.type == "cuda" else "none"
    spec = {"version": CACHE_VERSION, "backbone": identity, "pairs": _pairs_digest(pairs), "n": len(pairs),
            "size": list(size), "blocks": list(blocks), "flips": flips, "ignore_index": ignore_index,
            "reduce_zero_label": reduce_zero, "amp": amp, "resize": "bilinear antialias"}  # fmt: skip
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
    file = Path(cache_dir).expanduser() / f"seg-{key}" / "maps.safetensors" if cache_dir and identity else None
    if file is not None and file.exists():
        stored = load_file(str(file))
        bad = json.loads((file.parent / "bad.json").read_text())
        return stored["maps"], stored["labels"], [tuple(b) for b in bad]  # type: ignore[misc]
    dataset = SegPairs(pairs, size, ignore_index=ignore_index, reduce_zero=reduce_zero)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=SegPairs.collate)
    maps, flipped, labels, bad = [], [], [], []
    with torch.inference_mode():
        for images, labs, _, bad_here in tqdm(loader, unit="batch", desc="token maps", dynamic_ncols=True,
                                               disable=None):  # fmt: skip
            bad += [(pairs[i][0], reason) for i, reason in bad_here]
            if images is None:
                continue
            images = images.to(device)
            with autocast_for(device, amp):
                maps.append(seg_features(model, images, blocks).half().cpu())
                if flips:
                    flipped.append(seg_features(model, images.flip(-1), blocks).half().cpu())
            labels.append(labs)
    if not maps:
        raise ValueError(f"none of the {len(pairs)} training images could be read")
    all_maps = torch.cat(maps + flipped)
    all_labels = torch.cat(labels + ([torch.cat(labels).flip(-1)] if flips else []))
    small = int(all_labels.min()) >= 0 and int(all_labels.max()) <= 255
    all_labels = all_labels.to(torch.uint8 if small else torch.int32)  # labels would outweigh the float16 maps
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{uuid.uuid4().hex}.tmp")
        save_file({"maps": all_maps.contiguous(), "labels": all_labels.contiguous()}, str(tmp))
        (file.parent / "bad.json").write_text(json.dumps(bad))
        (file.parent / "key.json").write_text(json.dumps(spec, indent=2))
        os.replace(tmp, file)
    return all_maps, all_labels, bad


# ---------------------------------------------------------------------------------------------- inference
def _view_logits(model: nn.Module, head: nn.Module, image: Tensor, blocks: Sequence[int], amp: str) -> Tensor:
    """(1, K, H, W) logits of a normalised (1, 3, H, W) view: padded to the patch grid, the padding cropped off."""
    h, w = image.shape[-2:]
    _, (left, right, top, bottom) = center_pad(image, int(model.patch_size))  # type: ignore[arg-type]
    with autocast_for(image.device, amp):
        feats = seg_features(model, image, blocks)
    logits = F.interpolate(head(feats.float()), size=(h + top + bottom, w + left + right), mode="bilinear")
    return logits[..., top : top + h, left : left + w]


def _slide_logits(model: nn.Module, head: nn.Module, image: Tensor, blocks: Sequence[int], amp: str,
                  window: int) -> Tensor:  # fmt: skip
    """Logits averaged over `window`-sized windows with stride 2/3 of a window, the last ones clamped to the
    border (mmseg's slide inference)."""
    stride = max(1, window * 2 // 3)
    h, w = image.shape[-2:]
    sums: Tensor | None = None
    counts = torch.zeros(1, 1, h, w, device=image.device)
    for i in range(max(h - window + stride - 1, 0) // stride + 1):
        for j in range(max(w - window + stride - 1, 0) // stride + 1):
            y2, x2 = min(i * stride + window, h), min(j * stride + window, w)
            y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
            logits = _view_logits(model, head, image[..., y1:y2, x1:x2], blocks, amp)
            if sums is None:
                sums = torch.zeros(1, logits.shape[1], h, w, device=image.device)
            sums[..., y1:y2, x1:x2] += logits
            counts[..., y1:y2, x1:x2] += 1
    assert sums is not None
    return sums / counts


@torch.no_grad()
def predict(
    model: nn.Module,
    head: nn.Module,
    image: Tensor,
    *,
    blocks: Sequence[int],
    resize_size: int,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int = 0,
    amp: str = "bf16",
) -> Tensor:
    """(K, H, W) class probabilities of a (3, H, W) uint8 image, averaged over scales x (flips): each view has its
    shorter side at resize_size x scale (longer side at most 4x that), `window` > 0 predicts it by sliding windows."""
    device = next(head.parameters()).device
    h0, w0 = image.shape[-2:]
    probs: Tensor | None = None
    views = 0
    for scale in scales:
        size = rescale_size(h0, w0, resize_size * scale, 4 * resize_size * scale)
        x = normalize(TF.resize(image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True))
        x = x[None].to(device)
        for flipped in (False, True) if flip else (False,):
            view = x.flip(-1) if flipped else x
            logits = _slide_logits(model, head, view, blocks, amp, window) if window else _view_logits(
                model, head, view, blocks, amp)  # fmt: skip
            p = F.interpolate(logits, size=(h0, w0), mode="bilinear").softmax(dim=1)[0]
            p = p.flip(-1) if flipped else p
            probs = p if probs is None else probs + p
            views += 1
    assert probs is not None
    return probs / views


def evaluate(
    model: nn.Module,
    head: nn.Module,
    pairs: Sequence[tuple[str, str]],
    *,
    num_classes: int,
    blocks: Sequence[int],
    resize_size: int,
    ignore_index: int = 255,
    reduce_zero: bool = False,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int = 0,
    amp: str = "bf16",
    num_workers: int = 0,
    keep: Sequence[int] = (),
) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor, Tensor]], list[tuple[str, str]]]:
    """Dataset confusion matrix of the head's predictions, {i: (image, label, prediction)} for the pair indices in
    `keep`, and the unreadable images [(path, reason)]."""
    dataset = SegPairs(pairs, ignore_index=ignore_index, reduce_zero=reduce_zero)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    shown: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    bad: list[tuple[str, str]] = []
    for image, label, i, reason in tqdm(loader, unit="img", desc="predict", dynamic_ncols=True, disable=None):
        if image is None:
            bad.append((pairs[i][0], reason))
            continue
        pred = predict(model, head, image, blocks=blocks, resize_size=resize_size, scales=scales, flip=flip,
                       window=window, amp=amp).argmax(dim=0).cpu()  # fmt: skip
        cm += seg_confusion(pred, label, num_classes, ignore_index)
        if i in keep:
            shown[i] = (image, label, pred)
    return cm, shown, bad


def save_head(head: nn.Module, meta: dict[str, Any], path: Path) -> Path:
    """The head's weights with `meta` as JSON under the safetensors metadata key `opendino.head`, written atomically."""
    tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(tmp), metadata={"opendino.head": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def run(cfg: Any) -> dict[str, Any]:
    """`opendino eval seg`: train the head on `cfg.train`, score it on `cfg.val`, write results and pictures."""
    from opendino.eval.common import markdown_table, setup
    from opendino.eval.pictures import save_image_grid

    ctx = setup("seg", cfg)
    # ---- data
    train_pairs = list_seg_pairs(cfg.train, cfg.images_dir[0], cfg.labels_dir[0], cfg.train_list)
    val_pairs = list_seg_pairs(cfg.val, cfg.images_dir[-1], cfg.labels_dir[-1], cfg.val_list)
    labels_args = dict(ignore_index=cfg.ignore_index, reduce_zero=cfg.reduce_zero_label)
    num_classes = cfg.num_classes or infer_num_classes([lab for _, lab in train_pairs], **labels_args)
    names = list(cfg.class_names) or [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class_names given for {num_classes} classes")
    blocks = seg_blocks(int(ctx.model.n_blocks), cfg.variant)  # type: ignore[arg-type]
    mode = cfg.mode if cfg.mode != "auto" else ("augment" if ctx.device.type == "cuda" else "fast")
    # ---- head
    fit = dict(num_classes=num_classes, iterations=cfg.iterations, batch_size=cfg.train_batch_size, lr=cfg.lr,
               weight_decay=cfg.weight_decay, warmup=cfg.warmup_iterations, seed=cfg.seed)  # fmt: skip
    if mode == "fast":
        size = cached_size(train_pairs, cfg.resize_size, ctx.patch_size)
        maps, labels, bad = cached_train_maps(
            ctx.model, train_pairs, size, blocks, flips=cfg.cache_flips, ignore_index=cfg.ignore_index,
            reduce_zero=cfg.reduce_zero_label, cache_dir=ctx.cache_dir, identity=ctx.identity, amp=cfg.amp,
            batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        )  # fmt: skip
        head, losses = train_head_on_maps(maps, labels, ignore_index=cfg.ignore_index, device=ctx.device, **fit)
        training = f"cached token maps at {size[0]}x{size[1]}" + (" + mirror images" if cfg.cache_flips else "")
    else:
        augment = SegAugment(cfg.resize_size, cfg.crop_size, tuple(cfg.ratio_range), cfg.cat_max_ratio,
                             cfg.ignore_index)  # fmt: skip
        head, losses, bad = train_head_augmented(
            ctx.model, train_pairs, augment, blocks=blocks, reduce_zero=cfg.reduce_zero_label, amp=cfg.amp,
            num_workers=cfg.num_workers, **fit,
        )  # fmt: skip
        training = f"augmented crops {cfg.crop_size}, scale {list(cfg.ratio_range)} x {cfg.resize_size}"
    # ---- evaluation
    ms = cfg.variant == "ms"
    scales = tuple(cfg.test_scales) if ms else (1.0,)
    shown_idx = sorted({int(i) for i in np.linspace(0, len(val_pairs) - 1, min(4, len(val_pairs)))})
    cm, shown, val_bad = evaluate(
        ctx.model, head, val_pairs, num_classes=num_classes, blocks=blocks, resize_size=cfg.resize_size,
        scales=scales, flip=ms, window=cfg.crop_size if cfg.inference == "slide" else 0, amp=cfg.amp,
        num_workers=cfg.num_workers, keep=shown_idx, **labels_args,
    )  # fmt: skip
    scores = seg_metrics(cm, names)
    # ---- outputs
    if shown:
        rows = [[image.permute(1, 2, 0).numpy() / 255, colorize(label, num_classes, cfg.ignore_index),
                 colorize(pred, num_classes, -1)] for image, label, pred in shown.values()]  # fmt: skip
        titles = ["image", "ground truth", "prediction"]
        stems = [Path(val_pairs[i][0]).stem for i in shown]
        save_image_grid(rows, ctx.picture_path("predictions.png"), column_titles=titles, row_titles=stems)
    if dist.is_main():  # read back by `opendino viz seg` (opendino.viz.heads)
        head_meta = {"task": "seg", "variant": cfg.variant, "blocks": blocks, "embed_dim": ctx.embed_dim,
                     "in_channels": ctx.embed_dim * len(blocks), "num_classes": num_classes, "class_names": names,
                     "palette": (palette(num_classes) * 255).round().astype(int).tolist(),
                     "ignore_index": cfg.ignore_index, "reduce_zero_label": cfg.reduce_zero_label,
                     "resize_size": cfg.resize_size, "scales": list(scales), "flip": ms,
                     "window": cfg.crop_size if cfg.inference == "slide" else 0, "patch_size": ctx.patch_size,
                     "backbone": cfg.backbone, "backbone_identity": ctx.identity}  # fmt: skip
        save_head(head, head_meta, ctx.out / "head.safetensors")
    metrics = {k: scores[k] for k in ("miou", "pixel_accuracy", "mean_accuracy")}
    pixels = cm.sum(dim=1).tolist()
    per_class = [[n, scores["per_class_iou"][n], scores["per_class_accuracy"][n], pixels[i]]
                 for i, n in enumerate(names)]  # fmt: skip
    tables = [markdown_table(["variant", "mIoU", "pixel accuracy", "mean class accuracy", "training"],
                             [[cfg.variant, *metrics.values(), training]]),
              markdown_table(["class", "IoU", "accuracy", "val pixels"], per_class)]  # fmt: skip
    every = max(1, len(losses) // 200)
    dataset = {"train": cfg.train, "val": cfg.val, "train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
               "num_classes": num_classes, "ignore_index": cfg.ignore_index, "training": training,
               "test": f"shorter side {cfg.resize_size}, scales {list(scales)}" + (", flips" if ms else "")
               + f", {cfg.inference}", "device": str(ctx.device)}  # fmt: skip
    extra = {"per_class_iou": scores["per_class_iou"], "per_class_accuracy": scores["per_class_accuracy"],
             "confusion": cm.tolist(), "blocks": blocks, "mode": mode,
             "loss": {"every": every, "values": losses[::every], "final": losses[-1]}}  # fmt: skip
    return ctx.write_results(dataset=dataset, metrics=metrics, tables=tables, extra=extra, bad_images=bad + val_bad)
