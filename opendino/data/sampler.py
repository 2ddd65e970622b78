"""Resumable infinite sampling for map-style training data (image folders, file lists, manifests).

The official code (dinov2/data/samplers.py) draws one permutation per epoch and gives rank r every w-th element, so
which images a step sees depends on the number of processes. Here the stream is defined per *global* position:

- the global stream is epoch 0, epoch 1, ...; epoch e is ``torch.randperm(n)`` drawn from a ``torch.Generator``
  seeded with ``derive_seed(seed, EPOCH, e)`` (``arange(n)`` with ``shuffle=False``), or with ``weights``, n
  independent draws with replacement, P(i) = weights[i] / sum(weights). Global position p is element p % n of
  epoch p // n; epochs need not divide into batches, the stream just runs on.
- global step s covers positions [s * G, (s + 1) * G) with G = batch_size * world_size, and rank r takes the slice
  [s * G + r * B, s * G + (r + 1) * B). The images of a step (all ranks together) therefore depend on G only: a run
  saved with 2 processes x B and resumed with 1 process x 2B sees the same images at the same step.
- each item is ``(index, sample_seed)``; ``sample_seed = derive_seed(seed, SAMPLE, p)`` seeds that image's
  augmentation (``TrainDataset``), so augmentations resume exactly too.

Seeking is O(one epoch): only the permutation of the target epoch is drawn, and one epoch at most is held. Resuming at
step k needs nothing but ``start_step=k``. Streams are reproducible for a given torch version (randperm's algorithm
is torch's). ``TrainDataset`` loads, augments under a per-sample seed, and deterministically replaces bad images.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from opendino.data.collate import TrainSample
from opendino.data.sources import DEFAULT_MAX_PIXELS, BadImageError, _check_max_pixels, load_image

__all__ = [
    "InfiniteSampler",
    "TrainDataset",
    "TrainSample",
    "derive_seed",
    "make_train_loader",
    "seeded_call",
]

# Domain tags of derive_seed, so that no two uses of the run seed can ever produce the same stream.
EPOCH, SAMPLE, REPLACE, SHARD_ORDER, SHARD_BUFFER, SHARD_SAMPLE = range(1, 7)
_MASK63 = (1 << 63) - 1
_T = TypeVar("_T")


def derive_seed(*values: int) -> int:
    """A 63-bit seed hashed from non-negative ints (numpy ``SeedSequence``: stable across versions and platforms)."""
    state = np.random.SeedSequence([operator.index(v) for v in values]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & _MASK63


def seeded_call(fn: Callable[[Any], _T], arg: Any, seed: int) -> _T:
    """``fn(arg)`` with torch's CPU generator seeded by ``seed``; the caller's CPU RNG state is restored afterwards.

    Only the CPU generator is touched (``torch.manual_seed`` would also reseed every CUDA generator), so calling
    this in the training process (``num_workers=0``) leaves the model's random streams exactly as they were.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return fn(arg)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class InfiniteSampler(Sampler[tuple[int, int]]):
    """Endless ``(index, sample_seed)`` items for rank ``rank`` of ``world_size``, from step ``start_step`` on.

    Feed it to a DataLoader with ``batch_size=batch_size`` and ``drop_last=True`` (``make_train_loader`` does), so
    that each batch is exactly one step's slice. ``weights`` (one per index, >= 0, not all 0) switch each epoch
    from a permutation to n weighted draws with replacement; they need ``shuffle=True``.
    """

    def __init__(
        self,
        size: int,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        weights: Sequence[float] | np.ndarray | None = None,
        start_step: int = 0,
    ) -> None:
        self.size = _check_int("size", size, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.seed = _check_int("seed", seed, 0)
        self.start_step = _check_int("start_step", start_step, 0)
        self.shuffle = bool(shuffle)
        self._cdf: torch.Tensor | None = None
        if weights is not None:
            if not self.shuffle:
                raise ValueError("weighted sampling draws at random: it needs shuffle=True")
            self._cdf, self._last_positive = _weights_cdf(weights, self.size)
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        """G = batch_size * world_size: global positions consumed per step by all ranks together."""
        return self.batch_size * self.world_size

    def position_for_step(self, step: int) -> int:
        """Global position of this rank's first item at ``step`` (its batch is the next ``batch_size`` positions)."""
        return _check_int("step", step, 0) * self.global_batch_size + self.rank * self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset indices of epoch ``epoch``, in stream order (length ``size``)."""
        epoch = _check_int("epoch", epoch, 0)
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        self._cached = None  # release the previous epoch before drawing the next: one epoch in memory at a time
        order = self._draw_epoch(epoch)
        self._cached = (epoch, order)
        return order

    def _draw_epoch(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, EPOCH, epoch))
        if self._cdf is None:
            dtype = torch.int32 if self.size < 2**31 else torch.int64  # halves the memory of big epochs
            return torch.randperm(self.size, generator=gen, dtype=dtype).numpy()
        # Inverse-CDF draws rather than torch.multinomial, which refuses more than 2**24 categories.
        u = torch.rand(self.size, generator=gen, dtype=torch.float64) * self._cdf[-1]
        picks = torch.searchsorted(self._cdf, u, right=True)
        return picks.clamp_(max=self._last_positive).numpy()  # u * total may round up to total itself

    def item_at(self, position: int) -> tuple[int, int]:
        """``(index, sample_seed)`` at global position ``position``: O(1) once its epoch is drawn."""
        epoch, offset = divmod(_check_int("position", position, 0), self.size)
        return int(self.epoch_order(epoch)[offset]), derive_seed(self.seed, SAMPLE, position)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        while True:
            first = self.position_for_step(step)
            for position in range(first, first + self.batch_size):
                yield self.item_at(position)
            step += 1


def _weights_cdf(weights: Sequence[float] | np.ndarray, size: int) -> tuple[torch.Tensor, int]:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (size,):
        raise ValueError(f"weights must have shape ({size},) (one per index), got {w.shape}")
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        raise ValueError(f"weights must be finite and >= 0; index {bad[0]} has {w[bad[0]]!r}")
    positive = np.flatnonzero(w > 0)
    if not positive.size:
        raise ValueError("all weights are 0: nothing could ever be sampled")
    return torch.from_numpy(np.cumsum(w)), int(positive[-1])


class TrainDataset(Dataset):
    """Images from ``paths`` through ``transform``, indexed by the sampler's ``(index, sample_seed)`` items.

    Returns a ``TrainSample`` ``(crops, index, seed, bad_images)``. The transform runs under
    ``seeded_call(transform, image, sample_seed)``. A bad image (``BadImageError``, or any exception raised by the
    transform) is replaced by an index drawn from a generator seeded by ``sample_seed``, up to ``max_attempts``
    images in all, so that batches keep their size and resumed runs see the same replacements; each replaced image
    is reported in ``bad_images`` as ``(path, reason)`` and ``index`` is the one finally loaded.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        transform: Callable[[Any], Any],
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_attempts: int = 20,
    ) -> None:
        if not paths:
            raise ValueError("TrainDataset needs at least one image path")
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        _check_max_pixels(max_pixels)
        self.paths = [os.fspath(p) for p in paths]
        self.transform = transform
        self.max_pixels = max_pixels
        self.max_attempts = _check_int("max_attempts", max_attempts, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> TrainSample:
        try:
            index, sample_seed = (operator.index(k) for k in key)
        except (TypeError, ValueError):
            raise TypeError(f"TrainDataset items are (index, sample_seed) pairs of ints, got {key!r}") from None
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} images")
        notes: list[tuple[str, str]] = []
        replacements: np.random.Generator | None = None
        for _ in range(self.max_attempts):
            path = self.paths[index]
            try:
                image = load_image(path, max_pixels=self.max_pixels)
            except BadImageError as e:
                notes.append((path, e.reason))
            else:
                try:
                    crops = seeded_call(self.transform, image, sample_seed)
                    return TrainSample(crops, index, sample_seed, tuple(notes))
                except Exception as e:  # a pathological image must not kill a worker; it is replaced and reported
                    notes.append((path, f"transform failed: {type(e).__name__}: {e}"))
            if replacements is None:
                replacements = np.random.default_rng(derive_seed(sample_seed, REPLACE))
            index = int(replacements.integers(len(self.paths)))
        raise RuntimeError(
            f"{self.max_attempts} images in a row could not be loaded (the dataset seems mostly unreadable, or the "
            f"transform always fails); last: {notes[-1][0]}: {notes[-1][1]}"
        )


def make_train_loader(
    dataset: Dataset | IterableDataset,
    *,
    sampler: InfiniteSampler | None = None,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """The training DataLoader: ``TrainDataset`` + ``InfiniteSampler``, or a ``ShardDataset`` (``sampler=None``).

    Map-style: batches of ``sampler.batch_size`` items. Iterable: the dataset yields whole batches
    (``batch_size=None``), and ``collate_fn`` receives each list of samples. The loader gets a private generator,
    so creating its iterator does not draw from torch's global RNG (which the training loop's resume restores).
    """
    iterable = isinstance(dataset, IterableDataset)
    if iterable == (sampler is not None):
        raise ValueError("pass a sampler with a map-style dataset, and none with an iterable (shard) dataset")
    num_workers = _check_int("num_workers", num_workers, 0)
    return DataLoader(
        dataset,
        batch_size=None if sampler is None else sampler.batch_size,
        sampler=sampler,
        drop_last=sampler is not None,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers else None,
        generator=torch.Generator().manual_seed(0),
    )
