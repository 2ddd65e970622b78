"""The data side of the linear segmentation evaluation: paired image / label-PNG folders, label decoding, the
official-like training augmentation, an endless seeded training stream, the dataset-wide metrics and a colour palette.

A dataset is a folder with `images/` and `labels/` whose files share their stems; a label PNG holds one class index
per pixel (mode L, P (palette indices, as Pascal VOC stores them), I or I;16). Other layouts map onto it without
copying files: other sub-folder names (`images_dir`, `labels_dir`), a list file of stems (VOC's
ImageSets/Segmentation/*.txt), and `reduce_zero_label` (ADE20K: 0 -> ignore, the others shifted down by one, as
mmseg's LoadAnnotations does).

The augmentation follows the mmseg-0.x training pipeline of the configs derived from DINOv2's
(dense_eval_facts.md §1.4): Resize (shorter side = base x a ratio drawn in `ratio_range`, longer side at most 4 x that,
keep ratio) -> RandomCrop with `cat_max_ratio` (up to 10 tries) -> RandomFlip 0.5 -> PhotoMetricDistortion ->
Normalize -> Pad to the crop (image 0, label ignore). Images are resized bilinearly, labels by nearest neighbour.
PhotoMetricDistortion is mmseg's (brightness ±32, contrast 0.5-1.5 before or after the colour steps, saturation
0.5-1.5, hue ±18 of OpenCV's 180, each with probability 0.5), except that saturation and hue use torchvision's
functions (a blend with grey, a hue rotation) on RGB rather than OpenCV's HSV arithmetic. Each sample draws from its
own generator seeded by (seed, sample number), so the stream is the same whatever the number of workers.

Metrics follow mmseg's total-area rule (dense_eval_facts.md §1.5): one confusion matrix summed over the dataset,
IoU = intersection / union per class, mIoU = mean over the classes whose union is not empty.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from opendino.data.augment import IMAGENET_MEAN, IMAGENET_STD
from opendino.data.sources import BadImageError, load_image
from opendino.eval.dense import files_by_stem, list_pairs
from opendino.eval.metrics import confusion_matrix

__all__ = [
    "LABEL_MODES",
    "SegAugment",
    "SegPairs",
    "SegTrainStream",
    "cached_size",
    "colorize",
    "infer_num_classes",
    "list_seg_pairs",
    "load_label",
    "load_pair",
    "normalize",
    "palette",
    "photometric_distortion",
    "reduce_zero_label",
    "rescale_size",
    "resize_label",
    "seg_confusion",
    "seg_metrics",
]

LABEL_MODES = ("L", "P", "I", "I;16")  # PIL modes whose pixel values are class indices


def list_seg_pairs(
    folder: str | os.PathLike[str],
    images_dir: str = "images",
    labels_dir: str = "labels",
    list_file: str | os.PathLike[str] = "",
) -> list[tuple[str, str]]:
    """[(image, label PNG)] of `folder/images_dir` and `folder/labels_dir`, sorted by stem.

    Without `list_file` every image needs its label and every label its image. With it (one stem per line; a path
    that does not exist as given is taken relative to `folder`) only the listed stems are paired, and each must have
    both files; the folders may hold others (VOC's JPEGImages holds all 17k images).
    """
    if not list_file:
        return list_pairs(folder, images_dir, labels_dir, (".png",))
    root = Path(folder)
    listing = Path(list_file) if Path(list_file).is_file() else root / list_file
    if not listing.is_file():
        raise ValueError(f"list file {list_file} not found (also not under {folder})")
    stems = [s for s in (line.strip() for line in listing.read_text().splitlines()) if s and not s.startswith("#")]
    if not stems:
        raise ValueError(f"{listing}: no file stems listed")
    images, labels = files_by_stem(folder, images_dir, labels_dir, (".png",))
    pairs = [(images.get(s), labels.get(s)) for s in stems]
    missing = [s for s, (img, lab) in zip(stems, pairs, strict=True) if img is None or lab is None]
    if missing:
        raise ValueError(
            f"{listing}: {len(missing)} listed stems lack an image in {images_dir}/ or a label "
            f"{labels_dir}/<stem>.png, e.g. {missing[:5]}"
        )
    return sorted((str(img), str(lab)) for img, lab in pairs)


def reduce_zero_label(label: np.ndarray, ignore_index: int) -> np.ndarray:
    """ADE20K's convention: 0 (other) becomes `ignore_index`, every other class moves down by one."""
    out = label - 1
    out[(label == 0) | (label == ignore_index)] = ignore_index
    return out


def load_label(path: str | os.PathLike[str], *, ignore_index: int = 255, reduce_zero: bool = False) -> np.ndarray:
    """(H, W) int64 class indices of a single-channel label image (palette images give their palette indices)."""
    try:
        with Image.open(path) as img:
            if img.mode not in LABEL_MODES:
                raise ValueError(
                    f"{path}: label image mode {img.mode!r}; expected one channel of class indices ({LABEL_MODES}); "
                    "convert colour-coded labels to index PNGs first"
                )
            label = np.asarray(img).astype(np.int64)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the label image ({e})") from e
    return reduce_zero_label(label, ignore_index) if reduce_zero else label


def load_pair(
    image_path: str, label_path: str, *, ignore_index: int = 255, reduce_zero: bool = False
) -> tuple[Image.Image, np.ndarray]:
    """The RGB image and its label; different sizes are an error. A bad image raises `BadImageError`."""
    image = load_image(image_path)
    label = load_label(label_path, ignore_index=ignore_index, reduce_zero=reduce_zero)
    if label.shape != (image.height, image.width):
        raise ValueError(
            f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
            f"{image.width}x{image.height} (WxH); labels must have the size of their image"
        )
    return image, label


def infer_num_classes(label_paths: Sequence[str], *, ignore_index: int, reduce_zero: bool = False) -> int:
    """1 + the largest label value of the files, `ignore_index` left out."""
    top = -1
    for path in tqdm(label_paths, unit="label", desc="classes", dynamic_ncols=True, disable=None):
        values = np.unique(load_label(path, ignore_index=ignore_index, reduce_zero=reduce_zero))
        values = values[values != ignore_index]
        if values.size:
            top = max(top, int(values.max()))
    if top < 0:
        raise ValueError(f"no labelled pixels in {len(label_paths)} label files (all are ignore_index={ignore_index})")
    return top + 1


def rescale_size(height: int, width: int, short: float, long: float | None = None) -> tuple[int, int]:
    """(H, W) keeping the aspect ratio with the shorter side `short` and the longer at most `long` (mmcv's rule:
    scale = min(short / shorter side, long / longer side), sizes rounded half up)."""
    scale = short / min(height, width)
    if long is not None:
        scale = min(scale, long / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_label(label: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of (..., H, W) integer labels (pixel-centre rule, like PIL's NEAREST)."""
    lead = label.shape[:-2]
    flat = label.reshape(-1, 1, *label.shape[-2:]).float()  # exact for indices below 2**24
    out = F.interpolate(flat, size=tuple(size), mode="nearest-exact")
    return out.reshape(*lead, *size).to(label.dtype)


def normalize(image: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """(..., 3, H, W) uint8 or [0, 255] float -> float normalised with ImageNet mean / std (RGB)."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (image.float() / 255.0 - m) / s


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def _coin(g: torch.Generator) -> bool:
    return bool(torch.randint(2, (), generator=g).item())


@dataclass(frozen=True)
class SegAugment:
    """Joint random rescale, crop, flip and photometric distortion of an image and its label (see module doc)."""

    base_size: int  # shorter side before the random ratio
    crop_size: int
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # >= 1: no retry
    ignore_index: int = 255
    photometric: bool = True

    def __call__(self, image: Tensor, label: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(3, H, W) uint8 and (H, W) int64 -> (3, c, c) normalised float and (c, c) int64 labels."""
        ratio = _uniform(g, *self.ratio_range)
        h, w = label.shape
        size = rescale_size(h, w, self.base_size * ratio, 4 * self.base_size * ratio)
        image = TF.resize(image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        label = resize_label(label, size)
        top, left = self._crop_box(label, g)
        c = self.crop_size
        image, label = image[:, top : top + c, left : left + c], label[top : top + c, left : left + c]
        if _coin(g):
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric:
            image = photometric_distortion(image, g)
        image = normalize(image)
        pad_h, pad_w = c - label.shape[0], c - label.shape[1]  # images smaller than the crop
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h))
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return image, label

    def _crop_box(self, label: Tensor, g: torch.Generator) -> tuple[int, int]:
        """Top-left corner of a random crop; retried (10 tries at most) while one class covers more than
        cat_max_ratio of the labelled pixels of the crop or it holds fewer than two classes."""
        h, w = label.shape
        c = self.crop_size
        for _ in range(10 if self.cat_max_ratio < 1 else 1):
            top = int(torch.randint(max(h - c, 0) + 1, (), generator=g))
            left = int(torch.randint(max(w - c, 0) + 1, (), generator=g))
            crop = label[top : top + c, left : left + c]
            counts = torch.bincount(crop[crop != self.ignore_index].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left


def photometric_distortion(image: Tensor, g: torch.Generator) -> Tensor:
    """mmseg's PhotoMetricDistortion on a (3, H, W) uint8 image (float result in [0, 255])."""
    x = image.float()
    if _coin(g):
        x = (x + _uniform(g, -32, 32)).clamp(0, 255)
    contrast_first = _coin(g)

    def contrast(x: Tensor) -> Tensor:
        return (x * _uniform(g, 0.5, 1.5)).clamp(0, 255) if _coin(g) else x

    if contrast_first:
        x = contrast(x)
    if _coin(g):
        x = TF.adjust_saturation(x / 255, _uniform(g, 0.5, 1.5)) * 255
    if _coin(g):
        x = TF.adjust_hue(x / 255, int(torch.randint(-18, 19, (), generator=g)) / 180) * 255
    if not contrast_first:
        x = contrast(x)
    return x


class SegTrainStream(Dataset):
    """Sample k of an endless seeded stream of augmented (image, label) crops.

    Epoch e = k // n visits the pairs in a permutation seeded by (seed, e); sample k is augmented with a generator
    seeded by (seed, k). Index it with `range(start, stop)`; a bad image gives None (skipped by `collate`).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        augment: SegAugment,
        *,
        seed: int = 0,
        reduce_zero: bool = False,
    ) -> None:
        if not pairs:
            raise ValueError("no (image, label) pairs to train on")
        self.pairs = list(pairs)
        self.augment = augment
        self.seed = seed
        self.reduce_zero = reduce_zero
        self._perm: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def pair_index(self, k: int) -> int:
        epoch, i = divmod(k, len(self.pairs))
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.pairs), generator=g))
        return int(self._perm[1][i])

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor, None] | tuple[None, None, tuple[str, str]]:
        image_path, label_path = self.pairs[self.pair_index(k)]
        try:
            image, label = load_pair(
                image_path, label_path, ignore_index=self.augment.ignore_index, reduce_zero=self.reduce_zero
            )
        except BadImageError as e:
            return None, None, (image_path, e.reason)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * k + 1)
        x, y = self.augment(TF.pil_to_tensor(image), torch.from_numpy(label), g)
        return x, y, None

    @staticmethod
    def collate(batch: Sequence[tuple]) -> tuple[Tensor | None, Tensor | None, list[tuple[str, str]]]:
        """Stack the good samples: (images (B, 3, c, c), labels (B, c, c), [(path, reason) of the bad ones])."""
        good = [(x, y) for x, y, _ in batch if x is not None]
        bad = [r for x, _, r in batch if x is None]
        if not good:
            return None, None, bad
        return torch.stack([x for x, _ in good]), torch.stack([y for _, y in good]), bad


class SegPairs(Dataset):
    """Pair i as (image, label, i, ""): the uint8 image with its label, or both resized to `size` = (H, W) (image
    bilinear and normalised, label nearest); an unreadable image gives (None, None, i, reason)."""

    def __init__(
        self, pairs: Sequence[tuple[str, str]], size: tuple[int, int] | None = None, *, ignore_index: int = 255,
        reduce_zero: bool = False,
    ) -> None:  # fmt: skip
        self.pairs, self.size, self.ignore_index, self.reduce_zero = list(pairs), size, ignore_index, reduce_zero

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Tensor | None, Tensor | None, int, str]:
        try:
            image, label = load_pair(*self.pairs[i], ignore_index=self.ignore_index, reduce_zero=self.reduce_zero)
        except BadImageError as e:
            return None, None, i, e.reason
        x, y = TF.pil_to_tensor(image), torch.from_numpy(label)
        if self.size is not None:
            x = normalize(TF.resize(x, list(self.size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True))
            y = resize_label(y, self.size)
        return x, y, i, ""

    @staticmethod
    def collate(batch: Sequence[tuple]) -> tuple[Tensor | None, Tensor | None, list[int], list[tuple[int, str]]]:
        """Stack the good samples: (images, labels, their indices, [(index, reason) of the bad ones])."""
        good = [b for b in batch if b[0] is not None]
        bad = [(b[2], b[3]) for b in batch if b[0] is None]
        if not good:
            return None, None, [], bad
        return torch.stack([b[0] for b in good]), torch.stack([b[1] for b in good]), [b[2] for b in good], bad


def cached_size(pairs: Sequence[tuple[str, str]], resize_size: int, patch: int) -> tuple[int, int]:
    """(H, W) of the cached mode: shorter side `resize_size`, the median aspect ratio of the training images, both
    rounded to multiples of the patch size."""
    from PIL import Image

    aspects = []
    for image_path, _ in pairs:
        with Image.open(image_path) as img:
            aspects.append(img.width / img.height)
    aspect = float(np.median(aspects))
    h, w = (resize_size, resize_size * aspect) if aspect >= 1 else (resize_size / aspect, resize_size)
    return max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)


def seg_confusion(prediction: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(C, C) int64 pixel counts (row = true class, column = prediction) over the pixels not labelled ignore."""
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
    valid = label != ignore_index
    label, prediction = label[valid].long(), prediction[valid].long()
    if label.numel() and (int(label.min()) < 0 or int(label.max()) >= num_classes):
        outside = sorted(set(label.unique().tolist()) - set(range(num_classes)))
        raise ValueError(
            f"label values {outside[:5]} are outside 0..{num_classes - 1} (num_classes={num_classes}, "
            f"ignore_index={ignore_index})"
        )
    return confusion_matrix(prediction, label, num_classes)


def seg_metrics(confusion: Tensor | np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU (mean over classes with a non-empty union), pixel accuracy, mean class accuracy (over classes present)
    and the per-class IoU / accuracy {name: value, NaN when undefined} of a dataset-wide confusion matrix."""
    cm = torch.as_tensor(confusion, dtype=torch.float64)
    inter, labelled, predicted = cm.diag(), cm.sum(dim=1), cm.sum(dim=0)
    iou = inter / (labelled + predicted - inter)  # 0 / 0 = NaN: class neither present nor predicted
    acc = inter / labelled
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(cm.shape[0])]
    return {
        "miou": iou.nanmean().item(),
        "pixel_accuracy": (inter.sum() / labelled.sum()).item(),
        "mean_accuracy": acc.nanmean().item(),
        "per_class_iou": dict(zip(names, iou.tolist(), strict=True)),
        "per_class_accuracy": dict(zip(names, acc.tolist(), strict=True)),
    }


def palette(n: int) -> np.ndarray:
    """(n, 3) distinct colours in [0, 1]: hues spaced by the golden ratio, none of them black."""
    colours = [colorsys.hsv_to_rgb((0.1 + i * 0.618034) % 1.0, 0.55 + 0.4 * (i % 3) / 2, 0.95 - 0.3 * (i % 2))
               for i in range(n)]  # fmt: skip
    return np.asarray(colours, dtype=np.float32).reshape(n, 3)


def colorize(label: np.ndarray | Tensor, num_classes: int, ignore_index: int) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) picture with `palette` colours; ignored (or unknown) pixels black."""
    label = np.asarray(label)
    colours = np.concatenate([palette(num_classes), np.zeros((1, 3), np.float32)])
    index = np.where((label >= 0) & (label < num_classes) & (label != ignore_index), label, num_classes)
    return colours[index]
