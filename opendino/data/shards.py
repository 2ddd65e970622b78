"""Training images streamed from local webdataset tar shards, batched in the workers, resumable exactly.

Shards follow the webdataset convention: tar members are grouped by key (the member name up to the first dot of its
base name, consecutive members only; ``__*__`` metadata members skipped) and a sample's image is its member whose
lower-cased extension comes first in ``extensions``. Reading uses the standard ``tarfile`` module, not webdataset's
pipeline: each shard is indexed once per process (member headers only, data is skipped by seeking), so the sample
stream is a pure function of the shard files and a resumed run seeks to its position without reading or decoding
what came before, and reads each image with one ``seek`` + ``read``.

The stream. There are R = world_size * K readers (K DataLoader workers, K = 1 without workers); reader
``rank * K + role`` owns, in epoch e, the shards ``order_e[reader::R]``, where ``order_e`` is the sorted shard list
permuted by a generator seeded from (seed, e). Its samples pass through a seeded shuffle buffer of ``buffer_size``
(flushed at the end of each epoch), and each reader runs through its own epochs one after the other. Reader sample
q gets the sample seed ``derive_seed(seed, SHARD_SAMPLE, R, reader, q)``. Fewer shards than readers is an error
(write more shards, or use fewer workers): every reader must own at least one shard per epoch.

Batches. A reader cuts its stream into batches of ``batch_size`` samples; step s of a rank is batch s // K of the
rank's role s % K, which is the order in which a DataLoader (``batch_size=None``, ``in_order=True``) collects
batches from its workers, round-robin. Resuming at ``start_step`` makes worker k play role (start_step + k) % K from
that role's batch (start_step + k) // K on. Exact resume therefore requires the same world size, number of workers,
batch size and shard files. A bad image does not shorten a batch: it is replaced by the next readable sample of the
reader's stream (decoded with the bad slot's sample seed) and reported in the sample's ``bad_images`` as
``("<shard path>:<member name>", reason)``, so batch boundaries never depend on decoding. A corrupt or truncated
shard is logged and contributes the samples before the damage.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import stat
import tarfile
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from glob import glob
from typing import Any

import numpy as np
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from opendino.data.sampler import SHARD_BUFFER, SHARD_ORDER, SHARD_SAMPLE, TrainSample, derive_seed, seeded_call
from opendino.data.sources import (
    DEFAULT_MAX_PIXELS,
    TAR_MEMBER_SEP,
    BadImageError,
    _check_max_pixels,
    load_image_bytes,
)

__all__ = [
    "DEFAULT_IMAGE_EXTENSIONS",
    "ShardDataset",
    "ShardIndex",
    "expand_shards",
    "index_shard",
    "list_shard_images",
    "member_ref",
    "read_member",
    "split_member_ref",
]

_log = logging.getLogger(__name__)

# Preference order when a sample holds several images (e.g. "jpg" and "seg.png": "seg.png" is not an image key).
DEFAULT_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "pnm", "bmp", "tif", "tiff", "gif")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split: key = up to the first dot of the base
_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips members named __x__ and everything under __x__/
_INDEX_CACHE = 16  # shard indexes kept per process; reads move through a handful of shards at a time
_TAR_BLOCK = 512


def expand_shards(pattern: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Sorted absolute paths of the shards named by brace patterns / globs (``train-{000..099}.tar``, ``*.tar``).

    A glob that matches nothing, a listed file that does not exist, or a match that is not a regular file is a
    ``ValueError``: a missing shard silently dropped would change the data without anyone noticing.
    """
    patterns = [pattern] if isinstance(pattern, str | os.PathLike) else list(pattern)
    if not patterns:
        raise ValueError("no shard pattern given")
    found: set[str] = set()
    for item in patterns:
        for expanded in braceexpand(os.path.expanduser(os.fspath(item))):
            is_glob = bool(set("*?[") & set(expanded))
            matches = glob(expanded) if is_glob else [expanded] if os.path.exists(expanded) else []
            if not matches:
                raise ValueError(f"no shard matches {expanded!r} (from {os.fspath(item)!r})")
            for path in matches:
                if not stat.S_ISREG(os.stat(path).st_mode):
                    raise ValueError(f"shard {path!r} is not a regular file")
                found.add(os.path.abspath(path))
    return sorted(found)


@dataclass(frozen=True)
class ShardIndex:
    """The samples of one shard: image member ``names``, data ``offsets`` and ``sizes``; ``problem`` if damaged."""

    names: list[str]
    offsets: list[int]
    sizes: list[int]
    problem: str | None = None

    def __len__(self) -> int:
        return len(self.names)


def _tar_members(path: str, problems: list[str]) -> Iterator[tarfile.TarInfo]:
    """Regular members with complete data, in archive order; the first sign of damage ends it (noted in problems)."""
    try:
        file_size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tf:
            while (member := tf.next()) is not None:
                tf.members = []  # type: ignore[attr-defined]  # keep no TarInfo list for a big shard
                if member.offset_data + member.size > file_size:
                    problems.append(f"truncated in {member.name!r}")
                    return
                if member.isreg():
                    yield member
            # tarfile stops silently at a garbled header; anything but zero padding past its stop is damage
            with open(path, "rb") as f:
                f.seek(tf.offset)
                if f.read(_TAR_BLOCK).strip(b"\0"):
                    problems.append(f"unreadable tar header at byte {tf.offset}")
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{type(e).__name__}: {e}")


def index_shard(path: str, extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS) -> ShardIndex:
    """Index the samples of a tar shard that carry an image (rules in the module docstring); never raises.

    Only member headers are read (~15 us per member with ``tarfile``); a damaged shard keeps the samples before the
    damage and says what went wrong in ``problem``.
    """
    rank = {ext: i for i, ext in enumerate(extensions)}
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    problems: list[str] = []
    key: str | None = None
    best: tuple[int, tarfile.TarInfo] | None = None

    def flush() -> None:
        if best is not None:
            names.append(best[1].name)
            offsets.append(best[1].offset_data)
            sizes.append(best[1].size)

    for member in _tar_members(path, problems):
        match = _KEY_EXT.match(member.name)
        if match is None or _META.match(member.name):
            continue
        member_key, ext = match.group(1), match.group(2).lower()
        if member_key != key:
            flush()
            key, best = member_key, None
        if ext in rank and (best is None or rank[ext] < best[0]):
            best = (rank[ext], member)
    flush()
    return ShardIndex(names, offsets, sizes, problems[0] if problems else None)


# ------------------------------------------------------------------------------------------------ member references
def member_ref(shard: str, name: str) -> str:
    """The reference ``<shard>::<member name>`` by which lists, manifests and ``load_image`` name a shard image."""
    return f"{shard}{TAR_MEMBER_SEP}{name}"


def split_member_ref(ref: str) -> tuple[str, str] | None:
    """(shard path, member name) of a member reference, or None when ``ref`` is not one (no ``.tar::``)."""
    shard, sep, name = ref.partition(TAR_MEMBER_SEP)
    if not sep or not name or not shard.lower().endswith(".tar"):
        return None
    return shard, name


def list_shard_images(
    pattern: str | os.PathLike[str], extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS
) -> list[str]:
    """Member references of every sample image of the shards named by ``pattern`` (sorted shards, archive order).

    The sample rules are those of training (``index_shard``); a damaged shard contributes the samples before the
    damage and is logged. No images at all is a ``ValueError``.
    """
    refs: list[str] = []
    for shard in expand_shards(pattern):
        index = index_shard(shard, extensions)
        if index.problem is not None:
            _log.warning("shard %s is damaged (%s); listing its first %d samples", shard, index.problem, len(index))
        refs += [member_ref(shard, name) for name in index.names]
    if not refs:
        raise ValueError(f"no images found in the shards {os.fspath(pattern)!r}")
    return refs


@functools.lru_cache(maxsize=_INDEX_CACHE)
def _member_table(shard: str, size: int, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of every regular member; keyed by size and mtime so a rewrite is seen."""
    return {m.name: (m.offset_data, m.size) for m in _tar_members(shard, [])}


def read_member(ref: str) -> bytes:
    """The bytes of the shard member ``ref`` names; ``BadImageError`` if the shard or the member cannot be read."""
    parsed = split_member_ref(ref)
    if parsed is None:
        raise ValueError(f"not a tar member reference (<shard>.tar{TAR_MEMBER_SEP}<member>): {ref!r}")
    shard, name = parsed
    try:
        st = os.stat(shard)
        table = _member_table(os.path.abspath(shard), st.st_size, st.st_mtime_ns)
        if name not in table:
            raise BadImageError(ref, f"no member {name!r} in the shard")
        offset, size = table[name]
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        raise BadImageError(ref, f"shard unreadable: {type(e).__name__}: {e}") from e
    if len(data) != size:
        raise BadImageError(ref, f"member truncated: {len(data)} of {size} bytes")
    return data


def _buffer_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of items 0..n-1 streamed through a shuffle buffer: a slot is drawn, emitted, and refilled."""
    if buffer_size <= 1 or n <= 1:
        return np.arange(n)
    draws = rng.random(n)  # exactly one draw per emitted item
    buffer = list(range(min(buffer_size, n)))
    incoming = len(buffer)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        slot = min(int(draws[i] * len(buffer)), len(buffer) - 1)
        out[i] = buffer[slot]
        if incoming < n:
            buffer[slot] = incoming
            incoming += 1
        else:  # draining: the last slot fills the hole
            buffer[slot] = buffer[-1]
            buffer.pop()
    return out


@dataclass(frozen=True)
class _Ref:
    """One sample of a reader's stream: its position ``q``, the shard and the sample's number in that shard."""

    q: int
    shard: str
    record: int


class ShardDataset(IterableDataset):
    """Lists of ``TrainSample`` ``(crops, -1, seed, bad_images)``, one list per batch, from tar shards.

    Use with ``DataLoader(dataset, batch_size=None, collate_fn=...)`` (``sampler.make_train_loader``); the loader's
    ``num_workers`` is part of the stream's definition. ``iter_batches`` plays one worker explicitly (tests, tools).
    ``buffer_size`` 0 or 1 keeps each shard's sample order (shards are still shuffled per epoch); ``shuffle=False``
    reads the sorted shards in order, for debugging.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        transform: Callable[[Any], Any],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
        shuffle: bool = True,
        buffer_size: int = 1000,
        extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_attempts: int = 20,
    ) -> None:
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if isinstance(extensions, str) or not extensions:
            raise ValueError(f"extensions must be a non-empty sequence like ('jpg', 'png'), got {extensions!r}")
        for name, value, low in [("batch_size", batch_size, 1), ("world_size", world_size, 1), ("rank", rank, 0),
                                 ("seed", seed, 0), ("start_step", start_step, 0), ("buffer_size", buffer_size, 0),
                                 ("max_attempts", max_attempts, 1)]:  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.shards = expand_shards(shards)
        self.transform = transform
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.start_step, self.shuffle, self.buffer_size = start_step, bool(shuffle), buffer_size
        self.extensions = tuple(e.lower().lstrip(".") for e in extensions)
        _check_max_pixels(max_pixels)
        self.max_pixels, self.max_attempts = max_pixels, max_attempts
        self._check_readers(world_size)
        self._counts: dict[str, int] = {}
        self._indexes: OrderedDict[str, ShardIndex] = OrderedDict()
        self._order_cache: tuple[tuple[int, int, int], np.ndarray] | None = None
        self._warned: set[str] = set()  # damaged shards already logged by this process

    def _check_readers(self, readers: int) -> None:
        if len(self.shards) < readers:
            raise ValueError(
                f"{len(self.shards)} shard(s) for {readers} readers (world_size x num_workers): every reader needs at "
                "least one shard per epoch; write more (smaller) shards or use fewer DataLoader workers"
            )

    # ------------------------------------------------------------------------------------------------------ indexing
    def _index(self, shard: str) -> ShardIndex:
        index = self._indexes.get(shard)
        if index is None:
            index = index_shard(shard, self.extensions)
            if index.problem is not None and shard not in self._warned:
                self._warned.add(shard)
                _log.warning("shard %s is damaged (%s); using its first %d samples", shard, index.problem, len(index))
            self._counts[shard] = len(index)
            self._indexes[shard] = index
            if len(self._indexes) > _INDEX_CACHE:
                self._indexes.popitem(last=False)
        else:
            self._indexes.move_to_end(shard)
        return index

    def _count(self, shard: str) -> int:
        return self._counts[shard] if shard in self._counts else len(self._index(shard))

    def count_samples(self) -> int:
        """Number of samples with an image in all shards (indexes every shard once)."""
        return sum(self._count(s) for s in self.shards)

    # -------------------------------------------------------------------------------------------------------- stream
    def _epoch_shards(self, epoch: int, reader: int, readers: int) -> list[str]:
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng(derive_seed(self.seed, SHARD_ORDER, epoch)).permutation(len(self.shards))
        return [self.shards[i] for i in order[reader::readers]]

    def _epoch_sizes(self, epoch: int, reader: int, readers: int) -> tuple[list[str], np.ndarray]:
        """(shards, cumulative sample counts) of one reader-epoch: cheap, needs shard counts only."""
        shards = self._epoch_shards(epoch, reader, readers)
        return shards, np.cumsum([self._count(s) for s in shards], dtype=np.int64)

    def _epoch_order(self, epoch: int, reader: int, readers: int, total: int) -> np.ndarray:
        """Emission order (sample numbers within the reader-epoch) after the shuffle buffer."""
        key = (epoch, reader, readers)
        if self._order_cache is None or self._order_cache[0] != key:
            rng = np.random.default_rng(derive_seed(self.seed, SHARD_BUFFER, readers, reader, epoch))
            self._order_cache = (key, _buffer_order(total, self.buffer_size if self.shuffle else 0, rng))
        return self._order_cache[1]

    def _stream(self, reader: int, readers: int, start: int) -> Iterator[_Ref]:
        """The reader's samples from stream position ``start`` on, across epochs, forever."""
        epoch, first = 0, 0
        while True:
            shards, ends = self._epoch_sizes(epoch, reader, readers)
            total = int(ends[-1]) if len(ends) else 0
            if total == 0 and (not self.shuffle or self.count_samples() == 0):
                # with shuffling, a later epoch hands this reader other shards; without, it never would
                raise RuntimeError(f"reader {reader} of {readers} finds no readable samples in its shards {shards}")
            if start < first + total:  # whole epochs before ``start`` are skipped without drawing their order
                order = self._epoch_order(epoch, reader, readers, total)
                for i in range(max(start - first, 0), total):
                    item = int(order[i])
                    s = int(np.searchsorted(ends, item, side="right"))
                    yield _Ref(first + i, shards[s], item - (int(ends[s - 1]) if s else 0))
            first += total
            epoch += 1

    def reader_epoch(self, epoch: int, *, reader: int, readers: int) -> list[tuple[str, str]]:
        """``(shard, image member)`` of one reader-epoch, in stream order (tests and inspection)."""
        shards, ends = self._epoch_sizes(epoch, reader, readers)
        order = self._epoch_order(epoch, reader, readers, int(ends[-1]) if len(ends) else 0)
        out = []
        for item in order.tolist():
            s = int(np.searchsorted(ends, item, side="right"))
            out.append((shards[s], self._index(shards[s]).names[item - (int(ends[s - 1]) if s else 0)]))
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Pickled into DataLoader workers without the per-process caches (each worker builds its own)."""
        return {**self.__dict__, "_indexes": OrderedDict(), "_order_cache": None, "_warned": set()}

    # ------------------------------------------------------------------------------------------------------- samples
    def _load(self, ref: _Ref, sample_seed: int) -> Any:
        index = self._index(ref.shard)
        name = f"{ref.shard}:{index.names[ref.record]}"
        with open(ref.shard, "rb") as f:
            f.seek(index.offsets[ref.record])
            data = f.read(index.sizes[ref.record])
        if len(data) != index.sizes[ref.record]:
            raise BadImageError(name, "shard shorter than its index (changed on disk?)")
        image = load_image_bytes(data, name, max_pixels=self.max_pixels)
        return seeded_call(self.transform, image, sample_seed)

    def _sample(self, candidates: Iterator[_Ref], sample_seed: int) -> TrainSample:
        """The first readable sample among ``candidates`` (the slot's own, then the stream's next ones)."""
        notes: list[tuple[str, str]] = []
        for ref in candidates:
            try:
                return TrainSample(self._load(ref, sample_seed), -1, sample_seed, tuple(notes))
            except BadImageError as e:
                notes.append((e.path, e.reason))
            except Exception as e:  # I/O or transform failure: replaced and reported, never fatal
                notes.append((f"{ref.shard}:#{ref.record}", f"{type(e).__name__}: {e}"))
            if len(notes) >= self.max_attempts:
                break
        raise RuntimeError(
            f"{len(notes)} samples in a row could not be loaded (the shards seem mostly unreadable, or the transform "
            f"always fails); last: {notes[-1][0]}: {notes[-1][1]}"
        )

    def iter_batches(
        self, *, worker: int = 0, num_workers: int = 1, rank: int | None = None, world_size: int | None = None
    ) -> Iterator[list[TrainSample]]:
        """The batches DataLoader worker ``worker`` of ``num_workers`` yields: steps start_step + worker + t * K."""
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        if not 0 <= worker < num_workers or not 0 <= rank < world_size:
            raise ValueError(f"worker {worker} of {num_workers}, rank {rank} of {world_size}: out of range")
        readers = world_size * num_workers
        self._check_readers(readers)
        role = (self.start_step + worker) % num_workers
        reader = rank * num_workers + role
        stream = self._stream(reader, readers, ((self.start_step + worker) // num_workers) * self.batch_size)
        ahead: deque[_Ref] = deque()

        def candidates(first: _Ref) -> Iterator[_Ref]:
            yield first
            for i in range(self.max_attempts - 1):
                while len(ahead) <= i:
                    ahead.append(next(stream))
                yield ahead[i]

        while True:
            batch = []
            for _ in range(self.batch_size):
                ref = ahead.popleft() if ahead else next(stream)
                seed = derive_seed(self.seed, SHARD_SAMPLE, readers, reader, ref.q)
                batch.append(self._sample(candidates(ref), seed))
            yield batch

    def __iter__(self) -> Iterator[list[TrainSample]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_batches(worker=worker, num_workers=num_workers)
