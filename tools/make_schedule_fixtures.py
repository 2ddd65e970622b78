#!/usr/bin/env python
"""Generate the schedule and parameter-group fixtures from the OFFICIAL facebookresearch/dinov2 code.

Our script; never imported by the library or the tests, which read only the numbers it writes. It runs on CPU:

* ``dinov2.utils.utils.CosineScheduler`` for a handful of settings (warm-up, no warm-up, total == warm-up as for the
  teacher temperature, ``freeze_iters``, empty);
* the official ``build_schedulers`` and ``apply_optim_scheduler`` (``dinov2/train/train.py``),
  ``build_optimizer`` (same file), ``apply_scaling_rules_to_cfg`` (``dinov2/utils/config.py``) and
  ``SSLMetaArch.get_params_groups`` with ``get_maybe_fused_params_for_submodel`` (``dinov2/train/ssl_meta_arch.py``)
  on tiny official ``DinoVisionTransformer`` + ``DINOHead`` students.

Importing ``dinov2.train`` or ``dinov2.utils.config`` needs fvcore / omegaconf and the whole training stack, which
opendino does not install. Instead of stubbing modules, the few functions named above are read from the official
source files with ``ast`` and executed unmodified, with their free names (``CosineScheduler``, ``logger``, ``math``,
``distributed.get_global_size``, the param-group helpers) bound to the official objects or to a tiny stand-in
(``distributed``: world size of the case; ``cfg``: a dict with attribute access). ``XFORMERS_DISABLED=1`` is set so
the official layers take their pure-PyTorch paths. Nothing of the official code is copied into opendino.

Usage (from the repository root; the committed files were made from dinov2 @ b8931f7):

    python tools/make_schedule_fixtures.py --official /path/to/dinov2 --out tests/fixtures/official

writes ``schedules.json`` and ``param_groups.json``; ``--check`` instead compares a fresh run with the files in
``--out`` and exits 1 on any difference. The output is deterministic (no random numbers reach it).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

# Official-code settings shared by the cases (ssl_default_config.yaml values where they matter).
LAYERWISE_DECAY = 0.9
PATCH_EMBED_LR_MULT = 0.2
BETAS = (0.9, 0.999)

COSINE_CASES = [
    dict(base_value=1e-3, final_value=1e-6, total_iters=120, warmup_iters=20, start_warmup_value=0),
    dict(base_value=0.04, final_value=0.4, total_iters=100),
    dict(base_value=0.992, final_value=1, total_iters=100),
    dict(base_value=0.07, final_value=0.07, total_iters=30, warmup_iters=30, start_warmup_value=0.04),
    dict(base_value=5e-4, final_value=1e-6, total_iters=100, warmup_iters=10, start_warmup_value=0, freeze_iters=15),
    dict(base_value=0.5, final_value=0.1, total_iters=7, warmup_iters=1, start_warmup_value=0.2, freeze_iters=2),
    dict(base_value=1.0, final_value=0.0, total_iters=0),
]

# build_schedulers on a shortened run: 12 "epochs" of 10 iterations.
SCHEDULER_CFG = dict(
    optim=dict(
        lr=0.004 * math.sqrt(256 / 1024),
        min_lr=1e-6,
        epochs=12,
        warmup_epochs=3,
        weight_decay=0.04,
        weight_decay_end=0.4,
        freeze_last_layer_epochs=2,
    ),
    teacher=dict(
        momentum_teacher=0.992,
        final_momentum_teacher=1,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=5,
    ),
    train=dict(OFFICIAL_EPOCH_LENGTH=10),
)
BEYOND = (0, 1, 37)  # offsets past the end of each schedule that are queried through __getitem__

SCALING_CASES = [(0.004, 64, 1), (0.004, 64, 16), (0.0002, 32, 96), (1e-3, 12, 7), (0.004, 1024, 1)]

HEAD = dict(in_dim=48, out_dim=20, hidden_dim=32, bottleneck_dim=16, nlayers=3)
BACKBONE_BASE = dict(
    img_size=32,
    patch_size=8,
    embed_dim=48,
    depth=3,
    num_heads=3,
    mlp_ratio=4,
    ffn_layer="mlp",
    init_values=1e-5,
    block_chunks=0,
    num_register_tokens=2,
)
PARAM_GROUP_CASES = {
    # flat blocks.<i> names, registers, LayerScale, separate iBOT head
    "flat": dict(backbone=BACKBONE_BASE, separate_ibot_head=True, layerwise_decay=LAYERWISE_DECAY),
    # blocks.<chunk>.<global index> names: two blocks per chunk so the two indices differ; SwiGLU names
    "chunked": dict(
        backbone={**BACKBONE_BASE, "depth": 4, "block_chunks": 2, "ffn_layer": "swiglufused", "num_register_tokens": 0},
        separate_ibot_head=False,
        layerwise_decay=LAYERWISE_DECAY,
    ),
    # vitl14.yaml: layerwise_decay 1.0, so blocks fuse with the tokens; no LayerScale, no biases
    "no_decay": dict(
        backbone={
            **BACKBONE_BASE,
            "block_chunks": 3,
            "init_values": None,
            "qkv_bias": False,
            "proj_bias": False,
            "ffn_bias": False,
        },
        separate_ibot_head=True,
        layerwise_decay=1.0,
    ),
}
APPLY_VALUES = dict(lr=3e-4, wd=0.07, last_layer_lr=2e-4)


class _AttrDict(dict):
    """cfg stand-in: the official functions read cfg.a.b and cfg.a["b"]."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e

    def __setattr__(self, key, value):
        self[key] = value


def _attrdict(d: dict) -> _AttrDict:
    return _AttrDict({k: _attrdict(v) if isinstance(v, dict) else v for k, v in d.items()})


def _official_functions(path: Path, names: list[str], namespace: dict, cls: str | None = None) -> dict:
    """Execute the named top-level functions (or methods of class `cls`) of an official source file, unmodified."""
    tree = ast.parse(path.read_text(), filename=str(path))
    body = tree.body
    if cls is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    nodes = [n for n in body if isinstance(n, ast.FunctionDef) and n.name in names]
    missing = set(names) - {n.name for n in nodes}
    if missing:
        raise SystemExit(f"{path}: functions {sorted(missing)} not found")
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return {n: namespace[n] for n in names}


def _git_commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_schedules(official: Path) -> dict:
    from dinov2.utils.utils import CosineScheduler

    cosine = []
    for kwargs in COSINE_CASES:
        s = CosineScheduler(**kwargs)
        beyond = [float(s[kwargs["total_iters"] + k]) for k in BEYOND]
        cosine.append(dict(kwargs=kwargs, values=s.schedule.tolist(), beyond=beyond))

    ns = {"CosineScheduler": CosineScheduler, "logger": logging.getLogger("dinov2")}
    build_schedulers = _official_functions(official / "dinov2/train/train.py", ["build_schedulers"], ns)[
        "build_schedulers"
    ]
    cfg = _attrdict(SCHEDULER_CFG)
    names = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")
    scheds = dict(zip(names, build_schedulers(cfg), strict=True))
    built = {
        "cfg": SCHEDULER_CFG,
        "values": {k: s.schedule.tolist() for k, s in scheds.items()},
        "beyond": {k: [float(s[s.total_iters + b]) for b in BEYOND] for k, s in scheds.items()},
    }

    scaled = []
    for base_lr, batch_per_gpu, world in SCALING_CASES:
        ns = {"math": math, "logger": logging.getLogger("dinov2")}
        ns["distributed"] = _attrdict({"get_global_size": lambda world=world: world})
        fn = _official_functions(official / "dinov2/utils/config.py", ["apply_scaling_rules_to_cfg"], ns)
        optim = dict(scaling_rule="sqrt_wrt_1024", base_lr=base_lr, lr=0.0)
        cfg = _attrdict(dict(optim=optim, train=dict(batch_size_per_gpu=batch_per_gpu)))
        lr = fn["apply_scaling_rules_to_cfg"](cfg).optim.lr
        scaled.append(dict(base_lr=base_lr, batch_size_per_gpu=batch_per_gpu, world_size=world, lr=lr))

    return {
        "cosine": cosine,
        "beyond_offsets": list(BEYOND),
        "build_schedulers": built,
        "scaled_lr": scaled,
    }


def make_param_groups(official: Path) -> dict:
    import torch
    from dinov2.layers import DINOHead
    from dinov2.models.vision_transformer import DinoVisionTransformer
    from dinov2.utils.param_groups import fuse_params_groups, get_params_groups_with_decay

    log = logging.getLogger("dinov2")
    meta_ns = {
        "get_params_groups_with_decay": get_params_groups_with_decay,
        "fuse_params_groups": fuse_params_groups,
        "logger": log,
    }
    methods = _official_functions(
        official / "dinov2/train/ssl_meta_arch.py",
        ["get_maybe_fused_params_for_submodel", "get_params_groups"],
        meta_ns,
        cls="SSLMetaArch",
    )
    train_ns = {"torch": torch, "logger": log}
    train_fns = _official_functions(
        official / "dinov2/train/train.py", ["build_optimizer", "apply_optim_scheduler"], train_ns
    )
    meta_cls = type("OfficialParamGroups", (), methods)

    cases = {}
    for name, case in PARAM_GROUP_CASES.items():
        torch.manual_seed(0)
        student = {"backbone": DinoVisionTransformer(**case["backbone"]), "dino_head": DINOHead(**HEAD)}
        if case["separate_ibot_head"]:
            student["ibot_head"] = DINOHead(**HEAD)
        meta = meta_cls()
        meta.student = student
        meta.cfg = _attrdict(
            dict(optim=dict(layerwise_decay=case["layerwise_decay"], patch_embed_lr_mult=PATCH_EMBED_LR_MULT))
        )
        groups = list(meta.get_params_groups())

        param_name = {id(p): (m, n) for m, mod in student.items() for n, p in mod.named_parameters()}
        described = []
        for g in groups:
            owners = [param_name[id(p)] for p in g["params"]]
            (module,) = {m for m, _ in owners}
            described.append(
                dict(
                    module=module,
                    lr_multiplier=g["lr_multiplier"],
                    wd_multiplier=g["wd_multiplier"],
                    is_last_layer=g["is_last_layer"],
                    foreach=g["foreach"],
                    param_names=[n for _, n in owners],
                )
            )
        cfg = _attrdict(dict(optim=dict(adamw_beta1=BETAS[0], adamw_beta2=BETAS[1])))
        optimizer = train_fns["build_optimizer"](cfg, groups)
        train_fns["apply_optim_scheduler"](optimizer, **APPLY_VALUES)
        applied = [dict(lr=g["lr"], weight_decay=g["weight_decay"]) for g in optimizer.param_groups]
        cases[name] = dict(
            backbone=case["backbone"],
            head=HEAD,
            separate_ibot_head=case["separate_ibot_head"],
            layerwise_decay=case["layerwise_decay"],
            patch_embed_lr_mult=PATCH_EMBED_LR_MULT,
            betas=list(BETAS),
            groups=described,
            apply_values=APPLY_VALUES,
            applied=applied,
        )
    return {"cases": cases}


def _dumps(obj) -> str:
    """Indented JSON with every list of scalars on one line (floats keep their exact round-trip repr)."""
    text = json.dumps(obj, indent=1)
    scalar_list = re.compile(
        r"\[\n\s*((?:(?:-?[\d.eE+-]+|true|false|null|\"[^\"\n]*\"),\n\s*)*"
        r"(?:-?[\d.eE+-]+|true|false|null|\"[^\"\n]*\"))\n\s*\]"
    )
    return scalar_list.sub(lambda m: "[" + ", ".join(s.strip() for s in m.group(1).split(",\n")) + "]", text) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, type=Path, help="checkout of facebookresearch/dinov2")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/official"))
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args(argv)
    official = args.official.resolve()
    if not (official / "dinov2/utils/param_groups.py").is_file():
        parser.error(f"{official} does not look like a facebookresearch/dinov2 checkout")

    os.environ["XFORMERS_DISABLED"] = "1"
    sys.path.insert(0, str(official))
    import warnings

    import numpy
    import torch

    warnings.filterwarnings("ignore", message="xFormers is")
    warnings.filterwarnings("ignore", message=".*weight_norm. is deprecated", category=FutureWarning)
    meta = dict(
        official_commit=_git_commit(official),
        generator="tools/make_schedule_fixtures.py",
        torch=torch.__version__.split("+")[0],
        numpy=numpy.__version__,
    )
    outputs = {
        "schedules.json": {"_meta": meta, **make_schedules(official)},
        "param_groups.json": {"_meta": meta, **make_param_groups(official)},
    }
    status = 0
    for fname, obj in outputs.items():
        text = _dumps(obj)
        path = args.out / fname
        if args.check:
            same = path.is_file() and path.read_text() == text
            print(f"{path}: {'identical' if same else 'DIFFERENT'}")
            status |= not same
        else:
            path.write_text(text)
            print(f"wrote {path} ({len(text)} bytes)")
    return status


if __name__ == "__main__":
    sys.exit(main())
