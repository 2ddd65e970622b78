"""Patch features of PIL images, and the paper's PCA picture: foreground by the first component, then RGB from a
second PCA of the foreground patches (DINOv2, Oquab et al. 2023, §7.5 and Figure 1; the official repository ships
no code for it, so the recipe below is ours where the paper is silent).

Inputs: an image is resized (bicubic, antialiased) so that its shorter side is `image_size` pixels and its longer
side the nearest multiple of the patch size that keeps the aspect ratio (at most 4:1, squashed beyond), normalised
with the ImageNet mean / std and run once through the backbone; features are the last block's patch tokens after
the final norm (register tokens left out), as numpy arrays. A bigger `image_size` gives a finer patch grid.

Deterministic rules, documented in docs/viz.md:
- PCA is fit in float64 on the covariance matrix; every component's sign is fixed so that its largest-magnitude
  loading is positive (`fit_pca`).
- Foreground: the first component's scores are divided by their standard deviation over the set; the component is
  oriented so that fewer of the border patches (outer ring of every grid) score above 0 than below (ties: the border
  patches' mean score is not positive); foreground = score > `threshold` (paper: 0). The background of a photo
  touches its border, so a foreground that comes out inverted by the arbitrary PCA sign is turned back.
- Colours: the first 3 components of a PCA of the foreground patches of the whole set, each min-max scaled to [0, 1]
  over those patches; background black.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from opendino.data.augment import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "MAX_ASPECT_RATIO",
    "PCA",
    "Foreground",
    "ImageFeatures",
    "PCAMaps",
    "border_mask",
    "fit_pca",
    "foreground_masks",
    "image_features",
    "input_size",
    "model_device",
    "patch_at",
    "pca_maps",
    "prepare_image",
    "similarity_map",
    "to_input",
]

DEFAULT_IMAGE_SIZE = 448  # shorter side when none is asked for: 32 x 32 patches of 14 px, 28 x 28 of 16 px
MAX_ASPECT_RATIO = 4.0  # longer side over shorter side fed to the backbone; longer images are squashed to it


# ---------------------------------------------------------------------------------------------------- inputs
def input_size(width: int, height: int, image_size: int, patch_size: int) -> tuple[int, int]:
    """(H, W) fed to the backbone: shorter side `image_size` (a multiple of `patch_size`), the longer side the nearest
    multiple of the patch size keeping the aspect ratio (capped at MAX_ASPECT_RATIO)."""
    if image_size <= 0 or image_size % patch_size:
        raise ValueError(f"image_size={image_size}: must be a positive multiple of the patch size {patch_size}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image of size {width}x{height}: nothing to draw")
    ratio = min(max(width, height) / min(width, height), MAX_ASPECT_RATIO)
    longer = max(patch_size, round(image_size * ratio / patch_size) * patch_size)
    return (image_size, longer) if height <= width else (longer, image_size)


def prepare_image(image: Image.Image, image_size: int, patch_size: int) -> np.ndarray:
    """The (H, W, 3) uint8 picture the backbone sees (see `input_size`)."""
    h, w = input_size(image.width, image.height, image_size, patch_size)
    return np.array(image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC), dtype=np.uint8)


def model_device(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a model's parameters."""
    p = next(model.parameters())
    return p.device, p.dtype


def to_input(pixels: np.ndarray, model: nn.Module) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) ImageNet-normalised tensor on the model's device and dtype."""
    device, dtype = model_device(model)
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std)[None].to(device=device, dtype=dtype)


@dataclass(frozen=True)
class ImageFeatures:
    """One image as the backbone saw it and its patch features."""

    image: np.ndarray  # (H, W, 3) uint8: the resized picture fed to the backbone
    patches: np.ndarray  # (h, w, D) float32: last-block patch tokens after the final norm (no registers)
    cls: np.ndarray  # (D,) float32: the class token after the final norm
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid."""
        return int(self.patches.shape[0]), int(self.patches.shape[1])


@torch.no_grad()
def image_features(model: nn.Module, image: Image.Image, *, image_size: int = DEFAULT_IMAGE_SIZE) -> ImageFeatures:
    """Patch and class tokens of `image` resized to shorter side `image_size` (a multiple of the patch size)."""
    p = int(model.patch_size)  # type: ignore[arg-type]
    pixels = prepare_image(image, image_size, p)
    out = model.forward_features(to_input(pixels, model))  # type: ignore[operator]
    h, w = pixels.shape[0] // p, pixels.shape[1] // p
    patches = out["x_norm_patchtokens"][0].float().cpu().numpy().reshape(h, w, -1)  # (N, D) -> (h, w, D)
    return ImageFeatures(pixels, patches, out["x_norm_clstoken"][0].float().cpu().numpy(), p)


def patch_at(features: ImageFeatures, x: float, y: float) -> tuple[int, int]:
    """(row, column) of the patch under pixel (x, y) of `features.image`."""
    height, width = features.image.shape[:2]
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"pixel ({x}, {y}) is outside the {width}x{height} image")
    return int(y) // features.patch_size, int(x) // features.patch_size


def similarity_map(query: ImageFeatures, row: int, col: int, target: ImageFeatures | None = None) -> np.ndarray:
    """(h, w) cosine similarity of patch (row, col) of `query` to every patch of `target` (default: `query`)."""
    h, w = query.grid
    if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"patch ({row}, {col}) is outside the {h} x {w} patch grid")
    target = query if target is None else target
    if target.patches.shape[-1] != query.patches.shape[-1]:
        raise ValueError(f"feature sizes differ: {query.patches.shape[-1]} vs {target.patches.shape[-1]}")
    q = query.patches[row, col].astype(np.float64)
    t = target.patches.astype(np.float64)
    sim = t @ q / np.maximum(np.linalg.norm(t, axis=-1) * np.linalg.norm(q), 1e-12)
    return sim.astype(np.float32)


# ---------------------------------------------------------------------------------------------------- PCA
@dataclass(frozen=True)
class PCA:
    """Principal components of a set of feature vectors."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D) orthonormal rows, largest-magnitude loading positive
    explained_variance_ratio: np.ndarray  # (k,) share of the total variance

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, k) scores."""
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


def fit_pca(x: np.ndarray, n_components: int) -> PCA:
    """The first `n_components` principal components of the rows of `x` (N, D), with the sign rule of the module."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, D) array of features, got shape {x.shape}")
    if not 1 <= n_components <= x.shape[1]:
        raise ValueError(f"n_components={n_components}: expected 1..{x.shape[1]} (the feature size)")
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / max(x.shape[0] - 1, 1)
    values, vectors = np.linalg.eigh(cov)  # ascending
    order = np.argsort(-values, kind="stable")[:n_components]
    components = vectors[:, order].T.copy()  # (k, D)
    biggest = np.abs(components).argmax(axis=1)
    components *= np.sign(components[np.arange(n_components), biggest])[:, None]
    total = float(np.clip(values, 0, None).sum())
    ratio = np.clip(values[order], 0, None) / total if total > 0 else np.zeros(n_components)
    return PCA(mean, components, ratio)


def border_mask(h: int, w: int) -> np.ndarray:
    """(h, w) bool: the outer ring of a patch grid."""
    mask = np.ones((h, w), dtype=bool)
    mask[1:-1, 1:-1] = False
    return mask


@dataclass(frozen=True)
class Foreground:
    """Foreground patches of a set of images, split by the first principal component."""

    masks: list[np.ndarray]  # per image (h, w) bool
    scores: list[np.ndarray]  # per image (h, w) first-component score in standard deviations (background low)
    threshold: float  # foreground: score > threshold (standard deviations)
    pca: PCA  # the 1-component PCA over all patches, oriented as the scores


def _flatten(features: Sequence[ImageFeatures]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    if not features:
        raise ValueError("no images")
    dims = {f.patches.shape[-1] for f in features}
    if len(dims) != 1:
        raise ValueError(f"images have features of different sizes {sorted(dims)}")
    return np.concatenate([f.patches.reshape(-1, f.patches.shape[-1]) for f in features]), [f.grid for f in features]


def _split(values: np.ndarray, grids: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    out, start = [], 0
    for h, w in grids:
        out.append(values[start : start + h * w].reshape(h, w, *values.shape[1:]))
        start += h * w
    return out


def foreground_masks(features: Sequence[ImageFeatures], threshold: float = 0.0) -> Foreground:
    """Foreground of each image by thresholding the first principal component of all their patches together, with
    the border rule of the module choosing which side is foreground."""
    x, grids = _flatten(features)
    pca = fit_pca(x, 1)
    scores = pca.transform(x)[:, 0]
    std = float(scores.std())
    scores = scores / std if std > 0 else np.zeros_like(scores)
    border = np.concatenate([border_mask(h, w).ravel() for h, w in grids])
    b = scores[border]
    above, below = int((b > 0).sum()), int((b < 0).sum())
    if above > below or (above == below and b.sum() > 0):
        scores, pca = -scores, PCA(pca.mean, -pca.components, pca.explained_variance_ratio)
    per_image = _split(scores.astype(np.float32), grids)
    return Foreground([s > threshold for s in per_image], per_image, float(threshold), pca)


@dataclass(frozen=True)
class PCAMaps:
    """The PCA picture of a set of images: per-image RGB patch colours and the patches they were fit on."""

    rgb: list[np.ndarray]  # per image (h, w, 3) float32 in [0, 1]; patches outside `masks` black
    masks: list[np.ndarray]  # per image (h, w) bool: the patches the colour PCA was fit on (foreground)
    foreground: Foreground | None  # the first-component split behind `masks` (None: masks given or all patches)
    pca: PCA  # the colour PCA
    low: np.ndarray  # (k,) score mapped to 0 (per component, over the fitted patches)
    high: np.ndarray  # (k,) score mapped to 1


def pca_maps(
    features: Sequence[ImageFeatures],
    *,
    threshold: float = 0.0,
    remove_background: bool = True,
    masks: Sequence[np.ndarray] | None = None,
    n_components: int = 3,
) -> PCAMaps:
    """The paper's recipe over a set of images (one PCA for all): foreground by the first component (`foreground_masks`;
    or the given `masks`; or every patch with `remove_background=False`), then a PCA of the foreground patches whose
    first `n_components` scores, min-max scaled over those patches, are the colours (a component constant over them
    is 0.5; fewer than 3 components: the other channels stay 0)."""
    if not 1 <= n_components <= 3:
        raise ValueError(f"n_components={n_components}: expected 1, 2 or 3 (RGB channels)")
    x, grids = _flatten(features)
    fg = None
    if masks is not None:
        masks = [np.asarray(m, dtype=bool) for m in masks]
        if [m.shape for m in masks] != [tuple(g) for g in grids]:
            raise ValueError(f"masks of shapes {[m.shape for m in masks]} for patch grids {grids}")
    elif remove_background:
        fg = foreground_masks(features, threshold)
        masks = fg.masks
    else:
        masks = [np.ones(g, dtype=bool) for g in grids]
    keep = np.concatenate([m.ravel() for m in masks])
    fit_on = x[keep] if keep.sum() >= 2 else x  # a degenerate split: colour every patch rather than none
    k = min(n_components, x.shape[1])
    pca = fit_pca(fit_on, k)
    fitted = pca.transform(fit_on)
    low, high = fitted.min(axis=0), fitted.max(axis=0)
    span = high - low
    scaled = np.where(span > 0, (pca.transform(x) - low) / np.where(span > 0, span, 1.0), 0.5)  # constant: mid-grey
    rgb = np.zeros((x.shape[0], 3), dtype=np.float32)
    rgb[:, :k] = np.clip(scaled, 0, 1)
    rgb[~keep] = 0
    return PCAMaps(_split(rgb, grids), list(masks), fg, pca, low, high)
