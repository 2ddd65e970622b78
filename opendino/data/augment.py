"""Image transforms built on torchvision transforms v2 (evaluation transforms for now).

``make_eval_transform`` reproduces the official DINOv2 evaluation transform
(Resize(256, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize(ImageNet mean/std)). Resizing and cropping run on
the PIL image, exactly like the original v1 pipeline, so Pillow's resampler is used and the result matches it.
``make_resize_transform`` resizes straight to a fixed (H, W), e.g. a patch-size multiple for dense features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "make_eval_transform", "make_resize_transform"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "nearest-exact": InterpolationMode.NEAREST_EXACT,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "box": InterpolationMode.BOX,  # box, hamming and lanczos: PIL inputs only
    "hamming": InterpolationMode.HAMMING,
    "lanczos": InterpolationMode.LANCZOS,
}


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _interpolation(name: str) -> InterpolationMode:
    if name not in _INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}; expected one of {sorted(_INTERPOLATIONS)}")
    return _INTERPOLATIONS[name]


def _normalize(mean: Sequence[float], std: Sequence[float]) -> v2.Normalize:
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean} std={std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be > 0, got {std}")
    return v2.Normalize(mean=mean, std=std)


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """ToImage + ToDtype(float32, scale=True) + Normalize: the v2 equivalent of ToTensor + Normalize."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), _normalize(mean, std)]


def make_eval_transform(
    resize_size: int = 256,
    crop_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> v2.Compose:
    """Resize the shorter side to ``resize_size``, center-crop ``crop_size``, to float CHW tensor and normalize.

    Given a PIL image, resize and crop run in PIL (as in the official DINOv2 eval transform); given a tensor they
    run in torch (antialiased, close to but not bit-identical with PIL). ``crop_size`` must not exceed
    ``resize_size`` (a larger crop would pad with zeros).
    """
    resize_size = _positive_int("resize_size", resize_size)
    crop_size = _positive_int("crop_size", crop_size)
    if crop_size > resize_size:
        raise ValueError(f"crop_size ({crop_size}) must be <= resize_size ({resize_size})")
    return v2.Compose(
        [
            v2.Resize(resize_size, interpolation=_interpolation(interpolation), antialias=True),
            v2.CenterCrop(crop_size),
            *_to_normalized_tensor(mean, std),
        ]
    )


def make_resize_transform(
    size: int | Sequence[int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> v2.Compose:
    """Resize the whole image to exactly ``size`` = (H, W) (an int means square), to float tensor and normalize.

    The aspect ratio is not preserved; nothing is cropped.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        hw = (_positive_int("size", size),) * 2
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        hw = (_positive_int("size[0] (height)", size[0]), _positive_int("size[1] (width)", size[1]))
    else:
        raise ValueError(f"size must be a positive int or an (H, W) pair of positive ints, got {size!r}")
    return v2.Compose(
        [
            v2.Resize(list(hw), interpolation=_interpolation(interpolation), antialias=True),
            *_to_normalized_tensor(mean, std),
        ]
    )
