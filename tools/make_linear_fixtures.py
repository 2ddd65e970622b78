#!/usr/bin/env python
"""Generate the linear-probe fixtures from the OFFICIAL facebookresearch/dinov2 code (`dinov2/eval/linear.py`).

Our script; never imported by the library or the tests, which read only the numbers it writes. It runs on CPU:

* ``create_linear_input``, ``LinearClassifier``, ``AllClassifiers``, ``scale_lr`` and ``setup_linear_classifiers``
  are read from the official source with ``ast`` and executed unmodified (importing ``dinov2.eval.linear`` needs
  fvcore and torchmetrics, which opendino does not install); ``distributed`` is a one-process stand-in and
  ``nn.Module.cuda`` is the identity while they run, so the heads stay on the CPU.
* a few training iterations as ``eval_linear`` runs them (``dinov2/eval/linear.py:352-364``): the heads on the
  features of a batch, cross-entropy per head summed, ``SGD(momentum=0.9, weight_decay=0)`` over the official
  parameter groups, ``CosineAnnealingLR(max_iter, eta_min=0)`` stepped every iteration, on random "intermediate
  layers" (4 blocks of (patch tokens, class token)) with random labels.

Recorded: the head names in order, each head's input for the first batch, initial and final weights and biases, the
learning rate of every head at every iteration, and the names the official code gives the default grid at batch 128
(two of its 13 rates print alike, so the ModuleDict keeps 12 heads per feature config while the optimiser trains 13).

Usage (from the repository root; the committed files were made from dinov2 @ b8931f7):

    python tools/make_linear_fixtures.py --official /path/to/dinov2 --out tests/fixtures/official

writes ``linear_training.json`` and ``linear_training.safetensors``; ``--check`` instead compares a fresh run with
the files in ``--out`` and exits 1 on any difference. Seeded: the output is the same on every run.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

EMBED_DIM = 8
N_PATCH = 4
N_BLOCKS = 4
BATCH = 6
NUM_CLASSES = 5
ITERATIONS = 7
LEARNING_RATES = [1.0, 5.0, 20.0]  # x BATCH / 256 = 0.0234, 0.117, 0.469: large enough to move in 7 steps
DEFAULT_GRID = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]
OFFICIAL_NAMES = ["create_linear_input", "LinearClassifier", "AllClassifiers", "scale_lr", "setup_linear_classifiers"]


class _OneProcess:
    @staticmethod
    def get_global_size() -> int:
        return 1

    @staticmethod
    def is_enabled() -> bool:
        return False


def _official(path: Path) -> dict:
    """The named top-level functions and classes of the official linear.py, executed unmodified."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name in OFFICIAL_NAMES]
    missing = set(OFFICIAL_NAMES) - {n.name for n in nodes}
    if missing:
        raise SystemExit(f"{path}: {sorted(missing)} not found")
    namespace: dict = {"torch": torch, "nn": nn, "distributed": _OneProcess}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def _setup(official: dict, sample, learning_rates, batch_size: int):
    cuda = nn.Module.cuda
    nn.Module.cuda = lambda self, device=None: self  # type: ignore[method-assign]
    try:
        return official["setup_linear_classifiers"](sample, [1, 4], learning_rates, batch_size, NUM_CLASSES)
    finally:
        nn.Module.cuda = cuda  # type: ignore[method-assign]


def make(official_root: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    official = _official(official_root / "dinov2/eval/linear.py")
    gen = torch.Generator().manual_seed(0)
    patch = torch.randn(ITERATIONS, N_BLOCKS, BATCH, N_PATCH, EMBED_DIM, generator=gen)
    cls = torch.randn(ITERATIONS, N_BLOCKS, BATCH, EMBED_DIM, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (ITERATIONS, BATCH), generator=gen)

    def tokens(t: int) -> list[tuple[torch.Tensor, torch.Tensor]]:  # oldest block first, like get_intermediate_layers
        return [(patch[t, i], cls[t, i]) for i in range(N_BLOCKS)]

    torch.manual_seed(0)  # the official heads draw their init from the global generator
    classifiers, groups = _setup(official, tokens(0), LEARNING_RATES, BATCH)
    heads = classifiers.classifiers_dict
    names = list(heads)
    tensors: dict[str, torch.Tensor] = {"patch": patch, "cls": cls, "labels": labels}
    for k, name in enumerate(names):
        head = heads[name]
        tensors[f"input_{k}"] = official["create_linear_input"](tokens(0), head.use_n_blocks, head.use_avgpool)
        tensors[f"init_weight_{k}"] = head.linear.weight.detach().clone()
        tensors[f"init_bias_{k}"] = head.linear.bias.detach().clone()

    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, ITERATIONS, eta_min=0)
    lrs, losses = [], []
    for t in range(ITERATIONS):
        lrs.append([float(g["lr"]) for g in optimizer.param_groups])
        outputs = classifiers(tokens(t))
        loss = sum(nn.CrossEntropyLoss()(v, labels[t]) for v in outputs.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    for k, name in enumerate(names):
        tensors[f"final_weight_{k}"] = heads[name].linear.weight.detach().clone()
        tensors[f"final_bias_{k}"] = heads[name].linear.bias.detach().clone()

    default, default_groups = _setup(official, tokens(0), DEFAULT_GRID, 128)
    facts = {
        "source": "facebookresearch/dinov2 dinov2/eval/linear.py",
        "commit": _git_commit(official_root),
        "embed_dim": EMBED_DIM,
        "batch_size": BATCH,
        "num_classes": NUM_CLASSES,
        "iterations": ITERATIONS,
        "learning_rates": LEARNING_RATES,
        "heads": [{"name": n, "n_last_blocks": heads[n].use_n_blocks, "avgpool": heads[n].use_avgpool} for n in names],
        "scaled_lrs": [g["initial_lr"] for g in optimizer.param_groups],
        "lr_per_iteration": lrs,
        "loss_per_iteration": losses,
        "default_grid_batch_128": {
            "names": list(default.classifiers_dict),
            "param_groups": len(default_groups),
        },
    }
    return facts, {k: v.contiguous() for k, v in tensors.items()}


def _git_commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, default=Path("/work/ref/dinov2"), help="official dinov2 checkout")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/official"))
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args()
    sys.path.insert(0, str(args.official))
    facts, tensors = make(args.official)
    text = json.dumps(facts, indent=1) + "\n"
    json_path, st_path = args.out / "linear_training.json", args.out / "linear_training.safetensors"
    if args.check:
        old = load_file(str(st_path))
        same = json_path.read_text() == text and old.keys() == tensors.keys()
        same = same and all(torch.equal(old[k], v) for k, v in tensors.items())
        print("fixtures match" if same else "fixtures DIFFER")
        return 0 if same else 1
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(text)
    save_file(tensors, str(st_path))
    print(f"wrote {json_path} and {st_path} ({len(facts['heads'])} heads, {ITERATIONS} iterations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
