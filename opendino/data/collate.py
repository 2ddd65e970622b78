"""Training collate: multi-crop samples -> ``Batch`` (crops stacked crop-major, iBOT masks and their bookkeeping).

Follows ``collate_data_and_cast`` of the official DINOv2 code (dinov2/data/collate.py): global crops are stacked
crop-major (crop 0 of every image, then crop 1), local crops likewise; masks come from ``masking.batch_masks`` with
the official sequence of random draws. Two deliberate differences: crops stay float32 (the training step casts or
autocasts), and the masks are drawn from a ``random.Random`` seeded with the batch's first sample seed instead of
the process-wide ``random``. When the loader gives each sample a seed that depends only on the run seed and the
sample's position in the epoch, batch k's masks depend only on (run seed, k): the same with any number of
DataLoader workers, and the same after a resume.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from opendino.data.masking import MaskingGenerator, batch_masks, check_mask_args

__all__ = ["Batch", "SSLCollate", "TrainSample"]


class TrainSample(NamedTuple):
    """One training image after augmentation, as the dataset hands it to ``SSLCollate``."""

    crops: dict[str, list[torch.Tensor]]  # MultiCropAugmentation output: "global_crops", "local_crops"
    index: int  # type: ignore[assignment]  # shadows tuple.index; dataset index of the image (-1 if none)
    seed: int  # the sample's seed (torch.manual_seed before the augmentation); the first one seeds the batch masks
    bad_images: tuple[tuple[str, str], ...] = ()  # (path or index, reason) of unreadable images this one replaced


@dataclass
class Batch:
    """A collated training batch of ``n_images`` images; M = number of masked patch tokens in the batch."""

    global_crops: torch.Tensor  # (n_global * B, 3, G, G) float32, crop-major: crop 0 of all images, then crop 1
    local_crops: torch.Tensor  # (n_local * B, 3, L, L) float32, crop-major; (0, 3, 0, 0) without local crops
    masks: torch.Tensor  # (n_global * B, N) bool, row i masks global crop i; N = (G // patch) ** 2
    mask_indices: torch.Tensor  # (M,) long, positions of the True entries of masks.flatten()
    masks_weight: torch.Tensor  # (M,) float32, 1 / (masked tokens of the token's crop): each masked crop sums to 1
    n_masked_patches: torch.Tensor  # (1,) long, == M
    upperbound: int  # sum of int(N * ratio_max) over the masked crops: the official masked-token buffer size
    n_images: int  # B
    indices: torch.Tensor  # (B,) long, dataset indices of the images
    bad_images: list[tuple[str, str]]  # (path or index, reason) of images replaced while loading this batch

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        changes: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                changes[field.name] = fn(value)
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device`` (ints and lists are shared)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy with every tensor in pinned memory; ``DataLoader(pin_memory=True)`` calls this."""
        return self._map_tensors(lambda t: t.pin_memory())


def _stack_crop_major(samples: Sequence[TrainSample], key: str) -> torch.Tensor | None:
    counts = {len(s.crops[key]) for s in samples}
    if len(counts) != 1:
        raise ValueError(f"samples have different numbers of {key}: {sorted(counts)}")
    n_crops = counts.pop()
    if n_crops == 0:
        return None
    shapes = {tuple(crop.shape) for s in samples for crop in s.crops[key]}
    if len(shapes) != 1:
        raise ValueError(f"{key} have different shapes {sorted(shapes)}; the augmentation must give fixed sizes")
    return torch.stack([s.crops[key][i] for i in range(n_crops) for s in samples])


class SSLCollate:
    """``collate(samples) -> Batch`` for DINOv2 training; picklable, so it runs inside DataLoader workers.

    ``n_tokens`` is the number of patches of a global crop, (G // patch) ** 2, and must equal the generator's
    H * W. Of the 2B global crops, ``int(2B * mask_probability)`` get a block mask whose ratio of masked patches is
    spread over ``mask_ratio_min_max`` (official: 0.5 and (0.1, 0.5)). The masks are drawn from ``rng`` when given,
    otherwise from ``random.Random(samples[0].seed)``: with the same state the masks equal those of the official
    collate after ``random.seed`` with that state.
    """

    def __init__(
        self,
        mask_generator: MaskingGenerator,
        n_tokens: int,
        mask_probability: float = 0.5,
        mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    ) -> None:
        if not isinstance(mask_generator, MaskingGenerator):
            raise TypeError(f"mask_generator must be a MaskingGenerator, got {type(mask_generator).__name__}")
        if n_tokens != mask_generator.num_patches:
            raise ValueError(
                f"n_tokens ({n_tokens}) must equal the mask generator's H*W ({mask_generator.num_patches}), "
                "i.e. (global_crops_size // patch_size) ** 2"
            )
        self.mask_generator = mask_generator
        self.n_tokens = n_tokens
        self.mask_probability = float(mask_probability)
        self.mask_ratio_min_max = check_mask_args(mask_probability, mask_ratio_min_max)

    def __call__(self, samples: Sequence[TrainSample], rng: random.Random | None = None) -> Batch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        global_crops = _stack_crop_major(samples, "global_crops")
        if global_crops is None:
            raise ValueError("samples have no global crops")
        local_crops = _stack_crop_major(samples, "local_crops")
        if local_crops is None:
            local_crops = global_crops.new_zeros(0, global_crops.shape[1], 0, 0)
        if rng is None:
            rng = random.Random(samples[0].seed)
        masks, upperbound = batch_masks(
            self.mask_generator, len(global_crops), self.n_tokens, self.mask_probability, self.mask_ratio_min_max, rng
        )  # (n_global * B, N)
        mask_indices = masks.flatten().nonzero().flatten()  # (M,)
        per_crop = 1.0 / masks.sum(-1).clamp(min=1).to(torch.float32)  # (n_global * B,)
        masks_weight = per_crop.unsqueeze(-1).expand_as(masks)[masks]  # (M,)
        return Batch(
            global_crops=global_crops,
            local_crops=local_crops,
            masks=masks,
            mask_indices=mask_indices,
            masks_weight=masks_weight,
            n_masked_patches=torch.full((1,), len(mask_indices), dtype=torch.long),
            upperbound=upperbound,
            n_images=len(samples),
            indices=torch.tensor([s.index for s in samples], dtype=torch.long),
            bad_images=[note for s in samples for note in s.bad_images],
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.mask_generator!r}, n_tokens={self.n_tokens}, "
            f"mask_probability={self.mask_probability}, mask_ratio_min_max={self.mask_ratio_min_max})"
        )
