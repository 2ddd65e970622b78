"""Tests for opendino.data.sampler: the resumable infinite sampler and the bad-image-replacing TrainDataset."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from opendino.data.sampler import SAMPLE, InfiniteSampler, TrainDataset, TrainSample, derive_seed, make_train_loader


def _take(sampler: InfiniteSampler, n: int) -> list[tuple[int, int]]:
    return list(itertools.islice(sampler, n))


def _batches(sampler: InfiniteSampler, steps: int) -> list[list[tuple[int, int]]]:
    items = _take(sampler, steps * sampler.batch_size)
    return [items[i : i + sampler.batch_size] for i in range(0, len(items), sampler.batch_size)]


# ------------------------------------------------------------------------------------------------------------ sampler
def test_stream_is_deterministic_and_seed_dependent() -> None:
    a = _take(InfiniteSampler(17, batch_size=4, seed=3), 50)
    assert a == _take(InfiniteSampler(17, batch_size=4, seed=3), 50)
    assert [i for i, _ in a] != [i for i, _ in _take(InfiniteSampler(17, batch_size=4, seed=4), 50)]


def test_each_epoch_is_a_permutation_and_the_stream_runs_across_epochs() -> None:
    n, batch = 10, 3  # 10 is not a multiple of 3: batches straddle epoch boundaries
    items = _take(InfiniteSampler(n, batch_size=batch, seed=0), 3 * n + 2)  # 3 whole epochs and a bit
    indices = [i for i, _ in items]
    for epoch in range(3):
        assert sorted(indices[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert indices[:n] != indices[n : 2 * n]  # a fresh permutation each epoch


def test_no_shuffle_is_the_plain_order() -> None:
    items = _take(InfiniteSampler(4, batch_size=3, shuffle=False), 9)
    assert [i for i, _ in items] == [0, 1, 2, 3, 0, 1, 2, 3, 0]


@pytest.mark.parametrize(("batch", "world"), [(3, 2), (2, 3), (1, 6)])
def test_a_global_step_does_not_depend_on_how_the_global_batch_is_split(batch: int, world: int) -> None:
    """2 ranks x B (or 3 x B, 6 x B) together see, step by step, exactly what 1 rank x G sees."""
    single = _batches(InfiniteSampler(13, batch_size=batch * world, seed=7), 8)
    per_rank = [
        _batches(InfiniteSampler(13, batch_size=batch, rank=r, world_size=world, seed=7), 8) for r in range(world)
    ]
    for step in range(8):
        assert [item for r in range(world) for item in per_rank[r][step]] == single[step]


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2)])
def test_start_step_and_item_at_seek_to_the_skipped_position(rank: int, world: int) -> None:
    full = _batches(InfiniteSampler(11, batch_size=4, rank=rank, world_size=world, seed=5), 12)
    resumed = _batches(InfiniteSampler(11, batch_size=4, rank=rank, world_size=world, seed=5, start_step=7), 5)
    assert resumed == full[7:]
    sampler = InfiniteSampler(11, batch_size=4, rank=rank, world_size=world, seed=5)
    first = sampler.position_for_step(9)
    assert first == 9 * 4 * world + rank * 4
    assert [sampler.item_at(first + j) for j in range(4)] == full[9]


def test_sample_seeds_are_distinct_deterministic_and_63_bit() -> None:
    items = _take(InfiniteSampler(5, batch_size=8, seed=1), 4000)  # 800 epochs: indices repeat, seeds must not
    seeds = [s for _, s in items]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    assert seeds == [derive_seed(1, SAMPLE, p) for p in range(4000)]  # (run seed, tag, global position)
    assert seeds != [s for _, s in _take(InfiniteSampler(5, batch_size=8, seed=2), 4000)]


def test_weighted_sampling_follows_the_weights() -> None:
    weights = np.array([1.0, 2.0, 0.0, 3.0, 4.0])
    draws = np.array([i for i, _ in _take(InfiniteSampler(5, batch_size=10, weights=weights, seed=0), 20_000)])
    counts = np.bincount(draws, minlength=5)
    assert counts[2] == 0  # weight 0: never drawn
    expected = weights / weights.sum() * len(draws)
    chi2 = float(((counts - expected)[expected > 0] ** 2 / expected[expected > 0]).sum())
    assert chi2 < 18.5  # 3 degrees of freedom: p < 0.0004 under the right distribution
    again = [i for i, _ in _take(InfiniteSampler(5, batch_size=10, weights=weights, seed=0), 100)]
    assert again == draws[:100].tolist()


def test_one_epoch_is_held_at_a_time() -> None:
    sampler = InfiniteSampler(1000, batch_size=7)
    order5 = sampler.epoch_order(5).copy()
    sampler.item_at(10 * 1000 + 3)  # seeking far ahead draws only the target epoch
    assert sampler._cached is not None and sampler._cached[0] == 10
    assert np.array_equal(sampler.epoch_order(5), order5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0, "batch_size": 2}, "size"),
        ({"size": 4, "batch_size": 0}, "batch_size"),
        ({"size": 4, "batch_size": 2, "rank": 2, "world_size": 2}, "rank 2 out of range"),
        ({"size": 4, "batch_size": 2, "seed": -1}, "seed"),
        ({"size": 3, "batch_size": 2, "weights": [1.0, 2.0]}, "shape"),
        ({"size": 2, "batch_size": 2, "weights": [1.0, -1.0]}, "finite and >= 0"),
        ({"size": 2, "batch_size": 2, "weights": [1.0, float("nan")]}, "finite and >= 0"),
        ({"size": 2, "batch_size": 2, "weights": [0.0, 0.0]}, "all weights are 0"),
        ({"size": 2, "batch_size": 2, "weights": [1.0, 1.0], "shuffle": False}, "shuffle=True"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    size = kwargs.pop("size")
    with pytest.raises(ValueError, match=match):
        InfiniteSampler(size, **kwargs)


# ------------------------------------------------------------------------------------------------------- TrainDataset
def _colour(i: int) -> tuple[int, int, int]:
    return (i * 20 % 256, 255 - i, 100)


def _identify(img: Image.Image) -> tuple[int, float]:
    """(the first red value: which image; a torch random draw: which augmentation seed)."""
    return int(np.asarray(img)[0, 0, 0]), float(torch.rand(()))


def _picky(img: Image.Image) -> tuple[int, float]:
    """Fails on the image coloured like image 2, as a transform does on a pathological image."""
    if int(np.asarray(img)[0, 0, 0]) == _colour(2)[0]:
        raise ValueError("cannot augment this one")
    return _identify(img)


def _collate(samples: list[TrainSample]) -> tuple[list, list[int], list[int], list]:
    return (
        [s.crops for s in samples],
        [s.index for s in samples],
        [s.seed for s in samples],
        [s.bad_images for s in samples],
    )


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Eight 8x8 PNGs with a recognisable colour; index 3 is not an image and index 6 is missing."""
    root = tmp_path_factory.mktemp("train_images")
    paths = []
    for i in range(8):
        path = root / f"{i}.png"
        if i == 3:
            path.write_text("not an image")
        elif i != 6:
            Image.new("RGB", (8, 8), _colour(i)).save(path)
        paths.append(str(path))
    return paths


def test_good_images_are_transformed_under_their_sample_seed(image_paths: list[str]) -> None:
    ds = TrainDataset(image_paths, _identify)
    sample = ds[(4, 1234)]
    assert isinstance(sample, tuple) and len(sample) == 4  # positional users unpack it like a plain tuple
    (red, draw), index, seed, bad = sample
    assert (red, index, seed, bad) == (_colour(4)[0], 4, 1234, ())
    torch.manual_seed(1234)
    assert draw == float(torch.rand(()))


def test_the_global_rng_is_left_untouched(image_paths: list[str]) -> None:
    ds = TrainDataset(image_paths, _identify)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    first = ds[(0, 5)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12345)  # another global state: the same augmentation
    assert ds[(0, 5)] == first


@pytest.mark.parametrize("bad_index", [3, 6])
def test_bad_images_are_replaced_deterministically(image_paths: list[str], bad_index: int) -> None:
    ds = TrainDataset(image_paths, _identify)
    results = {seed: ds[(bad_index, seed)] for seed in range(20)}
    for seed, sample in results.items():
        assert sample == ds[(bad_index, seed)]  # same key, same replacement, same augmentation
        assert sample.index not in (3, 6) and sample.crops[0] == _colour(sample.index)[0]
        assert sample.seed == seed
        assert sample.bad_images[0][0] == image_paths[bad_index]
        assert all(path in (image_paths[3], image_paths[6]) for path, _ in sample.bad_images)
    assert len({s.index for s in results.values()}) > 1  # the replacement depends on the sample seed
    reasons = {r for s in results.values() for _, r in s.bad_images}
    assert any("not a recognised image format" in r for r in reasons) or any("no such file" in r for r in reasons)


def test_transform_failures_are_replaced_and_reported(image_paths: list[str]) -> None:
    sample = TrainDataset(image_paths, _picky)[(2, 7)]
    assert sample.index not in (2, 3, 6)
    assert sample.bad_images[0] == (image_paths[2], "transform failed: ValueError: cannot augment this one")


def test_an_unreadable_dataset_is_a_clear_error(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"missing{i}.jpg") for i in range(3)]
    with pytest.raises(RuntimeError, match="mostly unreadable"):
        TrainDataset(paths, _identify, max_attempts=5)[(0, 1)]
    with pytest.raises(TypeError, match="pairs of ints"):
        TrainDataset(paths, _identify)[0]  # a plain index: the sampler's items are (index, seed)


def test_dataloader_workers_do_not_change_the_batches(image_paths: list[str]) -> None:
    def run(num_workers: int) -> list:
        sampler = InfiniteSampler(len(image_paths), batch_size=3, seed=11, start_step=2)
        loader = make_train_loader(
            TrainDataset(image_paths, _identify), sampler=sampler, num_workers=num_workers, collate_fn=_collate
        )
        return list(itertools.islice(loader, 6))

    torch.manual_seed(0)
    state = torch.get_rng_state()
    in_process = run(0)
    assert torch.equal(torch.get_rng_state(), state)  # neither the loader nor the transforms drew from it
    assert in_process == run(2)
    assert all(len(batch[1]) == 3 for batch in in_process)
    assert any(bad for batch in in_process for bad in batch[3])  # the bad files were met, replaced and reported


def test_make_train_loader_wants_a_sampler_exactly_for_map_style_datasets(image_paths: list[str]) -> None:
    with pytest.raises(ValueError, match="pass a sampler with a map-style dataset"):
        make_train_loader(TrainDataset(image_paths, _identify))
