"""Tests for opendino.data.masking and opendino.data.collate: official parity of the masks, Batch contract, workers."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from opendino.data.augment import MultiCropAugmentation
from opendino.data.collate import Batch, SSLCollate, TrainSample
from opendino.data.masking import MaskingGenerator, batch_masks

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "official" / "masking.json").read_text())


def _official_generator(grid: int) -> MaskingGenerator:
    """As dinov2/train/train.py builds it: max_num_patches = 0.5 * N (a float)."""
    return MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)


def _flat_true(mask: np.ndarray | torch.Tensor) -> list[int]:
    return np.flatnonzero(np.asarray(mask)).tolist()


def _fake_samples(n_images: int, seed: int = 0, n_local: int = 2) -> list[TrainSample]:
    """Crop c of image i is the 1-element tensor [100 i + c] (global) / [100 i + 50 + c] (local), as the fixtures."""
    return [
        TrainSample(
            crops={
                "global_crops": [torch.tensor([100.0 * i + c]) for c in range(2)],
                "local_crops": [torch.tensor([100.0 * i + 50 + c]) for c in range(n_local)],
            },
            index=10 + i,
            seed=seed + i,
        )
        for i in range(n_images)
    ]


# ------------------------------------------------------------------------------------------------ official parity
@pytest.mark.parametrize("case", FIXTURES["generator"], ids=lambda c: f"seed{c['seed']}")
def test_generator_matches_official(case: dict) -> None:
    kwargs = dict(case["kwargs"])
    if isinstance(kwargs["input_size"], list):
        kwargs["input_size"] = tuple(kwargs["input_size"])
    generator = MaskingGenerator(**kwargs)
    rng = random.Random(case["seed"])
    for n, expected in zip(case["calls"], case["masks"], strict=True):
        mask = generator(n, rng)
        assert mask.dtype == np.bool_ and mask.shape == (generator.height, generator.width)
        assert _flat_true(mask) == expected, f"num_masking_patches={n}"
    assert rng.random() == case["next_random"]  # the same number of draws


@pytest.mark.parametrize(
    "case", FIXTURES["collate"], ids=lambda c: f"B{c['n_images']}-grid{c['grid']}-p{c['mask_probability']}"
)
def test_collate_matches_official(case: dict) -> None:
    collate = SSLCollate(
        _official_generator(case["grid"]), case["n_tokens"], case["mask_probability"], tuple(case["mask_ratio_min_max"])
    )
    samples = _fake_samples(case["n_images"])
    rng = random.Random(case["seed"])
    for expected in case["batches"]:  # consecutive batches from one stream, as the official global random
        batch = collate(samples, rng)
        assert [_flat_true(row) for row in batch.masks] == expected["masks"]
        weights = [w for w, n in expected["masks_weight_runs"] for _ in range(n)]
        assert batch.masks_weight.dtype == torch.float32 and expected["masks_weight_dtype"] == "torch.float32"
        assert torch.equal(batch.masks_weight, torch.tensor(weights, dtype=torch.float32))
        assert expected["mask_indices_ok"] and batch.mask_indices.tolist() == _flat_true(batch.masks.flatten())
        assert batch.upperbound == expected["upperbound"]
        assert batch.n_masked_patches.tolist() == expected["n_masked_patches"]
        assert batch.global_crops.flatten().int().tolist() == expected["global_codes"]
        assert batch.local_crops.flatten().int().tolist() == expected["local_codes"]
    assert rng.random() == case["next_random"]


def test_collate_seeds_masks_from_first_sample() -> None:
    """Without an explicit rng the batch masks come from random.Random(samples[0].seed)."""
    case = FIXTURES["collate"][0]
    collate = SSLCollate(_official_generator(case["grid"]), case["n_tokens"])
    batch = collate(_fake_samples(case["n_images"], seed=case["seed"]))
    assert [_flat_true(row) for row in batch.masks] == case["batches"][0]["masks"]


# --------------------------------------------------------------------------------------------- mask properties
@pytest.mark.parametrize(("n_images", "grid", "seed"), [(4, 16, 0), (7, 14, 1), (16, 16, 2), (1, 8, 3)])
def test_batch_masks_properties(n_images: int, grid: int, seed: int) -> None:
    n_tokens, n_crops = grid * grid, 2 * n_images
    masks, upperbound = batch_masks(_official_generator(grid), n_crops, n_tokens, 0.5, (0.1, 0.5), random.Random(seed))
    assert masks.shape == (n_crops, n_tokens) and masks.dtype == torch.bool
    counts = masks.sum(-1)
    n_masked = int(n_crops * 0.5)
    # with ratios >= 0.1 every masked crop has a target >= 4 patches, and the first block always fits
    assert int((counts > 0).sum()) == n_masked
    # the i-th masked crop gets at most int(N * p_{i+1}) patches (never more than its target), whatever the shuffle
    bounds = [int(n_tokens * p) for p in torch.linspace(0.1, 0.5, n_masked + 1)[1:]]
    assert all(c <= b for c, b in zip(sorted(counts[counts > 0].tolist()), sorted(bounds), strict=True))
    assert int(counts.sum()) <= upperbound == sum(bounds)
    # and at least the smallest target, less the one or two patches the generator may fall short by
    assert int(counts[counts > 0].min()) >= int(n_tokens * 0.1) - 2


def test_generator_reaches_target_and_fills_rectangles(monkeypatch) -> None:
    """Every step fills one rectangle narrower and lower than the grid; the count never exceeds the target."""
    generator = MaskingGenerator((9, 12), max_num_patches=40)
    steps: list[tuple[np.ndarray, np.ndarray, int]] = []
    original = generator._add_block

    def recording(mask: np.ndarray, cap: float, rng: random.Random) -> int:
        before = mask.copy()
        added = original(mask, cap, rng)
        steps.append((before, mask.copy(), added))
        assert added <= cap
        return added

    monkeypatch.setattr(generator, "_add_block", recording)
    rng = random.Random(0)
    exact = 0
    for target in [int(v) for v in np.linspace(4, 80, 40)]:
        steps.clear()
        mask = generator(target, rng)
        assert mask.sum() <= target
        exact += int(mask.sum()) == target
        for before, after, added in steps:
            new = after & ~before
            assert int(new.sum()) == added and not (before & ~after).any()
            if added:
                rows, cols = np.nonzero(new)
                box = after[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
                assert box.all()  # the new patches lie in a rectangle that is masked entirely afterwards
                assert rows.max() - rows.min() + 1 < 9 and cols.max() - cols.min() + 1 < 12
    assert exact >= 30  # the target is reached in most cases


def test_generator_uses_only_the_given_rng() -> None:
    random.seed(5)
    state = random.getstate()
    generator = _official_generator(16)
    a = generator(100, random.Random(1))
    assert random.getstate() == state
    assert np.array_equal(a, generator(100, random.Random(1)))
    assert not np.array_equal(a, generator(100, random.Random(2)))


# ------------------------------------------------------------------------------------------------- the Batch
def test_batch_contract() -> None:
    n_images, grid = 3, 6
    collate = SSLCollate(_official_generator(grid), grid * grid, mask_probability=1.0, mask_ratio_min_max=(0.2, 0.5))
    samples = _fake_samples(n_images)
    samples[1] = samples[1]._replace(bad_images=(("a.jpg", "truncated"),))
    samples[2] = samples[2]._replace(bad_images=(("7", "empty file"), ("b.png", "bomb")))
    batch = collate(samples)
    assert isinstance(batch, Batch)
    # crop-major: crop c of image i at row c * B + i
    assert batch.global_crops.flatten().tolist() == [100.0 * i + c for c in range(2) for i in range(n_images)]
    assert batch.local_crops.flatten().tolist() == [100.0 * i + 50 + c for c in range(2) for i in range(n_images)]
    assert batch.n_images == n_images and batch.indices.tolist() == [10, 11, 12]
    assert batch.indices.dtype == torch.long
    assert batch.bad_images == [("a.jpg", "truncated"), ("7", "empty file"), ("b.png", "bomb")]
    # masks, indices and weights agree
    n_tokens = grid * grid
    assert batch.masks.shape == (2 * n_images, n_tokens)
    m = int(batch.masks.sum())
    assert batch.mask_indices.shape == (m,) and batch.mask_indices.dtype == torch.long
    assert batch.masks.flatten()[batch.mask_indices].all()
    assert torch.equal(batch.mask_indices, torch.sort(batch.mask_indices).values)
    assert batch.n_masked_patches.tolist() == [m] and batch.n_masked_patches.dtype == torch.long
    assert batch.masks_weight.shape == (m,) and batch.masks_weight.dtype == torch.float32
    per_crop = torch.zeros(2 * n_images).index_add_(0, batch.mask_indices // n_tokens, batch.masks_weight)
    masked = batch.masks.any(-1)
    torch.testing.assert_close(per_crop[masked], torch.ones(int(masked.sum())))
    assert (per_crop[~masked] == 0).all()


def test_collate_without_local_crops_and_without_masks() -> None:
    collate = SSLCollate(_official_generator(4), 16, mask_probability=0.0)
    batch = collate(_fake_samples(2, n_local=0))
    assert batch.local_crops.shape == (0, 1, 0, 0)  # fake crops have 1 "channel"; no local crop size to report
    assert not batch.masks.any() and batch.mask_indices.numel() == 0 and batch.masks_weight.numel() == 0
    assert batch.upperbound == 0 and batch.n_masked_patches.tolist() == [0]


def test_batch_to_and_pin_memory(monkeypatch) -> None:
    batch = SSLCollate(_official_generator(4), 16)(_fake_samples(2))
    moved = batch.to("meta")
    tensors = [f for f in vars(moved).values() if isinstance(f, torch.Tensor)]
    assert len(tensors) == 7 and all(t.device.type == "meta" for t in tensors)
    assert moved.upperbound == batch.upperbound and moved.bad_images == batch.bad_images
    assert batch.masks.device.type == "cpu"  # a copy, the original is untouched
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: t + 0 if t.dtype != torch.bool else t.clone())
    pinned = batch.pin_memory()
    assert pinned is not batch and torch.equal(pinned.masks, batch.masks)
    assert pinned.global_crops.data_ptr() != batch.global_crops.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_batch_pin_memory_cuda() -> None:
    batch = SSLCollate(_official_generator(4), 16)(_fake_samples(2)).pin_memory()
    assert batch.global_crops.is_pinned() and batch.masks.is_pinned()
    assert batch.to("cuda", non_blocking=True).masks.is_cuda


# ---------------------------------------------------------------------------------------- determinism, workers
class _TinyImages(Dataset):
    """Images augmented under torch.manual_seed(seed), seed = a function of (run seed, index) only."""

    def __init__(self, n: int, run_seed: int) -> None:
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)) for _ in range(n)]
        self.run_seed = run_seed
        self.augment = MultiCropAugmentation(global_crops_size=16, local_crops_size=8, local_crops_number=2)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> TrainSample:
        seed = self.run_seed * 1_000_003 + index
        torch.manual_seed(seed)
        return TrainSample(self.augment(self.images[index]), index, seed)


def _batches(num_workers: int) -> list[Batch]:
    collate = SSLCollate(_official_generator(4), 16)  # 16 px global crops, patch 4
    loader = DataLoader(_TinyImages(9, run_seed=7), batch_size=3, collate_fn=collate, num_workers=num_workers)
    return list(loader)


def _assert_same(a: Batch, b: Batch) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name


def test_dataloader_workers_give_the_same_batches() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: thread sync would dominate
    try:
        single = _batches(num_workers=0)
        assert len(single) == 3 and single[0].global_crops.shape == (6, 3, 16, 16)
        assert single[0].local_crops.shape == (6, 3, 8, 8) and single[0].masks.shape == (6, 16)
        for a, b in zip(single, _batches(num_workers=2), strict=True):
            _assert_same(a, b)
        assert not torch.equal(single[0].masks, single[1].masks)
    finally:
        torch.set_num_threads(threads)


def test_collate_is_picklable_and_deterministic() -> None:
    collate = SSLCollate(_official_generator(8), 64)
    clone = pickle.loads(pickle.dumps(collate))
    samples = _fake_samples(5, seed=42)
    _assert_same(collate(samples), clone(samples))
    other = collate(_fake_samples(5, seed=43))
    assert not torch.equal(collate(samples).masks, other.masks)
    assert pickle.loads(pickle.dumps(TrainSample({"global_crops": [], "local_crops": []}, 1, 2))).seed == 2


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_size": 0}, "input_size"),
        ({"input_size": (4, 4, 4)}, "input_size"),
        ({"input_size": (4.0, 4)}, "input_size"),
        ({"input_size": 4, "min_aspect": 0.0}, "min_aspect"),
        ({"input_size": 4, "min_aspect": 0.5, "max_aspect": 0.4}, "max_aspect"),
        ({"input_size": 4, "min_num_patches": -1}, "min_num_patches"),
        ({"input_size": 4, "max_num_patches": 2}, "max_num_patches"),
    ],
)
def test_generator_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MaskingGenerator(**kwargs)


def test_generator_defaults_and_rng_type() -> None:
    assert MaskingGenerator(5).max_num_patches == 25  # no cap given: the whole grid (the official would fail)
    assert MaskingGenerator(5, num_masking_patches=10).max_num_patches == 10
    with pytest.raises(TypeError, match=r"random\.Random"):
        MaskingGenerator(5)(4, np.random.default_rng(0))  # type: ignore[arg-type]


def test_collate_bad_arguments_and_samples() -> None:
    generator = _official_generator(4)
    with pytest.raises(ValueError, match="n_tokens"):
        SSLCollate(generator, 15)
    with pytest.raises(ValueError, match="mask_probability"):
        SSLCollate(generator, 16, mask_probability=1.5)
    with pytest.raises(ValueError, match="mask_ratio_min_max"):
        SSLCollate(generator, 16, mask_ratio_min_max=(0.5, 0.1))
    with pytest.raises(TypeError, match="MaskingGenerator"):
        SSLCollate("generator", 16)  # type: ignore[arg-type]
    collate = SSLCollate(generator, 16)
    with pytest.raises(ValueError, match="empty"):
        collate([])
    samples = _fake_samples(2)
    with pytest.raises(ValueError, match="numbers of local_crops"):
        collate([samples[0], _fake_samples(1, n_local=3)[0]])
    odd = samples[1]._replace(crops={**samples[1].crops, "global_crops": [torch.zeros(2), torch.zeros(2)]})
    with pytest.raises(ValueError, match="different shapes"):
        collate([samples[0], odd])
    with pytest.raises(ValueError, match="n_crops"):
        batch_masks(generator, 0, 16, 0.5, (0.1, 0.5), random.Random(0))
