"""The training input pipeline of a `TrainConfig`: source -> robust decoding -> multi-crop -> masks -> `Batch`.

    folder / .txt list / manifest (.csv, .tsv, .parquet)  -> TrainDataset + InfiniteSampler (exact resume by step)
    tar shards (glob or brace pattern)                    -> ShardDataset (split by rank and worker)
      -> MultiCropAugmentation (per-sample seed) -> SSLCollate (iBOT masks, per-batch seed) -> Batch

`check_source` validates the source before any work starts (the loop calls it first).
"""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import DataLoader

from opendino.config import DataConfig, TrainConfig
from opendino.data import sources
from opendino.data.augment import MultiCropAugmentation
from opendino.data.collate import SSLCollate
from opendino.data.manifest import read_manifest
from opendino.data.masking import MaskingGenerator
from opendino.data.sampler import InfiniteSampler, TrainDataset, make_train_loader
from opendino.data.shards import ShardDataset, expand_shards
from opendino.data.sources import list_images

__all__ = ["build_train_loader", "check_source", "source_kind"]


def source_kind(data: DataConfig) -> str:
    """folder, list, manifest or shards: `data.kind`, or read off `data.source` (`sources.source_kind`) if "auto"."""
    return data.kind if data.kind != "auto" else sources.source_kind(data.source)


def _paths_and_weights(data: DataConfig) -> tuple[list[str], Any]:
    kind = source_kind(data)
    if kind == "manifest":
        m = read_manifest(data.source)
        return m.paths, m.weights
    if kind == "folder" and not os.path.isdir(data.source):
        raise ValueError("not a folder")
    return list_images(data.source), None


def check_source(data: DataConfig) -> int:
    """Raise ValueError / FileNotFoundError when the source cannot be read; returns its number of images (or
    shards, for tar shards)."""
    if source_kind(data) == "shards":
        return len(expand_shards(data.source))
    if not os.path.exists(data.source):
        raise FileNotFoundError("no such file or folder")
    paths, weights = _paths_and_weights(data)
    if weights is not None and not data.shuffle:
        raise ValueError("the manifest has sampling weights, which need data.shuffle=true")
    return len(paths)


def make_augmentation(cfg: TrainConfig) -> MultiCropAugmentation:
    c = cfg.crops
    return MultiCropAugmentation(
        global_crops_scale=c.global_crops_scale,
        local_crops_scale=c.local_crops_scale,
        local_crops_number=c.local_crops_number,
        global_crops_size=c.global_crops_size,
        local_crops_size=c.local_crops_size,
        blur=c.blur,
    )


def make_collate(cfg: TrainConfig) -> SSLCollate:
    grid = cfg.crops.global_crops_size // cfg.model.patch_size
    n_tokens = grid * grid
    ibot_on = cfg.ibot.loss_weight > 0
    generator = MaskingGenerator((grid, grid), max_num_patches=0.5 * n_tokens)
    return SSLCollate(
        generator,
        n_tokens,
        mask_probability=cfg.ibot.mask_sample_probability if ibot_on else 0.0,
        mask_ratio_min_max=cfg.ibot.mask_ratio_min_max,
    )


def build_train_loader(
    cfg: TrainConfig, *, start_step: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False
) -> DataLoader:
    """The infinite DataLoader of `Batch`es for process `rank`, starting at global step `start_step`."""
    data = cfg.data
    transform = make_augmentation(cfg)
    collate = make_collate(cfg)
    prefetch = 2 if data.num_workers else None
    if source_kind(data) == "shards":
        shards = ShardDataset(
            data.source,
            transform,
            batch_size=data.batch_size_per_gpu,
            rank=rank,
            world_size=world_size,
            seed=cfg.run.seed,
            start_step=start_step,
            shuffle=data.shuffle,
            buffer_size=data.shuffle_buffer,
            max_pixels=data.max_image_pixels,
        )
        return make_train_loader(
            shards, num_workers=data.num_workers, collate_fn=collate, pin_memory=pin_memory, prefetch_factor=prefetch
        )
    paths, weights = _paths_and_weights(data)
    sampler = InfiniteSampler(
        len(paths),
        batch_size=data.batch_size_per_gpu,
        rank=rank,
        world_size=world_size,
        seed=cfg.run.seed,
        shuffle=data.shuffle,
        weights=weights,
        start_step=start_step,
    )
    dataset = TrainDataset(paths, transform, max_pixels=data.max_image_pixels)
    return make_train_loader(
        dataset,
        sampler=sampler,
        num_workers=data.num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=prefetch,
    )
