"""Shared pieces of the dense evaluations (linear segmentation and linear depth): paired image / target folders,
centre padding to the patch grid, and the frozen backbone's patch-token maps of chosen blocks.

Padding follows the official notebooks' pre-hook (`dinov2/hub/utils.py` CenterPadding): zeros up to the next multiple
of the patch size, floor(pad / 2) before and the rest after, on height and width. Token maps come from
`get_intermediate_layers(blocks, reshape=True, return_class_token=..., norm=...)`: segmentation uses the final norm
(the mmseg backbone default), depth does not (`dinov2/hub/depthers.py`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from opendino.data.sources import image_extensions

__all__ = ["center_pad", "depth_block_indices", "files_by_stem", "list_pairs", "token_maps"]


def list_pairs(
    folder: str | os.PathLike[str],
    image_dir: str,
    target_dir: str,
    target_suffixes: Sequence[str],
) -> list[tuple[str, str]]:
    """[(image, target)] of `folder/image_dir/<stem>.<image ext>` and `folder/target_dir/<stem><suffix>`, sorted.

    Every image needs its target and every target its image: a mismatch is an error that names a few of them.
    """
    images, targets = files_by_stem(folder, image_dir, target_dir, target_suffixes)
    if not images:
        raise ValueError(f"{Path(folder) / image_dir}: no images")
    lonely = sorted(set(images) ^ set(targets))
    if lonely:
        raise ValueError(
            f"{folder}: {len(lonely)} files without a partner in {image_dir}/ and {target_dir}/ "
            f"(same file stem expected, targets {list(target_suffixes)}), e.g. {lonely[:5]}"
        )
    return [(str(images[s]), str(targets[s])) for s in sorted(images)]


def files_by_stem(
    folder: str | os.PathLike[str], image_dir: str, target_dir: str, target_suffixes: Sequence[str]
) -> tuple[dict[str, Path], dict[str, Path]]:
    """({stem: image}, {stem: target}) of the two sub-folders (hidden files skipped); a missing folder is an error."""
    root = Path(folder)
    images_root, targets_root = root / image_dir, root / target_dir
    for d in (images_root, targets_root):
        if not d.is_dir():
            raise ValueError(f"{folder}: expected sub-folders {image_dir}/ and {target_dir}/ ({d} is missing)")

    def listing(d: Path, suffixes: Sequence[str] | frozenset[str]) -> dict[str, Path]:
        return {p.stem: p for p in d.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith(".")}

    return listing(images_root, image_extensions()), listing(targets_root, tuple(target_suffixes))


def center_pad(x: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Zero-pad (..., H, W) up to multiples of `multiple`; returns the padded tensor and (left, right, top, bottom)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return (F.pad(x, pads) if ph or pw else x), pads


def depth_block_indices(n_blocks: int, n_layers: int) -> list[int]:
    """0-based blocks of the depth evaluation: the last block for 1 layer; for 4, the official choice
    (12 blocks: 2, 5, 8, 11; 24: 4, 11, 17, 23; 40: 9, 19, 29, 39), i.e. evenly spaced and ending at the last."""
    if n_layers == 1:
        return [n_blocks - 1]
    if n_layers != 4:
        raise ValueError(f"n_layers={n_layers}: expected 1 or 4")
    official = {12: [2, 5, 8, 11], 24: [4, 11, 17, 23], 40: [9, 19, 29, 39]}
    if n_blocks in official:
        return official[n_blocks]
    if n_blocks < 4:
        raise ValueError(f"a backbone with {n_blocks} blocks has fewer than 4 layers to take")
    return [round(n_blocks * (i + 1) / 4) - 1 for i in range(4)]


def token_maps(
    model: torch.nn.Module,
    images: Tensor,
    blocks: Sequence[int],
    *,
    norm: bool,
    class_token: bool,
) -> list[tuple[Tensor, Tensor | None]]:
    """[(patch map (B, D, h, w), CLS (B, D) or None)] of the given 0-based blocks for centre-padded `images`."""
    padded, _ = center_pad(images, int(model.patch_size))  # type: ignore[arg-type]
    out = model.get_intermediate_layers(padded, list(blocks), reshape=True, return_class_token=True, norm=norm)  # type: ignore[operator]
    return [(maps, cls if class_token else None) for maps, cls in out]
