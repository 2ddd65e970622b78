"""Tests for opendino.data.augment: the v2 eval transform against the classic v1 DINOv2 eval pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as v1
from torchvision.transforms import v2

from opendino.data.augment import IMAGENET_MEAN, IMAGENET_STD, make_eval_transform, make_resize_transform

# v2 on a PIL image resizes/crops with Pillow exactly like v1 (checked bit for bit below). The only numeric difference
# is uint8 -> float: ToDtype(scale=True) multiplies by 1/255 where ToTensor divides by 255 (<= 1 ulp of a value in
# [0, 1]), amplified by Normalize's 1/std (<= 4.4) plus its own rounding: observed max 7.2e-7 on outputs of magnitude
# up to 2.64 (float32 ulp there is 2.4e-7). 2e-6 is a few ulps; any real resampling difference would be >= 1e-3.
ATOL = 2e-6


def _official_v1(resize_size: int = 256, crop_size: int = 224) -> v1.Compose:
    return v1.Compose(
        [
            v1.Resize(resize_size, interpolation=v1.InterpolationMode.BICUBIC),
            v1.CenterCrop(crop_size),
            v1.ToTensor(),
            v1.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def _random_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(300, 400), (257, 256), (500, 200), (100, 90), (224, 224)]  # (W, H): portrait, landscape, upscaling
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("index", range(5))
def test_eval_transform_matches_v1(index: int) -> None:
    img = _random_images()[index]
    new, old = make_eval_transform(), _official_v1()
    # Resize + CenterCrop on a PIL image stay in PIL and use Pillow's resampler in both APIs: identical bytes.
    pil_new = v2.Compose(new.transforms[:2])(img)
    pil_old = v1.Compose(old.transforms[:2])(img)
    assert isinstance(pil_new, Image.Image)
    np.testing.assert_array_equal(np.asarray(pil_new), np.asarray(pil_old))
    out_new, out_old = new(img), old(img)
    assert out_new.shape == (3, 224, 224) and out_new.dtype == torch.float32
    torch.testing.assert_close(out_new, out_old, atol=ATOL, rtol=0)


def test_eval_transform_small_sizes() -> None:
    out = make_eval_transform(resize_size=40, crop_size=28)(_random_images()[2])
    ref = _official_v1(40, 28)(_random_images()[2])
    assert out.shape == (3, 28, 28)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"crop_size": 0}, "crop_size"),
        ({"crop_size": 224.0}, "crop_size"),
        ({"crop_size": True}, "crop_size"),
        ({"resize_size": -1}, "resize_size"),
        ({"resize_size": 200, "crop_size": 224}, "must be <="),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"mean": (0.5, 0.5)}, "3 values"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
    ],
)
def test_eval_transform_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_eval_transform(**kwargs)


def test_resize_transform_shapes_and_values() -> None:
    img = _random_images()[0]  # 300 x 400 (W x H)
    out = make_resize_transform((224, 308))(img)
    assert out.shape == (3, 224, 308)
    ref = v1.Compose(
        [
            v1.Resize((224, 308), interpolation=v1.InterpolationMode.BICUBIC),
            v1.ToTensor(),
            v1.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )(img)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert make_resize_transform(112)(img).shape == (3, 112, 112)


@pytest.mark.parametrize("size", [0, (224,), (224, 0), (224, 224, 3), "224", (224.0, 224)])
def test_resize_transform_validation(size: object) -> None:
    with pytest.raises(ValueError, match="size"):
        make_resize_transform(size)  # type: ignore[arg-type]
