"""The data side of the linear depth evaluation: RGB + depth-map pairs, training augmentation, evaluation masks,
the per-image depth metrics and the pictures.

A dataset is a folder with `rgb/<stem>.<image ext>` and `depth/<stem>.png|.npy`. Depth maps are 16-bit (or 8-bit)
single-channel PNGs or 2-D `.npy` arrays; depth in metres = stored value / `depth_scale`, and 0 or a non-finite value
means "no measurement". A depth map must have the size of its image.

Augmentation follows the NYU pipeline of the depth toolbox DINOv2's depth code derives from (dense_eval_facts §2.5):
random crop, horizontal flip with p = 0.5, and with p = 0.5 a colour change (gamma 0.9-1.1, brightness 0.75-1.25, a
factor 0.9-1.1 per channel); the ±2.5° rotation is left out. An image smaller than the crop is padded with zeros
(after normalisation: the mean colour) and its depth with 0 (invalid), as the toolbox pads.

Metrics are the toolbox's (`depth/core/evaluation/metrics.py`), computed per image on the evaluated pixels
(min_depth < gt < max_depth, strict, and the optional Eigen / Garg crop) and then averaged over images (nanmean).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from opendino.data.augment import IMAGENET_MEAN, IMAGENET_STD
from opendino.data.sources import BadImageError, load_image
from opendino.eval.dense import list_pairs

__all__ = [
    "DEPTH_SUFFIXES",
    "EVAL_CROPS",
    "METRICS",
    "READ_ERRORS",
    "DepthPrediction",
    "augment_pair",
    "colorize_depth",
    "crop_loader",
    "depth_metrics",
    "eval_mask",
    "list_depth_pairs",
    "load_pair",
    "mean_metrics",
    "normalize",
    "read_depth",
    "save_depth_grid",
    "save_depth_png",
]

DEPTH_SUFFIXES = (".png", ".npy")
READ_ERRORS = (BadImageError, OSError, ValueError)  # unreadable image, unreadable or mismatched depth map
EVAL_CROPS = ("none", "nyu", "kitti_garg")
# metric name -> higher is better, in the toolbox's order
METRICS: dict[str, bool] = {"delta1": True, "delta2": True, "delta3": True, "abs_rel": False, "sq_rel": False,
                            "rmse": False, "rmse_log": False, "log10": False, "silog": False}  # fmt: skip


# ------------------------------------------------------------------------------------------------------- reading
def list_depth_pairs(folder: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """[(image, depth map)] of `folder/rgb/<stem>.<ext>` and `folder/depth/<stem>.png|.npy`, sorted by stem."""
    return list_pairs(folder, "rgb", "depth", DEPTH_SUFFIXES)


def read_depth(path: str | os.PathLike[str], depth_scale: float) -> np.ndarray:
    """(H, W) float32 depth in metres = stored value / depth_scale; 0 where there is no (finite, positive) value."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        raw = np.load(path, allow_pickle=False)
        if raw.ndim == 3 and raw.shape[-1] == 1:
            raw = raw[..., 0]
    else:
        with Image.open(path) as img:
            if img.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F", "L"):
                raise ValueError(
                    f"{path}: depth PNG of mode {img.mode}; expected one channel (16-bit, 32-bit or 8-bit)"
                )
            raw = np.asarray(img)
    if raw.ndim != 2 or not (np.issubdtype(raw.dtype, np.number) and not np.iscomplexobj(raw)):
        raise ValueError(f"{path}: depth map of shape {raw.shape} and dtype {raw.dtype}; expected a 2-D real array")
    depth = raw.astype(np.float64) / depth_scale
    depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    return depth.astype(np.float32)


def save_depth_png(path: str | os.PathLike[str], depth: np.ndarray, depth_scale: float = 1000.0) -> None:
    """Write metres as a uint16 PNG of round(depth * depth_scale) (0 = invalid); values must fit in 16 bits."""
    stored = np.round(np.nan_to_num(np.asarray(depth, dtype=np.float64), nan=0.0) * depth_scale)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError(f"depth * {depth_scale} spans [{stored.min()}, {stored.max()}]: does not fit in uint16")
    Image.fromarray(stored.astype(np.uint16)).save(os.fspath(path))


def load_pair(
    image_path: str, depth_path: str, *, depth_scale: float, image_size: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """(image (3, h, w) in [0, 1], depth at the image's size (h, w), depth at its own size (H, W)), in metres.

    `image_size` > 0 resizes the image (bicubic) so that its shorter side has that many pixels, and the first depth
    map with it (nearest, for training); the last one stays native (for the metrics). Unreadable files raise
    `BadImageError` (image) or ValueError / OSError (depth map).
    """
    rgb = load_image(image_path)
    depth = torch.from_numpy(read_depth(depth_path, depth_scale))
    if tuple(depth.shape) != (rgb.height, rgb.width):
        raise ValueError(f"{depth_path}: depth map {tuple(depth.shape)} but image {(rgb.height, rgb.width)} (H, W)")
    image = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    if image_size <= 0 or min(image.shape[1:]) == image_size:
        return image, depth, depth
    scale = image_size / min(image.shape[1:])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale)))
    small = F.interpolate(image[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
    small_depth = F.interpolate(depth[None, None], size=size, mode="nearest-exact")[0, 0]
    return small, small_depth, depth


def normalize(image: Tensor) -> Tensor:
    """(..., 3, H, W) in [0, 1] -> ImageNet-normalised (the official depth notebook's mean / std)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - mean) / std


# ---------------------------------------------------------------------------------------------------- augmentation
def _uniform(lo: float, hi: float, g: torch.Generator, n: int = 1) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment_pair(image: Tensor, depth: Tensor, crop_size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """With p 0.5 gamma / brightness / per-channel colour factors, then a random `crop_size` square crop (zero
    padding at the bottom / right first if the image is smaller) and a horizontal flip (p 0.5).

    `image` (3, h, w) in [0, 1], `depth` (h, w); returns the normalised crop (3, c, c) and its depth (c, c).
    """
    if float(torch.rand(1, generator=g)) < 0.5:
        gamma, brightness, colour = _uniform(0.9, 1.1, g), _uniform(0.75, 1.25, g), _uniform(0.9, 1.1, g, 3)
        image = (image**gamma * brightness * colour.view(3, 1, 1)).clamp(0, 1)
    image = normalize(image)
    h, w = image.shape[1:]
    ph, pw = max(crop_size - h, 0), max(crop_size - w, 0)
    if ph or pw:
        image, depth = F.pad(image, (0, pw, 0, ph)), F.pad(depth, (0, pw, 0, ph))
        h, w = image.shape[1:]
    top = int(torch.randint(h - crop_size + 1, (1,), generator=g))
    left = int(torch.randint(w - crop_size + 1, (1,), generator=g))
    image = image[:, top : top + crop_size, left : left + crop_size]
    depth = depth[top : top + crop_size, left : left + crop_size]
    if float(torch.rand(1, generator=g)) < 0.5:
        image, depth = image.flip(-1), depth.flip(-1)
    return image.contiguous(), depth.contiguous()


class _Crops(Dataset):
    """Item (pair index, seed) -> (normalised crop, depth), or (None, (path, reason)) for an unreadable pair."""

    def __init__(self, pairs: Sequence[tuple[str, str]], *, depth_scale: float, image_size: int, crop: int) -> None:
        self.pairs, self.depth_scale, self.size, self.crop = list(pairs), depth_scale, image_size, crop

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, Tensor] | tuple[None, tuple[str, str]]:
        index, seed = item
        image_path, depth_path = self.pairs[index]
        try:
            image, depth, _ = load_pair(image_path, depth_path, depth_scale=self.depth_scale, image_size=self.size)
        except READ_ERRORS as e:
            return None, (image_path, getattr(e, "reason", str(e)))
        return augment_pair(image, depth, self.crop, torch.Generator().manual_seed(seed))


class _Draws:
    """Endless seeded (pair index, augmentation seed) draws: the same crops whatever the number of workers."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield int(torch.randint(self.n, (1,), generator=g)), int(torch.randint(2**62, (1,), generator=g))


def _collate(items: list) -> tuple[Tensor | None, Tensor | None, list[tuple[str, str]]]:
    good = [it for it in items if it[0] is not None]
    bad = [it[1] for it in items if it[0] is None]
    if not good:
        return None, None, bad
    return torch.stack([i for i, _ in good]), torch.stack([d for _, d in good]), bad


def crop_loader(
    pairs: Sequence[tuple[str, str]],
    *,
    depth_scale: float,
    image_size: int,
    crop_size: int,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
) -> DataLoader:
    """Endless batches (crops (B, 3, c, c), depths (B, c, c), [(path, reason) of unreadable pairs]) of `augment_pair`
    crops of random pairs; crops and depths are None when every pair of the batch was unreadable."""
    dataset = _Crops(pairs, depth_scale=depth_scale, image_size=image_size, crop=crop_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=_Draws(len(pairs), seed),  # type: ignore[arg-type]
                      num_workers=num_workers, collate_fn=_collate)  # fmt: skip


# --------------------------------------------------------------------------------------------------------- metrics
def eval_mask(gt: Tensor, *, min_depth: float, max_depth: float, crop: str = "none") -> Tensor:
    """Pixels that count: min_depth < gt < max_depth (strict, as the toolbox), within the evaluation crop.

    crop "nyu": rows 45:471, cols 41:601 of a 480 x 640 map (the toolbox's eigen_crop for NYU); "kitti_garg": rows
    0.40810811 H .. 0.99189189 H, cols 0.03594771 W .. 0.96405229 W (Garg et al.); "none": all pixels.
    """
    valid = (gt > min_depth) & (gt < max_depth)
    if crop == "none":
        return valid
    h, w = gt.shape[-2:]
    region = torch.zeros_like(valid)
    if crop == "nyu":
        if (h, w) != (480, 640):
            raise ValueError(f"eval_crop='nyu' is defined on 480 x 640 depth maps, got {h} x {w}")
        region[..., 45:471, 41:601] = True
    elif crop == "kitti_garg":
        region[..., int(0.40810811 * h) : int(0.99189189 * h), int(0.03594771 * w) : int(0.96405229 * w)] = True
    else:
        raise ValueError(f"crop={crop!r}: expected one of {list(EVAL_CROPS)}")
    return valid & region


def depth_metrics(pred: Tensor | np.ndarray, gt: Tensor | np.ndarray, mask: Tensor | np.ndarray) -> dict[str, float]:
    """The toolbox's metrics of one image over `mask` (pred must be > 0 there); NaN for all if mask is empty.

    thr = max(gt / pred, pred / gt); delta_k = mean(thr < 1.25^k); abs_rel = mean |gt - pred| / gt; sq_rel =
    mean (gt - pred)^2 / gt; rmse = sqrt mean (gt - pred)^2; rmse_log = sqrt mean (ln gt - ln pred)^2; log10 =
    mean |log10 gt - log10 pred|; silog = 100 sqrt(mean e^2 - (mean e)^2), e = ln pred - ln gt.
    """
    m = np.asarray(mask, dtype=bool)
    p = np.asarray(pred, dtype=np.float64)[m]
    t = np.asarray(gt, dtype=np.float64)[m]
    if p.size == 0:
        return dict.fromkeys(METRICS, math.nan)
    if (p <= 0).any():
        raise ValueError("predicted depth must be positive on the evaluated pixels (clamp it to min_depth)")
    thr = np.maximum(t / p, p / t)
    e = np.log(p) - np.log(t)
    return {
        "delta1": float((thr < 1.25).mean()),
        "delta2": float((thr < 1.25**2).mean()),
        "delta3": float((thr < 1.25**3).mean()),
        "abs_rel": float((np.abs(t - p) / t).mean()),
        "sq_rel": float(((t - p) ** 2 / t).mean()),
        "rmse": float(np.sqrt(((t - p) ** 2).mean())),
        "rmse_log": float(np.sqrt((e**2).mean())),
        "log10": float(np.abs(np.log10(t) - np.log10(p)).mean()),
        "silog": float(100 * np.sqrt(max((e**2).mean() - e.mean() ** 2, 0.0))),
    }


def mean_metrics(per_image: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average over images of each metric, ignoring NaN (images with no evaluated pixel)."""
    out = {}
    for name in METRICS:
        values = np.array([m[name] for m in per_image], dtype=np.float64)
        out[name] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    return out


# --------------------------------------------------------------------------------------------------------- pictures
def colorize_depth(
    depth: Tensor | np.ndarray, valid: Tensor | np.ndarray, vmin: float, vmax: float, cmap: str = "magma_r"
) -> np.ndarray:
    """(H, W) -> (H, W, 3) in [0, 1]: `cmap` over [vmin, vmax], invalid pixels grey."""
    import matplotlib

    d = np.asarray(depth, dtype=np.float64)
    scaled = np.clip((d - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    rgb = matplotlib.colormaps[cmap](scaled)[..., :3]
    rgb[~np.asarray(valid, dtype=bool)] = 0.5
    return rgb


@dataclass
class DepthPrediction:
    """One validation image, its depth map, the prediction at the map's size and the evaluated pixels."""

    path: str
    image: Tensor  # (3, h, w) in [0, 1]
    gt: Tensor  # (H, W) metres
    pred: Tensor  # (H, W) metres
    mask: Tensor  # (H, W) bool


def save_depth_grid(
    predictions: Sequence[DepthPrediction], names: Sequence[str], rmse: Sequence[float], path: str | os.PathLike[str]
) -> Path:
    """Rows of image | ground truth | prediction | |error| / gt; both depths coloured over the row's valid ground-truth
    range, invalid pixels grey, the relative error over 0-0.5."""
    from opendino.eval.pictures import save_image_grid

    grid, titles = [], []
    for p, name, r in zip(predictions, names, rmse, strict=False):
        valid = p.mask.numpy()
        lo, hi = (float(p.gt[p.mask].min()), float(p.gt[p.mask].max())) if valid.any() else (0.0, 1.0)
        rel = (p.pred - p.gt).abs() / p.gt.clamp(min=1e-6)
        image = F.interpolate(p.image[None], size=tuple(p.gt.shape), mode="bilinear", align_corners=False)[0]
        grid.append([image.clamp(0, 1).permute(1, 2, 0).numpy(), colorize_depth(p.gt, valid, lo, hi),
                     colorize_depth(p.pred, np.ones_like(valid), lo, hi),
                     colorize_depth(rel, valid, 0.0, 0.5, cmap="inferno")])  # fmt: skip
        titles.append(f"{name}\n{lo:.1f}-{hi:.1f} m\nRMSE {r:.3f}")
    return save_image_grid(grid, path, row_titles=titles,
                           column_titles=["image", "ground truth", "prediction", "|error| / gt (0-0.5)"])  # fmt: skip
