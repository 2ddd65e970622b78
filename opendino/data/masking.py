"""iBOT block masking: ``MaskingGenerator`` (one image) and ``batch_masks`` (the masks of a batch of global crops).

Block-wise masking as in BEiT / iBOT, with the semantics of the official DINOv2 code (dinov2/data/masking.py and the
mask part of ``collate_data_and_cast`` in dinov2/data/collate.py): rectangles of random area and aspect ratio are
added until the requested number of patches is reached or a step finds no rectangle that adds between one patch and
the remainder (rectangles may overlap, so a mask is a union of overlapping rectangles). The official code draws from
Python's module-level ``random``; here every draw comes from an explicit ``random.Random`` passed in, in the same
order, so ``random.Random(s)`` gives exactly the masks the official code gives after ``random.seed(s)``.
Masks are numpy bool arrays per image (as the official generator returns) and a torch bool tensor per batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["MaskingGenerator", "batch_masks", "check_mask_args"]

_ATTEMPTS = 10  # rectangles tried per step before the step gives up (official value)


def _grid(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        input_size = (input_size, input_size)
    if (
        not isinstance(input_size, Sequence)
        or len(input_size) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in input_size)
    ):
        raise ValueError(f"input_size must be a positive int or an (H, W) pair of positive ints, got {input_size!r}")
    return input_size[0], input_size[1]


class MaskingGenerator:
    """Random block masks over an (H, W) patch grid.

    ``mask = generator(num_masking_patches, rng)`` returns a numpy bool array of shape (H, W) with at most
    ``num_masking_patches`` True entries: usually exactly that many, a few fewer when 10 tries in a row find no
    rectangle that fits in the remainder. Each rectangle has an area drawn in [min_num_patches, remainder capped at
    ``max_num_patches``], an aspect ratio h/w log-uniform in [min_aspect, max_aspect] (default 1 / min_aspect), is
    narrower and lower than the grid, and is accepted if it adds between 1 and that capped remainder new patches.

    ``max_num_patches`` defaults to ``num_masking_patches`` (which is not used otherwise, as in the official class),
    and to the whole grid when both are None (where the official class would fail). The official training passes
    ``max_num_patches = 0.5 * H * W``, a float: keep it a float, the draws depend on its exact value.
    """

    def __init__(
        self,
        input_size: int | Sequence[int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = _grid(input_size)
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        if min_num_patches < 0:
            raise ValueError(f"min_num_patches must be >= 0, got {min_num_patches}")
        self.min_num_patches = min_num_patches
        cap = num_masking_patches if max_num_patches is None else max_num_patches
        self.max_num_patches: float = self.num_patches if cap is None else cap
        if self.max_num_patches < min_num_patches:
            raise ValueError(f"max_num_patches ({self.max_num_patches}) must be >= min_num_patches ({min_num_patches})")
        if not min_aspect > 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        max_aspect = max_aspect or 1 / min_aspect
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect ({max_aspect}) must be >= min_aspect ({min_aspect})")
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        lo, hi = (math.exp(v) for v in self.log_aspect_ratio)
        return (
            f"{type(self).__name__}({self.height}x{self.width}, block patches {self.min_num_patches}.."
            f"{self.max_num_patches}, aspect {lo:.3g}..{hi:.3g})"
        )

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, rng: random.Random) -> int:
        """Try up to 10 rectangles; fill the first that adds 1..max_mask_patches new patches; return how many."""
        for _ in range(_ATTEMPTS):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                added = h * w - int(block.sum())
                if 0 < added <= max_mask_patches:
                    block[...] = True
                    return added
        return 0

    def __call__(self, num_masking_patches: int, rng: random.Random) -> np.ndarray:
        """A (H, W) bool mask with at most (usually exactly) ``num_masking_patches`` True entries, drawn from rng."""
        if not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        return mask


def check_mask_args(mask_probability: float, mask_ratio_min_max: Sequence[float]) -> tuple[float, float]:
    """Validate the share of masked crops and the ratio range; returns the range as a float pair."""
    if not 0 <= mask_probability <= 1:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    if isinstance(mask_ratio_min_max, str) or len(mask_ratio_min_max) != 2:
        raise ValueError(f"mask_ratio_min_max must be a (min, max) pair, got {mask_ratio_min_max!r}")
    lo, hi = float(mask_ratio_min_max[0]), float(mask_ratio_min_max[1])
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {mask_ratio_min_max!r}")
    return lo, hi


def batch_masks(
    mask_generator: MaskingGenerator,
    n_crops: int,
    n_tokens: int,
    mask_probability: float,
    mask_ratio_min_max: Sequence[float],
    rng: random.Random,
) -> tuple[torch.Tensor, int]:
    """Masks of ``n_crops`` global crops: ``(masks (n_crops, n_tokens) bool, upperbound)``, as the official collate.

    ``int(n_crops * mask_probability)`` crops get a mask; the i-th of them masks ``int(n_tokens * U(p_i, p_i+1))``
    patches, p = linspace(min ratio, max ratio, n_masked + 1), so the ratios are spread evenly over the range.
    The rest get empty masks, then the list is shuffled. ``upperbound`` = sum of ``int(n_tokens * p_i+1)`` over the
    masked crops, the official size of the masked-token buffer. The ratios are float32 tensors as in the official
    code (the rounding of ``int(n_tokens * ratio)`` depends on it).
    """
    if isinstance(n_crops, bool) or not isinstance(n_crops, int) or n_crops <= 0:
        raise ValueError(f"n_crops must be a positive int, got {n_crops!r}")
    if n_tokens != mask_generator.num_patches:
        raise ValueError(f"n_tokens ({n_tokens}) must equal the mask generator's H*W ({mask_generator.num_patches})")
    lo_ratio, hi_ratio = check_mask_args(mask_probability, mask_ratio_min_max)
    n_masked = int(n_crops * mask_probability)
    probs = torch.linspace(lo_ratio, hi_ratio, n_masked + 1)  # float32, like the official
    upperbound = 0
    masks = []
    for i in range(n_masked):
        lo, hi = probs[i], probs[i + 1]
        ratio = lo + (hi - lo) * rng.random()  # == rng.uniform(lo, hi) in float32 tensor arithmetic
        masks.append(mask_generator(int(n_tokens * ratio), rng))
        upperbound += int(n_tokens * hi)
    masks += [mask_generator(0, rng) for _ in range(n_crops - n_masked)]
    rng.shuffle(masks)
    return torch.from_numpy(np.stack(masks)).reshape(n_crops, n_tokens), upperbound
