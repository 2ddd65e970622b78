#!/usr/bin/env python
"""Generate the data-pipeline parity fixtures (iBOT masks, multi-crop augmentation) from the OFFICIAL DINOv2 code.

This script is ours; it imports ``dinov2.data.masking.MaskingGenerator``, ``dinov2.data.collate.collate_data_and_cast``
and ``dinov2.data.augmentations.DataAugmentationDINO`` from a checkout of facebookresearch/dinov2 (the committed
fixtures come from commit b8931f7bf91576930313be2c6d6af376033b35f0) and writes only the numbers they produce. The
tests read those numbers and never import the official code.

Usage (from the repository root; needs torch, torchvision, numpy, pillow, safetensors, all opendino dependencies):

    python tools/make_masking_fixtures.py --official /path/to/dinov2 --out tests/fixtures/official

Outputs:

* ``masking.json``: ``generator`` cases (``random.seed(seed)``, then ``MaskingGenerator(**kwargs)`` called with
  each of ``calls`` in turn) and ``collate`` cases (``random.seed(seed)``, then ``collate_data_and_cast`` on
  ``n_batches`` consecutive batches of fake crops). A mask is stored as the flat indices of its True entries,
  ``masks_weight`` run-length encoded as [[value, count], ...]; ``mask_indices_ok`` says that the official
  ``mask_indices_list`` equals the flat True positions of the batch masks; ``next_random`` is ``random.random()``
  drawn right after, so the number of draws consumed is checked too.
  Fake crop ``c`` of image ``i`` is the 1-element tensor ``[100 * i + c]`` (global) / ``[100 * i + 50 + c]`` (local),
  so ``global_codes`` / ``local_codes`` record the stacking order.
* ``multicrop.safetensors``: the official augmentation (2 global crops of 16 px, 2 local crops of 8 px) of a fixed
  random 52x36 RGB image after ``torch.manual_seed(seed)``, seeds 0..15, with blur as the official code runs it
  (probabilities 0.0 / 0.9 / 0.5). The normalised float crops are stored
  de-normalised as the exact uint8 values the pipeline had before ``ToTensor`` (``seed<s>.global`` (2, 3, 16, 16),
  ``seed<s>.local`` (2, 3, 8, 8)); ``seed<s>.next_rand`` is ``torch.rand(1)`` drawn right after; ``image`` is the
  input (H, W, 3) uint8. The metadata key ``meta`` (JSON) holds the arguments and how often blur and solarisation
  ran over these seeds.

Running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# MaskingGenerator cases: constructor kwargs, seed, and the num_masking_patches of successive calls.
GENERATOR_CASES = [
    {"kwargs": {"input_size": (16, 16), "max_num_patches": 0.5 * 256}, "seed": 0, "calls": [0, 25, 51, 102, 128, 3]},
    {"kwargs": {"input_size": (14, 14), "max_num_patches": 0.5 * 196}, "seed": 1, "calls": [19, 98, 60, 196, 40]},
    {
        "kwargs": {"input_size": (7, 11), "num_masking_patches": 30, "min_aspect": 0.5, "max_aspect": 3.0},
        "seed": 2,
        "calls": [30, 10, 77, 5],
    },
    {"kwargs": {"input_size": (4, 4), "max_num_patches": 8.0}, "seed": 3, "calls": [1, 4, 8, 8, 16]},
    {"kwargs": {"input_size": 9, "min_num_patches": 2, "max_num_patches": 20}, "seed": 4, "calls": [20, 40, 2]},
]

# collate_data_and_cast cases: images per batch, patch grid side, mask probability, ratio range, seed, batches.
COLLATE_CASES = [
    {"n_images": 4, "grid": 16, "mask_probability": 0.5, "mask_ratio_min_max": (0.1, 0.5), "seed": 0, "n_batches": 2},
    {"n_images": 3, "grid": 14, "mask_probability": 0.5, "mask_ratio_min_max": (0.1, 0.5), "seed": 1, "n_batches": 2},
    {"n_images": 8, "grid": 16, "mask_probability": 0.5, "mask_ratio_min_max": (0.1, 0.5), "seed": 2, "n_batches": 1},
    {"n_images": 5, "grid": 7, "mask_probability": 0.3, "mask_ratio_min_max": (0.2, 0.6), "seed": 3, "n_batches": 2},
    {"n_images": 2, "grid": 4, "mask_probability": 1.0, "mask_ratio_min_max": (0.0, 0.5), "seed": 4, "n_batches": 3},
    {"n_images": 3, "grid": 6, "mask_probability": 0.0, "mask_ratio_min_max": (0.1, 0.5), "seed": 5, "n_batches": 1},
    {"n_images": 1, "grid": 16, "mask_probability": 0.5, "mask_ratio_min_max": (0.1, 0.5), "seed": 6, "n_batches": 2},
]

MULTICROP = {
    "global_crops_scale": (0.32, 1.0),
    "local_crops_scale": (0.05, 0.32),
    "local_crops_number": 2,
    "global_crops_size": 16,
    "local_crops_size": 8,
}
MULTICROP_SEEDS = range(16)
IMAGE_SEED = 20240602


def _flat_true(mask) -> list[int]:
    return [int(i) for i in np.flatnonzero(np.asarray(mask))]


def _runs(values: list[float]) -> list[list[float]]:
    """Run-length encoding [[value, count], ...] (masks_weight repeats one value per masked crop)."""
    runs: list[list[float]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return runs


def generator_fixtures(MaskingGenerator) -> list[dict]:
    cases = []
    for case in GENERATOR_CASES:
        generator = MaskingGenerator(**case["kwargs"])
        random.seed(case["seed"])
        masks = [_flat_true(generator(n)) for n in case["calls"]]
        cases.append({**case, "masks": masks, "next_random": random.random()})
    return cases


def _fake_crops(i: int) -> dict[str, list[torch.Tensor]]:
    return {
        "global_crops": [torch.tensor([100.0 * i + c]) for c in range(2)],
        "local_crops": [torch.tensor([100.0 * i + 50 + c]) for c in range(2)],
    }


def collate_fixtures(MaskingGenerator, collate_data_and_cast) -> list[dict]:
    cases = []
    for case in COLLATE_CASES:
        n_tokens = case["grid"] ** 2
        # as dinov2/train/train.py builds it for the training loop
        generator = MaskingGenerator(input_size=(case["grid"], case["grid"]), max_num_patches=0.5 * n_tokens)
        samples = [(_fake_crops(i), None) for i in range(case["n_images"])]  # (crops dict, target) as the dataset
        random.seed(case["seed"])
        batches = []
        for _ in range(case["n_batches"]):
            out = collate_data_and_cast(
                samples,
                mask_ratio_tuple=case["mask_ratio_min_max"],
                mask_probability=case["mask_probability"],
                dtype=torch.float32,
                n_tokens=n_tokens,
                mask_generator=generator,
            )
            batches.append(
                {
                    "masks": [_flat_true(row) for row in out["collated_masks"]],
                    "mask_indices_ok": out["mask_indices_list"].tolist() == _flat_true(out["collated_masks"]),
                    "masks_weight_runs": _runs(out["masks_weight"].tolist()),
                    "masks_weight_dtype": str(out["masks_weight"].dtype),
                    "upperbound": int(out["upperbound"]),
                    "n_masked_patches": out["n_masked_patches"].tolist(),
                    "global_codes": out["collated_global_crops"].flatten().int().tolist(),
                    "local_codes": out["collated_local_crops"].flatten().int().tolist(),
                }
            )
        cases.append({**case, "n_tokens": n_tokens, "batches": batches, "next_random": random.random()})
    return cases


def _to_uint8(crop: torch.Tensor) -> torch.Tensor:
    """Undo ToTensor + Normalize; the values were uint8 before, so the inversion must land on integers."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    values = (crop.double() * std.double() + mean.double()) * 255
    rounded = values.round()
    if (values - rounded).abs().max() > 1e-3:
        raise SystemExit("de-normalised crop is not integral: the official pipeline changed")
    return rounded.to(torch.uint8)


def multicrop_fixtures(DataAugmentationDINO, tv_functional) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    image = np.random.default_rng(IMAGE_SEED).integers(0, 256, (36, 52, 3), dtype=np.uint8)
    augmentation = DataAugmentationDINO(**MULTICROP)
    counts = {"gaussian_blur": 0, "solarize": 0}
    originals = {name: getattr(tv_functional, name) for name in counts}

    def counting(name):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return wrapped

    tensors: dict[str, torch.Tensor] = {"image": torch.from_numpy(image)}
    try:
        for name in counts:  # the official v1 transforms look these up on the module at call time
            setattr(tv_functional, name, counting(name))
        for seed in MULTICROP_SEEDS:
            torch.manual_seed(seed)
            out = augmentation(Image.fromarray(image))
            tensors[f"seed{seed}.next_rand"] = torch.rand(1)
            tensors[f"seed{seed}.global"] = torch.stack([_to_uint8(c) for c in out["global_crops"]])
            tensors[f"seed{seed}.local"] = torch.stack([_to_uint8(c) for c in out["local_crops"]])
    finally:
        for name, fn in originals.items():
            setattr(tv_functional, name, fn)
    n = len(MULTICROP_SEEDS)
    meta = {
        "args": MULTICROP,
        "seeds": list(MULTICROP_SEEDS),
        "counts": {**counts, "crops": n * (2 + MULTICROP["local_crops_number"])},
        "torch": torch.__version__.split("+")[0],
    }
    # one key: safetensors writes the metadata map in hash order, which would change the bytes from run to run
    return tensors, {"meta": json.dumps(meta)}


def _commit(path: Path) -> str:
    result = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, type=Path, help="checkout of facebookresearch/dinov2")
    parser.add_argument("--out", default=Path("tests/fixtures/official"), type=Path, help="output folder")
    args = parser.parse_args(argv)
    official = args.official.resolve()
    if not (official / "dinov2" / "data" / "masking.py").is_file():
        parser.error(f"{official} does not look like a facebookresearch/dinov2 checkout")
    sys.path.insert(0, str(official))
    from dinov2.data.augmentations import DataAugmentationDINO
    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.masking import MaskingGenerator
    from torchvision.transforms import functional as tv_functional

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    masking = {
        "_meta": {"official_commit": _commit(official), "torch": torch.__version__.split("+")[0]},
        "generator": generator_fixtures(MaskingGenerator),
        "collate": collate_fixtures(MaskingGenerator, collate_data_and_cast),
    }
    (args.out / "masking.json").write_text(json.dumps(masking, separators=(",", ":")) + "\n")
    tensors, metadata = multicrop_fixtures(DataAugmentationDINO, tv_functional)
    save_file(tensors, str(args.out / "multicrop.safetensors"), metadata=metadata)
    print(f"wrote masking.json and multicrop.safetensors to {args.out}; {metadata['meta']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
