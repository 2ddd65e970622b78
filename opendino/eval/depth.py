"""`opendino eval depth`: linear monocular depth on frozen tokens ("lin. 1" / "lin. 4", paper §7.4 and Table 11),
following the official depth code (`dinov2/eval/depth`, `dinov2/hub/depthers.py`; facts: dense_eval_facts.md §2).

Features: `get_intermediate_layers(blocks, reshape=True, return_class_token=True, norm=False)` of the centre-padded
image; the last block (n_layers 1) or 4 evenly spaced blocks (2, 5, 8, 11 of 12). Head (`LinearDepthHead`, the
official BNHead, which has no BatchNorm): per block the CLS token broadcast after the patch channels, every map
bilinearly resized to 4x the token grid, concatenated, a 1x1 conv to 256 logits; ReLU + 0.1 normalised over the bins,
depth = sum_k p_k bin_k, bins = linspace(min_depth, max_depth, 256). Loss (`sigloss`) on the prediction bilinearly
resized to the depth map: pixels gt > 0, g = ln(pred + 1e-3) - ln(gt + 1e-3), sqrt(Var(g) + 0.15 mean(g)^2) with the
unbiased variance, and sqrt(0.15 mean(g)^2) for the first 100 steps. Inference: whole image, clamp to [min, max],
bilinear resize to the depth map, average with the flipped-back prediction of the mirrored image.

Ours (see docs/evaluation/depth.md): the 1x1 conv runs before the resize (both linear, bilinear weights sum to 1: the
same logits for 16x fewer conv FLOPs); the padded border is cropped before resizing to the depth map (the official
resizes the padded output, a shift of up to half a patch); bins span [min_depth, max_depth] (the official linear
factory hard-codes 0.001-80 m); AdamW with linear warm-up then cosine, gradient norm clipped at 35 (the official linear
schedule is not published). `train_mode="cached"` (default) computes the tokens of every whole training image and of
its mirror once and trains on those; "online" runs the backbone on augmented crops every step (the official recipe).
The trained head is written to `head.safetensors` with its description (blocks, bins, depth range, input size,
backbone) in the file's metadata; `opendino viz depth` reads it back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from opendino import dist
from opendino.eval.common import markdown_table, setup
from opendino.eval.dense import center_pad, depth_block_indices, token_maps
from opendino.eval.depth_data import (
    METRICS,
    READ_ERRORS,
    DepthPrediction,
    crop_loader,
    depth_metrics,
    eval_mask,
    list_depth_pairs,
    load_pair,
    mean_metrics,
    normalize,
    read_depth,
    save_depth_grid,
)
from opendino.eval.features import autocast_for
from opendino.eval.seg import save_head

__all__ = [
    "LinearDepthHead",
    "TokenSample",
    "cache_token_samples",
    "depth_tokens",
    "evaluate_depth",
    "lr_at",
    "predict_depth",
    "resize_prediction",
    "run",
    "sigloss",
    "train_depth_head",
]

GRAD_CLIP = 35.0  # L2 gradient-norm clip of the official depth configs (derived copy, facts §2.6)


class LinearDepthHead(nn.Module):
    """The official linear depth head: (patch map, CLS) of `n_layers` blocks -> depth (B, 1, 4h, 4w) in metres.

    `conv_depth` has the official layout: (n_bins, 2 * D * n_layers, 1, 1), channels ordered block by block as
    [patch D, CLS D]. PyTorch's default conv initialisation (the official head sets none).
    """

    bins: Tensor  # (n_bins,) bin centres in metres

    def __init__(
        self,
        embed_dim: int,
        n_layers: int = 1,
        *,
        n_bins: int = 256,
        min_depth: float = 0.001,
        max_depth: float = 10.0,
        upsample: int = 4,
    ) -> None:
        super().__init__()
        if not 0 < min_depth < max_depth:
            raise ValueError(f"depth range ({min_depth}, {max_depth}): expected 0 < min_depth < max_depth")
        self.embed_dim, self.n_layers, self.upsample = embed_dim, n_layers, upsample
        self.min_depth, self.max_depth = min_depth, max_depth
        self.conv_depth = nn.Conv2d(2 * embed_dim * n_layers, n_bins, kernel_size=1)
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins), persistent=False)

    def logits(self, maps: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """(B, n_bins, 4h, 4w) bin logits of [(patch (B, D, h, w), CLS (B, D))] of the blocks."""
        if len(maps) != self.n_layers:
            raise ValueError(f"the head takes {self.n_layers} blocks, got {len(maps)}")
        h, w = maps[0][0].shape[-2:]
        weight = self.conv_depth.weight[:, :, 0, 0]  # (K, 2 D L)
        d = self.embed_dim
        bias = self.conv_depth.bias
        assert bias is not None
        out = bias[None, :, None, None]
        for i, (patch, cls) in enumerate(maps):
            if patch.shape[1] != d or patch.shape[-2:] != (h, w):
                raise ValueError(f"block {i}: map {tuple(patch.shape)}, expected (B, {d}, {h}, {w})")
            w_patch, w_cls = weight[:, 2 * d * i : 2 * d * i + d], weight[:, 2 * d * i + d : 2 * d * (i + 1)]
            out = out + torch.einsum("kd,bdhw->bkhw", w_patch, patch) + (cls @ w_cls.T)[:, :, None, None]
        size = (h * self.upsample, w * self.upsample)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)  # (B, K, 4h, 4w)

    def forward(self, maps: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        # sum_k p_k bin_k with p_k = (relu(l_k) + 0.1) / sum_j (relu(l_j) + 0.1), without materialising p
        r = torch.relu(self.logits(maps))  # (B, K, 4h, 4w)
        num = torch.einsum("bkhw,k->bhw", r, self.bins) + 0.1 * self.bins.sum()
        return (num / (r.sum(dim=1) + 0.1 * len(self.bins)))[:, None]  # (B, 1, 4h, 4w)


def sigloss(pred: Tensor, gt: Tensor, *, warm_up: bool = False, lam: float = 0.15, eps: float = 1e-3) -> Tensor:
    """Scale-invariant log loss over the pixels with gt > 0 (all images pooled): g = ln(pred + eps) - ln(gt + eps),
    sqrt(Var(g) + lam mean(g)^2) (unbiased variance), or sqrt(lam mean(g)^2) in the warm-up steps."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    valid = gt > 0
    g = torch.log(pred[valid] + eps) - torch.log(gt[valid] + eps)
    if warm_up:
        return torch.sqrt(lam * g.mean() ** 2)
    return torch.sqrt(g.var() + lam * g.mean() ** 2)


def lr_at(step: int, *, lr: float, iterations: int, warmup: int) -> float:
    """Linear warm-up from lr / 1000 over `warmup` steps, then cosine to 0 at `iterations`."""
    if step < warmup:
        return lr * (1e-3 + (1 - 1e-3) * step / warmup)
    progress = (step - warmup) / max(iterations - warmup, 1)
    return lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ------------------------------------------------------------------------------------------------ tokens and pixels
@torch.no_grad()
def depth_tokens(
    model: nn.Module, images: Tensor, blocks: Sequence[int], *, amp: str = "bf16"
) -> tuple[list[tuple[Tensor, Tensor]], tuple[int, int, int, int]]:
    """Float32 [(patch map (B, D, h, w), CLS (B, D))] of `blocks` (no final norm) for normalised `images`
    (B, 3, H, W) centre-padded to the patch grid, and the padding (left, right, top, bottom)."""
    device = next(model.parameters()).device
    images = images.to(device)
    with autocast_for(device, amp):
        maps = token_maps(model, images, blocks, norm=False, class_token=True)
    pads = center_pad(images[:1, :1], int(model.patch_size))[1]  # type: ignore[arg-type]
    return [(p.float(), c.float()) for p, c in maps], pads  # type: ignore[union-attr]


def resize_prediction(depth: Tensor, padded: Sequence[int], pads: Sequence[int], size: Sequence[int]) -> Tensor:
    """(B, 1, 4h, 4w) head output -> (B, 1, *size): bilinear to the `padded` (H, W) input, the `pads` (left, right,
    top, bottom) cropped off, then bilinear to `size` if the input had another size."""
    (ph, pw), (left, right, top, bottom) = padded, pads
    depth = F.interpolate(depth, size=(ph, pw), mode="bilinear", align_corners=False)
    depth = depth[..., top : ph - bottom, left : pw - right]
    if tuple(depth.shape[-2:]) != tuple(size):
        depth = F.interpolate(depth, size=tuple(size), mode="bilinear", align_corners=False)
    return depth


@dataclass
class TokenSample:
    """Frozen tokens of one training input with the depth (H, W) at its pixel size and its padding."""

    maps: list[tuple[Tensor, Tensor]]  # [(patch (1, D, h, w), CLS (1, D))]
    pads: tuple[int, int, int, int]  # (left, right, top, bottom) added to reach the patch grid
    depth: Tensor

    def padded_size(self, patch_size: int) -> tuple[int, int]:
        h, w = self.maps[0][0].shape[-2:]
        return h * patch_size, w * patch_size


def cache_token_samples(
    model: nn.Module,
    pairs: Sequence[tuple[str, str]],
    blocks: Sequence[int],
    *,
    depth_scale: float,
    image_size: int = 0,
    amp: str = "bf16",
) -> tuple[list[TokenSample], list[tuple[str, str]]]:
    """Tokens of every whole image and of its mirror (2 samples per pair, CPU) and the (path, reason) of bad pairs."""
    samples: list[TokenSample] = []
    bad: list[tuple[str, str]] = []
    for image_path, depth_path in tqdm(pairs, desc="depth tokens", unit="img", dynamic_ncols=True, disable=None):
        try:
            image, depth, _ = load_pair(image_path, depth_path, depth_scale=depth_scale, image_size=image_size)
        except READ_ERRORS as e:
            bad.append((image_path, getattr(e, "reason", str(e))))
            continue
        image = normalize(image)
        maps, pads = depth_tokens(model, torch.stack([image, image.flip(-1)]), blocks, amp=amp)
        for k, d in enumerate((depth, depth.flip(-1))):
            samples.append(TokenSample([(p[k : k + 1].cpu(), c[k : k + 1].cpu()) for p, c in maps], pads, d))
    return samples, bad


def _cached_batches(samples: Sequence[TokenSample], batch_size: int, seed: int) -> Iterator[list[TokenSample]]:
    g = torch.Generator().manual_seed(seed)
    while True:
        yield [samples[i] for i in torch.randint(len(samples), (batch_size,), generator=g).tolist()]


def _online_batches(
    model: nn.Module, loader: DataLoader, blocks: Sequence[int], amp: str, bad: list[tuple[str, str]]
) -> Iterator[list[TokenSample]]:
    for images, depths, bad_now in loader:
        bad += [b for b in bad_now if b not in bad]
        if images is None:
            continue
        maps, pads = depth_tokens(model, images, blocks, amp=amp)
        yield [
            TokenSample([(p[k : k + 1], c[k : k + 1]) for p, c in maps], pads, depths[k]) for k in range(len(depths))
        ]


# ------------------------------------------------------------------------------------------------ training, inference
def _batch_loss(head: LinearDepthHead, batch: Sequence[TokenSample], patch_size: int, warm_up: bool) -> Tensor:
    """SigLoss pooled over the valid pixels of all samples (the official loss pools the batch)."""
    device = head.bins.device
    preds, gts = [], []
    for s in batch:
        depth = head([(p.to(device), c.to(device)) for p, c in s.maps])
        preds.append(resize_prediction(depth, s.padded_size(patch_size), s.pads, s.depth.shape).flatten())
        gts.append(s.depth.to(device).flatten())
    return sigloss(torch.cat(preds), torch.cat(gts), warm_up=warm_up)


def _next_valid(batches: Iterator[list[TokenSample]], tries: int = 100) -> list[TokenSample]:
    """The next batch with at least 2 valid depth pixels (SigLoss's variance needs them)."""
    for _ in range(tries):
        batch = next(batches)
        if sum(int((s.depth > 0).sum()) for s in batch) >= 2:
            return batch
    raise ValueError(f"{tries} training batches in a row without valid depth (gt > 0): check depth_scale and the maps")


def train_depth_head(
    head: LinearDepthHead,
    batches: Iterator[list[TokenSample]],
    *,
    patch_size: int,
    iterations: int,
    lr: float = 5e-3,
    weight_decay: float = 0.01,
    warmup_iterations: int = 100,
    loss_warmup_iterations: int = 100,
) -> list[float]:
    """Train `head` in place on `iterations` batches with AdamW; returns the loss of every step."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    head.train()
    bar = tqdm(range(iterations), desc="depth head", unit="step", dynamic_ncols=True, disable=None)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=lr, iterations=iterations, warmup=warmup_iterations)
        loss = _batch_loss(head, _next_valid(batches), patch_size, warm_up=step < loss_warmup_iterations)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(head.parameters(), GRAD_CLIP)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == iterations - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    head.eval()
    return losses


@torch.no_grad()
def predict_depth(
    model: nn.Module,
    head: LinearDepthHead,
    image: Tensor,
    blocks: Sequence[int],
    size: Sequence[int],
    *,
    flip_tta: bool = True,
    amp: str = "bf16",
) -> Tensor:
    """(H, W) depth of one normalised image (3, h, w) at `size` = (H, W): clamped, resized, flip-averaged."""
    batch = torch.stack([image, image.flip(-1)]) if flip_tta else image[None]
    maps, pads = depth_tokens(model, batch, blocks, amp=amp)
    depth = head([(p.to(head.bins.device), c.to(head.bins.device)) for p, c in maps])
    depth = depth.clamp(head.min_depth, head.max_depth)
    padded = tuple(n * int(model.patch_size) for n in maps[0][0].shape[-2:])  # type: ignore[arg-type]
    depth = resize_prediction(depth, padded, pads, size)[:, 0]
    return ((depth[0] + depth[1].flip(-1)) / 2 if flip_tta else depth[0]).cpu()


def evaluate_depth(
    model: nn.Module,
    head: LinearDepthHead,
    pairs: Sequence[tuple[str, str]],
    blocks: Sequence[int],
    *,
    depth_scale: float,
    image_size: int = 0,
    crop: str = "none",
    flip_tta: bool = True,
    amp: str = "bf16",
    keep: int = 0,
) -> tuple[list[dict[str, Any]], list[DepthPrediction], list[tuple[str, str]]]:
    """Per-image metrics ({"image", **metrics}), the first `keep` predictions and the (path, reason) of bad pairs."""
    rows: list[dict[str, Any]] = []
    kept: list[DepthPrediction] = []
    bad: list[tuple[str, str]] = []
    for image_path, depth_path in tqdm(pairs, desc="depth eval", unit="img", dynamic_ncols=True, disable=None):
        try:
            image, _, gt = load_pair(image_path, depth_path, depth_scale=depth_scale, image_size=image_size)
        except READ_ERRORS as e:
            bad.append((image_path, getattr(e, "reason", str(e))))
            continue
        pred = predict_depth(model, head, normalize(image), blocks, gt.shape, flip_tta=flip_tta, amp=amp)
        mask = eval_mask(gt, min_depth=head.min_depth, max_depth=head.max_depth, crop=crop)
        rows.append({"image": Path(image_path).stem, **depth_metrics(pred, gt, mask)})
        if len(kept) < keep:
            kept.append(DepthPrediction(image_path, image, gt, pred, mask))
    return rows, kept, bad


# ------------------------------------------------------------------------------------------------------------- run
def _mean_depth(pairs: Sequence[tuple[str, str]], *, depth_scale: float, min_depth: float, max_depth: float) -> float:
    """Mean of the evaluated depths over all pixels of the maps (the trivial predictor's constant)."""
    total, count = 0.0, 0
    for _, depth_path in pairs:
        d = torch.from_numpy(read_depth(depth_path, depth_scale))
        m = eval_mask(d, min_depth=min_depth, max_depth=max_depth)
        total, count = total + float(d[m].double().sum()), count + int(m.sum())
    if count == 0:
        raise ValueError(f"no depth within ({min_depth}, {max_depth}) m in the {len(pairs)} training depth maps")
    return total / count


def _train(ctx, cfg, head: LinearDepthHead, blocks: list[int], pairs: list[tuple[str, str]]):
    """Train the head as cfg.train_mode says: (losses, bad training pairs, seconds for tokens, seconds training)."""
    load = dict(depth_scale=cfg.depth_scale, image_size=cfg.image_size)
    started = time.perf_counter()
    bad: list[tuple[str, str]] = []
    if cfg.train_mode == "cached":
        samples, bad = cache_token_samples(ctx.model, pairs, blocks, amp=cfg.amp, **load)
        if not samples:
            raise ValueError(f"{cfg.train}: no readable training pairs ({len(bad)} bad)")
        batches = _cached_batches(samples, cfg.train_batch_size, cfg.seed)
    else:
        if cfg.crop_size % ctx.patch_size:
            raise ValueError(f"crop_size={cfg.crop_size}: must be a multiple of the patch size {ctx.patch_size}")
        loader = crop_loader(pairs, crop_size=cfg.crop_size, batch_size=cfg.train_batch_size, seed=cfg.seed,
                             num_workers=cfg.num_workers, **load)  # fmt: skip
        batches = _online_batches(ctx.model, loader, blocks, cfg.amp, bad)  # fills `bad` as it goes
    token_seconds = time.perf_counter() - started
    losses = train_depth_head(head, batches, patch_size=ctx.patch_size, iterations=cfg.iterations, lr=cfg.lr,
                              weight_decay=cfg.weight_decay, warmup_iterations=cfg.warmup_iterations,
                              loss_warmup_iterations=cfg.loss_warmup_iterations)  # fmt: skip
    return losses, bad, token_seconds, time.perf_counter() - started - token_seconds


def run(cfg) -> dict[str, Any]:
    """`opendino eval depth`: train the linear depth head on `cfg.train`, report the metrics on `cfg.val`."""
    ctx = setup("depth", cfg)
    blocks = depth_block_indices(int(ctx.model.n_blocks), cfg.n_layers)  # type: ignore[arg-type]
    train_pairs, val_pairs = list_depth_pairs(cfg.train), list_depth_pairs(cfg.val)
    torch.manual_seed(cfg.seed)
    head = LinearDepthHead(ctx.embed_dim, cfg.n_layers, n_bins=cfg.n_bins, min_depth=cfg.min_depth,
                           max_depth=cfg.max_depth).to(ctx.device)  # fmt: skip
    losses, bad, token_seconds, train_seconds = _train(ctx, cfg, head, blocks, train_pairs)
    rows, kept, val_bad = evaluate_depth(ctx.model, head, val_pairs, blocks, depth_scale=cfg.depth_scale,
                                         image_size=cfg.image_size, crop=cfg.eval_crop, flip_tta=cfg.flip_tta,
                                         amp=cfg.amp, keep=cfg.pictures)  # fmt: skip
    if not rows:
        raise ValueError(f"{cfg.val}: no readable validation pairs ({len(val_bad)} bad)")
    metrics = mean_metrics(rows)

    # the trivial predictor for context: the mean training depth everywhere
    bad_paths = {path for path, _ in bad + val_bad}
    range_ = dict(min_depth=cfg.min_depth, max_depth=cfg.max_depth)
    mean_depth = _mean_depth([p for p in train_pairs if p[0] not in bad_paths], depth_scale=cfg.depth_scale, **range_)
    baseline_rows = []
    for image_path, depth_path in val_pairs:
        if image_path not in bad_paths:
            gt = torch.from_numpy(read_depth(depth_path, cfg.depth_scale))
            mask = eval_mask(gt, crop=cfg.eval_crop, **range_)
            baseline_rows.append(depth_metrics(torch.full_like(gt, mean_depth), gt, mask))
    baseline = mean_metrics(baseline_rows)

    if kept and dist.is_main():
        save_depth_grid(
            kept, [r["image"] for r in rows], [r["rmse"] for r in rows], ctx.picture_path("predictions.png")
        )
    if dist.is_main():
        # read back by `opendino viz depth` (opendino.viz.heads); `save_head` writes it atomically
        head_meta = {"task": "depth", "blocks": blocks, "n_layers": cfg.n_layers, "embed_dim": ctx.embed_dim,
                     "n_bins": cfg.n_bins, "min_depth": cfg.min_depth, "max_depth": cfg.max_depth,
                     "image_size": cfg.image_size, "flip_tta": cfg.flip_tta, "patch_size": ctx.patch_size,
                     "backbone": cfg.backbone, "backbone_identity": ctx.identity}  # fmt: skip
        save_head(head, head_meta, ctx.out / "head.safetensors")
    names = list(METRICS)
    headers = [f"{n} {'↑' if up else '↓'}" for n, up in METRICS.items()]
    summary = [["linear head", *(metrics[n] for n in names)],
               [f"mean training depth ({mean_depth:.3f} m)", *(baseline[n] for n in names)]]  # fmt: skip
    tables = [markdown_table(["predictor", *headers], summary),
              markdown_table(["image", *headers], [[r["image"], *(r[n] for n in names)] for r in rows])]  # fmt: skip
    dataset = {"train": cfg.train, "val": cfg.val, "train_pairs": len(train_pairs) - len(bad),
               "val_pairs": len(rows), "blocks": blocks, "train_mode": cfg.train_mode,
               "depth": f"stored value / {cfg.depth_scale} = metres; evaluated on ({cfg.min_depth}, {cfg.max_depth}) m,"
                        f" crop {cfg.eval_crop}", "device": str(ctx.device)}  # fmt: skip
    extra = {"per_image": rows, "baseline_mean_depth": mean_depth, "baseline": baseline,
             "loss": losses[:: max(1, len(losses) // 200)], "final_loss": losses[-1],
             "token_seconds": round(token_seconds, 2), "train_seconds": round(train_seconds, 2)}  # fmt: skip
    return ctx.write_results(dataset=dataset, metrics=metrics, tables=tables, extra=extra, bad_images=bad + val_bad)
