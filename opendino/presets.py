"""Training presets by name: the schema's defaults (= the official `ssl_default_config.yaml`) plus overrides.

`configs/<name>.yaml` are these presets written out with every key commented (`tools/make_config_presets.py`);
`opendino train <name>` uses them directly, so an installed package needs no `configs/` folder.
"""

from __future__ import annotations

from typing import Any

from opendino import config

__all__ = ["PRESETS", "preset_overrides", "render"]

OFFICIAL = "facebookresearch/dinov2 @ b8931f7, dinov2/configs"


def _patch14_large(arch: str, batch_size_per_gpu: int) -> dict[str, Any]:
    """The overrides that train/vitl14.yaml and train/vitg14.yaml share; they differ in arch and batch only."""
    return {
        "data": {"batch_size_per_gpu": batch_size_per_gpu},
        "crops": {"local_crops_size": 98},
        "model": {"arch": arch, "patch_size": 14, "drop_path_rate": 0.4, "ffn_layer": "swiglufused", "block_chunks": 4},
        "dino": {"head_n_prototypes": 131072, "head_bottleneck_dim": 384},
        "ibot": {"separate_head": True, "head_n_prototypes": 131072},
        "teacher": {"momentum_teacher": 0.994, "centering": "sinkhorn_knopp"},
        "optim": {"weight_decay_end": 0.2, "base_lr": 2.0e-4, "layerwise_decay": 1.0},
        "schedules": {"epochs": 500, "warmup_epochs": 80},
    }


PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "debug": (
        "Tiny ViT (patch 8) on 32 px global / 16 px local crops: CPU, seconds per step. For tests and smoke runs;\n"
        "the losses, schedules and EMA are the full recipe, only the sizes are small.",
        {
            "data": {"batch_size_per_gpu": 16, "num_workers": 0},
            "crops": {"global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 2},
            "model": {"arch": "debug", "patch_size": 8, "drop_path_rate": 0.1},
            "dino": {"head_n_prototypes": 256, "head_bottleneck_dim": 32, "head_hidden_dim": 128},
            "ibot": {"head_n_prototypes": 256, "head_bottleneck_dim": 32, "head_hidden_dim": 128},
            "schedules": {
                "epochs": 10,
                "epoch_length": 10,
                "warmup_epochs": 1,
                "warmup_teacher_temp_epochs": 3,
                "freeze_last_layer_epochs": 1,
            },
            "run": {"output_dir": "runs/debug", "checkpoint_every": 50, "log_every": 5},
        },
    ),
    "vits14": (
        f"ViT-S/14 with the official default recipe ({OFFICIAL}/ssl_default_config.yaml) and patch 14.\n"
        "The official repository publishes no from-scratch recipe for ViT-S (the released ViT-S/14 is distilled\n"
        "from ViT-g/14); this is the default recipe with the architecture changed, and 98 px local crops as in the\n"
        "official patch-14 recipes (96 is not a multiple of 14).",
        {"crops": {"local_crops_size": 98}, "model": {"arch": "vit_small", "patch_size": 14}},
    ),
    "vitb14": (
        f"ViT-B/14 with the official default recipe ({OFFICIAL}/ssl_default_config.yaml) and patch 14.\n"
        "The official repository publishes no from-scratch recipe for ViT-B (the released ViT-B/14 is distilled\n"
        "from ViT-g/14); this is the default recipe with the architecture changed, and 98 px local crops as in the\n"
        "official patch-14 recipes (96 is not a multiple of 14).",
        {"crops": {"local_crops_size": 98}, "model": {"arch": "vit_base", "patch_size": 14}},
    ),
    "vitl14": (
        f"ViT-L/14 as {OFFICIAL}/train/vitl14.yaml (ImageNet-22k in the paper; point data.source at your images).",
        _patch14_large("vit_large", batch_size_per_gpu=32),
    ),
    "vitg14": (
        f"ViT-g/14 as {OFFICIAL}/train/vitg14.yaml (the paper's main model; LVD-142M in the paper).",
        {**_patch14_large("vit_giant2", batch_size_per_gpu=12), "run": {"parallel": "fsdp"}},
    ),
    "vitl16_short": (
        f"ViT-L/16 on ImageNet-1k, 100 epochs: {OFFICIAL}/train/vitl16_short.yaml (the official README's\n"
        "reference run, about 82% kNN / 84.5% linear on ImageNet-1k with 4 nodes of 8 GPUs).",
        {"data": {"batch_size_per_gpu": 64}, "model": {"arch": "vit_large", "patch_size": 16, "block_chunks": 4}},
    ),
    "small_vits14": (
        "ViT-S/14 on one GPU and a small image set (thousands to a few hundred thousand images).\n"
        "Not an official recipe: fewer prototypes, lighter stochastic depth, a shorter schedule with 100-iteration\n"
        "epochs. A starting point, to be tuned on real data.",
        {
            "data": {"batch_size_per_gpu": 128},
            "crops": {"local_crops_size": 98},
            "model": {"arch": "vit_small", "patch_size": 14, "drop_path_rate": 0.1},
            "dino": {"head_n_prototypes": 16384},
            "ibot": {"head_n_prototypes": 16384},
            "schedules": {
                "epochs": 100,
                "epoch_length": 100,
                "warmup_epochs": 10,
                "warmup_teacher_temp_epochs": 30,
            },
            "run": {"output_dir": "runs/small_vits14", "checkpoint_every": 500, "log_every": 20},
        },
    ),
}


def preset_overrides(name: str) -> dict[str, Any]:
    """The overrides of preset `name` over the schema defaults (ConfigError for an unknown name)."""
    if name not in PRESETS:
        raise config.ConfigError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)} or a YAML file")
    return PRESETS[name][1]


def render(name: str) -> str:
    """Preset `name` as commented YAML (the content of configs/<name>.yaml)."""
    header, overrides = PRESETS[name][0], preset_overrides(name)
    cfg = config.load(config.TrainConfig, None, overrides)
    usage = f"Run: opendino train configs/{name}.yaml data.source=/path/to/images [key=value ...]"
    note = "Written by tools/make_config_presets.py from opendino/presets.py and opendino/config.py; edit there."
    return config.dump_yaml(cfg, f"{header}\n\n{usage}\n{note}")
