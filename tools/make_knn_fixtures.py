#!/usr/bin/env python
"""Generate the kNN parity fixture (tests/fixtures/official/knn_scores.safetensors) from the OFFICIAL DINOv2 kNN.

This script is ours and is never imported by opendino or its tests; they only read the numbers it writes.

It imports `KnnModule` (`dinov2/eval/knn.py`) and `ModelWithNormalize` (`dinov2/eval/utils.py`) from a checkout of
facebookresearch/dinov2 (the committed file was made from b8931f7bf91576930313be2c6d6af376033b35f0). Those modules
import torchmetrics and, through `dinov2.eval.setup`, omegaconf, which neither the official kNN math nor opendino
needs: empty stand-in modules take their place. A one-process gloo group is started because `KnnModule` broadcasts
and gathers without checking for one.

Inputs: random raw features (train 257 x 12 with labels in 0..5, queries 41 x 12, float32, seed 0) and one class
(6) that no training feature has, so num_classes = 7. Each run of the official pipeline: features through
`ModelWithNormalize(Identity)` (L2 normalisation), `KnnModule(train, labels, nb_knn, T, cpu, num_classes=7)` on the
queries. Two cases: the official defaults (nb_knn 10, 20, 100, 200; T 0.07) and nb_knn 1, 5, 7 with T 0.1 (a
maximum k that is not 200). Stored: `in.train`, `in.train_labels`, `in.queries` (raw), and `out.<case>.k<k>`
(class scores, 41 x 7); the metadata entry `cases` holds, as JSON, each case's ks and T, the official commit and
the torch version.

Usage (from the repository root; CPU, one thread; a rerun writes a byte-identical file):

    python tools/make_knn_fixtures.py --official /path/to/dinov2 --out tests/fixtures/official/knn_scores.safetensors
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

N_TRAIN, N_QUERIES, DIM, N_TRAIN_CLASSES, NUM_CLASSES = 257, 41, 12, 6, 7
CASES = {"default": ((10, 20, 100, 200), 0.07), "small": ((1, 5, 7), 0.1)}


def _stand_in(name: str, **attrs: object) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def _official(path: Path):
    """KnnModule and ModelWithNormalize, with the imports the kNN math does not use replaced by stand-ins."""
    sys.path.insert(0, str(path))
    placeholder = type("Placeholder", (), {})
    _stand_in("torchmetrics", Metric=placeholder, MetricCollection=placeholder, MetricTracker=placeholder)
    _stand_in("torchmetrics.classification", MulticlassAccuracy=placeholder)
    _stand_in("torchmetrics.utilities")
    _stand_in("torchmetrics.utilities.data", dim_zero_cat=None, select_topk=None)
    _stand_in("dinov2.eval.setup", get_args_parser=None, setup_and_build_model=None)
    from dinov2.eval.knn import KnnModule
    from dinov2.eval.utils import ModelWithNormalize

    return KnnModule, ModelWithNormalize


def _commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of facebookresearch/dinov2")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/official/knn_scores.safetensors"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    KnnModule, ModelWithNormalize = _official(args.official)
    with tempfile.TemporaryDirectory() as tmp:
        store = torch.distributed.FileStore(str(Path(tmp) / "store"), 1)
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            g = torch.Generator().manual_seed(0)
            train = torch.randn(N_TRAIN, DIM, generator=g)
            labels = torch.randint(0, N_TRAIN_CLASSES, (N_TRAIN,), generator=g)
            queries = torch.randn(N_QUERIES, DIM, generator=g)
            normalize = ModelWithNormalize(torch.nn.Identity())
            tensors = {"in.train": train, "in.train_labels": labels, "in.queries": queries}
            with torch.no_grad():
                for case, (ks, temperature) in CASES.items():
                    knn = KnnModule(normalize(train), labels, list(ks), temperature, torch.device("cpu"), NUM_CLASSES)
                    for k, scores in knn(normalize(queries)).items():
                        tensors[f"out.{case}.k{k}"] = scores.contiguous()
        finally:
            torch.distributed.destroy_process_group()
    meta = {
        "cases": json.dumps(
            {
                "cases": {c: {"ks": list(ks), "temperature": t} for c, (ks, t) in CASES.items()},
                "num_classes": NUM_CLASSES,
                "official_commit": _commit(args.official),
                "torch": torch.__version__,
            }
        )
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=meta)
    print(f"wrote {args.out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
