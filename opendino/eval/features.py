"""Batched feature extraction from a frozen backbone: the one forward loop behind `extract`, the evaluations,
visualisation and curation.

Features follow the official evaluation code: the CLS token after the final norm (`x_norm_clstoken`), the
patch tokens after the final norm, and their mean ("avgpool" in the linear protocol). On GPU the forward runs under
bf16 (or fp16) autocast with channels-last inputs; outputs always come back as float32 on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from opendino.data.augment import make_eval_transform
from opendino.data.sources import ImageDataset, collate_skip_bad, list_images

__all__ = ["FeatureBatch", "FeatureSet", "autocast_for", "extract_features", "iter_features", "pick_device"]

OUTPUTS = ("cls", "mean", "patch")
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """ "auto" -> the first CUDA device if there is one, else the CPU; anything else as torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} asked for, but no CUDA device is available")
    return device


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast context on CUDA for amp in {"bf16", "fp16"}; a no-op on CPU or with amp="none"."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=_AMP[amp])


@dataclass
class FeatureBatch:
    """Features of the good images of one batch; `bad` lists the (index, reason) of images that failed."""

    indices: Tensor  # (n,) dataset indices
    features: dict[str, Tensor]  # name -> (n, D) or (n, h*w, D), float32, CPU
    bad: list[tuple[int, str]] = field(default_factory=list)


@torch.inference_mode()
def iter_features(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    outputs: Sequence[str] = ("cls",),
    device: torch.device | None = None,
    amp: str = "bf16",
    channels_last: bool = True,
) -> Iterator[FeatureBatch]:
    """Run `model` over batches `(images | None, indices, bad)` (as `collate_skip_bad` makes them)."""
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}: expected some of {OUTPUTS}")
    device = device or next(model.parameters()).device
    for images, indices, bad in loader:
        if images is None:
            yield FeatureBatch(indices=indices, features={}, bad=list(bad))
            continue
        images = images.to(device, non_blocking=True)
        if channels_last and device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp):
            out = model.forward_features(images)  # type: ignore[operator]
        patch = out["x_norm_patchtokens"]
        feats: dict[str, Tensor] = {}
        if "cls" in outputs:
            feats["cls"] = out["x_norm_clstoken"].float().cpu()
        if "mean" in outputs:
            feats["mean"] = patch.float().mean(dim=1).cpu()
        if "patch" in outputs:
            feats["patch"] = patch.float().cpu()
        yield FeatureBatch(indices=indices, features=feats, bad=list(bad))


@dataclass
class FeatureSet:
    """In-memory features of a list of images; rows align with `paths` (bad images are left out)."""

    paths: list[str]
    features: dict[str, np.ndarray]
    bad: list[tuple[str, str]]  # (path, reason)


def make_loader(
    paths: Sequence[str],
    transform,
    *,
    batch_size: int,
    num_workers: int,
    sampler: Sequence[int] | None = None,
    pin_memory: bool = False,
    max_pixels: int | None = None,
) -> DataLoader:
    """A DataLoader over `paths` (optionally only the indices of `sampler`, in that order) that skips bad images."""
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    dataset = ImageDataset(paths, transform, **kwargs)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def extract_features(
    backbone: torch.nn.Module | str | os.PathLike,
    data: str | os.PathLike | Sequence[str],
    *,
    outputs: Sequence[str] = ("cls",),
    transform=None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    amp: str = "bf16",
) -> FeatureSet:
    """Features of every image of a folder, list file or list of paths, in memory (see `opendino extract` to
    write large collections to disk). `transform` defaults to the official eval transform (256 -> 224 crop)."""
    from opendino.models.hub import load_backbone

    dev = pick_device(device)
    model = backbone if isinstance(backbone, torch.nn.Module) else load_backbone(os.fspath(backbone), device=dev)
    model = model.to(dev).eval()
    paths = list(data) if isinstance(data, list | tuple) else list_images(os.fspath(data))  # type: ignore[arg-type]
    loader = make_loader(paths, transform or make_eval_transform(), batch_size=batch_size, num_workers=num_workers)
    chunks: dict[str, list[Tensor]] = {k: [] for k in outputs}
    kept: list[int] = []
    bad: list[tuple[str, str]] = []
    for fb in iter_features(model, loader, outputs=outputs, device=dev, amp=amp):
        kept += fb.indices.tolist()
        bad += [(paths[i], reason) for i, reason in fb.bad]
        for k, v in fb.features.items():
            chunks[k].append(v)
    feats = {k: torch.cat(v).numpy() if v else np.zeros((0,), np.float32) for k, v in chunks.items()}
    return FeatureSet(paths=[paths[i] for i in kept], features=feats, bad=bad)
