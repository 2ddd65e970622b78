"""Per-iteration schedules and AdamW parameter groups of DINOv2 training.

Reproduces facebookresearch/dinov2 at b8931f7: `CosineScheduler` (dinov2/utils/utils.py), `build_schedulers`,
`apply_optim_scheduler` and `build_optimizer` (dinov2/train/train.py), the `sqrt_wrt_1024` learning-rate scaling
(dinov2/utils/config.py) and `get_params_groups_with_decay` + `fuse_params_groups` (dinov2/utils/param_groups.py)
applied per student submodule as `SSLMetaArch.get_params_groups` does. Schedules are bit-exact and multipliers
exact against fixtures computed with the official code (tests/test_schedules.py).

Official behaviour kept on purpose:
- the warm-up is `np.linspace` with its endpoint, so the base value occurs twice (last warm-up and first cosine
  iteration); past its end a schedule returns its final value, which is what keeps the teacher temperature constant
  after its warm-up (that schedule is all warm-up);
- the last layer's learning rate is the lr schedule with its first `freeze_last_layer_epochs` epochs set to zero;
- weight decay is off only for names ending in `.bias` or containing `norm` or `gamma` (LayerScale): the
  cls / register / mask tokens, the position embedding and the heads' `last_layer.weight_g` are decayed.
  `no_wd_on_tokens=True` (ours, off by default) also exempts the four token parameters.
Our choices: the chunked block layout is read from the names (`blocks.<chunk>.<i>.*`) rather than from a flag, and
wrapper segments (`_orig_mod.`, `_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`) are dropped from names first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch
from torch import nn

__all__ = [
    "EPOCH_LENGTH",
    "SCALING_RULES",
    "TOKEN_NAMES",
    "Schedule",
    "Schedules",
    "apply_schedules",
    "build_optimizer",
    "build_schedules",
    "cosine_schedule",
    "layer_id",
    "param_groups",
    "param_multipliers",
    "scaled_lr",
]

EPOCH_LENGTH = 1250  # official train.OFFICIAL_EPOCH_LENGTH: an "epoch" is this many iterations, whatever the data
SCALING_RULES = ("sqrt_wrt_1024",)  # the only rule official apply_scaling_rules_to_cfg implements
TOKEN_NAMES = ("cls_token", "pos_embed", "mask_token", "register_tokens")
_LAYER0_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
_WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_GROUP_KEYS = ("lr_multiplier", "wd_multiplier", "is_last_layer")


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"{name}={value!r}: expected a non-negative integer")
    return int(value)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    return float(value)


# ---------------------------------------------------------------------------------------------------------- schedules
def scaled_lr(base_lr: float, global_batch: int, rule: str = "sqrt_wrt_1024") -> float:
    """The learning rate for `global_batch` images per step (batch_size_per_gpu * world_size).

    `sqrt_wrt_1024`: base_lr * sqrt(global_batch / 1024); the official code raises for any other rule.
    """
    if rule not in SCALING_RULES:
        raise ValueError(f"scaling rule {rule!r} is not supported: expected one of {SCALING_RULES}")
    if _count("global_batch", global_batch) == 0:
        raise ValueError("global_batch=0: expected a positive number of images per step")
    return _number("base_lr", base_lr) * math.sqrt(global_batch / 1024.0)


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    freeze_iters: int = 0,
) -> np.ndarray:
    """(total_iters,) float64: `freeze_iters` zeros, a linear warm-up from `start_warmup_value` to `base_value` over
    `warmup_iters` (endpoint included), then a half cosine from `base_value` towards `final_value` over the n =
    total - warmup - freeze remaining iterations (value at i: final + (base - final) * (1 + cos(pi * i / n)) / 2,
    so `final_value` itself is only reached past the end)."""
    base, final = _number("base_value", base_value), _number("final_value", final_value)
    start = _number("start_warmup_value", start_warmup_value)
    total = _count("total_iters", total_iters)
    warmup = _count("warmup_iters", warmup_iters)
    freeze = _count("freeze_iters", freeze_iters)
    n = total - warmup - freeze
    if n < 0:
        raise ValueError(f"total_iters={total} is shorter than warmup_iters={warmup} + freeze_iters={freeze}")
    iters = np.arange(n)
    # Same operations in the same order as the official code: the array is bit-identical.
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / n)) if n else np.zeros(0)
    return np.concatenate((np.zeros(freeze), np.linspace(start, base, warmup), cosine))


class Schedule:
    """A per-iteration value table; `schedule[it]` is `values[it]`, or `final_value` for it >= len(values)."""

    def __init__(self, values: np.ndarray, final_value: float) -> None:
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"schedule values must be 1-d, got shape {values.shape}")
        self.values = values
        self.final_value = float(final_value)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, it: int) -> float:
        it = _count("iteration", it)
        return float(self.values[it]) if it < len(self.values) else self.final_value

    def __repr__(self) -> str:
        return f"Schedule(len={len(self)}, first={self[0]:.6g}, final_value={self.final_value:.6g})"


@dataclass(frozen=True)
class Schedules:
    """The five official schedules, indexed by the global iteration read before each optimiser step."""

    lr: Schedule
    wd: Schedule
    momentum: Schedule  # teacher EMA momentum
    teacher_temp: Schedule
    last_layer_lr: Schedule  # lr of the heads' last layer: zero while it is frozen

    def at(self, it: int) -> dict[str, float]:
        """{"lr", "wd", "momentum", "teacher_temp", "last_layer_lr"} at iteration `it`."""
        return {
            "lr": self.lr[it],
            "wd": self.wd[it],
            "momentum": self.momentum[it],
            "teacher_temp": self.teacher_temp[it],
            "last_layer_lr": self.last_layer_lr[it],
        }


def build_schedules(
    *,
    lr: float,
    min_lr: float,
    epochs: int,
    warmup_epochs: int,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    final_momentum_teacher: float,
    warmup_teacher_temp: float,
    teacher_temp: float,
    warmup_teacher_temp_epochs: int,
    freeze_last_layer_epochs: int,
    epoch_length: int = EPOCH_LENGTH,
) -> Schedules:
    """The official schedules; `lr` is the already scaled learning rate (`scaled_lr`), epochs count `epoch_length`
    iterations. lr: warm-up from 0, then cosine to `min_lr`; wd and momentum: cosine over the whole run; teacher
    temperature: linear warm-up over `warmup_teacher_temp_epochs`, constant after; last-layer lr: the lr schedule,
    zero for the first `freeze_last_layer_epochs`."""
    length = _count("epoch_length", epoch_length)
    if length == 0:
        raise ValueError("epoch_length=0: expected a positive number of iterations per epoch")
    total = _count("epochs", epochs) * length
    warmup = _count("warmup_epochs", warmup_epochs) * length
    if warmup > total:
        raise ValueError(f"warmup_epochs={warmup_epochs} exceeds epochs={epochs}")
    temp_warmup = _count("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs) * length
    freeze = _count("freeze_last_layer_epochs", freeze_last_layer_epochs) * length

    lr_values = cosine_schedule(lr, min_lr, total, warmup_iters=warmup)
    last_layer = lr_values.copy()
    last_layer[:freeze] = 0.0
    return Schedules(
        lr=Schedule(lr_values, min_lr),
        wd=Schedule(cosine_schedule(weight_decay, weight_decay_end, total), weight_decay_end),
        momentum=Schedule(cosine_schedule(momentum_teacher, final_momentum_teacher, total), final_momentum_teacher),
        teacher_temp=Schedule(
            cosine_schedule(teacher_temp, teacher_temp, temp_warmup, temp_warmup, warmup_teacher_temp), teacher_temp
        ),
        last_layer_lr=Schedule(last_layer, min_lr),
    )


# ----------------------------------------------------------------------------------------------------- param groups
def _clean(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def layer_id(name: str, n_blocks: int) -> int:
    """Depth of a parameter for layer-wise lr decay: 0 for the embeddings and tokens, i + 1 for block i (flat
    `blocks.<i>.*` or chunked `blocks.<chunk>.<i>.*` names), n_blocks + 1 for the rest (final norm). Names are
    relative to the backbone; a module without blocks (n_blocks == 0, the heads) puts everything at layer 1."""
    n_blocks = _count("n_blocks", n_blocks)
    name = _clean(name)
    if n_blocks == 0:
        return 1
    if any(t in name for t in _LAYER0_NAMES):
        return 0
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 2:
        index = int(parts[2] if parts[2].isdigit() else parts[1])
        if index >= n_blocks:
            raise ValueError(f"parameter {name!r} is in block {index} but n_blocks={n_blocks}")
        return index + 1
    return n_blocks + 1


def param_multipliers(
    name: str,
    *,
    n_blocks: int,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    no_wd_on_tokens: bool = False,
) -> tuple[float, float, bool]:
    """(lr_multiplier, wd_multiplier, is_last_layer) of one parameter, by its name within its module.

    lr_multiplier = layerwise_decay ** (n_blocks + 1 - layer_id), times `patch_embed_lr_mult` for patch_embed.*;
    wd_multiplier 0 for `*.bias`, `*norm*`, `*gamma*` (and the tokens if `no_wd_on_tokens`), else 1;
    is_last_layer for `*last_layer*` (the heads' prototype layer, which follows the last-layer lr schedule).
    """
    name = _clean(name)
    lr_mult = layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
    if "patch_embed" in name:
        lr_mult = lr_mult * patch_embed_lr_mult
    no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name
    if no_wd_on_tokens and name.rsplit(".", 1)[-1] in TOKEN_NAMES:
        no_wd = True
    return lr_mult, 0.0 if no_wd else 1.0, "last_layer" in name


def param_groups(
    modules: Mapping[str, nn.Module],
    *,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    no_wd_on_tokens: bool = False,
) -> list[dict]:
    """AdamW parameter groups for the trainable parameters of `modules` (e.g. {"backbone", "dino_head",
    "ibot_head"} of the student), in the official order.

    A module with an `n_blocks` attribute (the backbone) gets layer-wise decay; the others multiplier 1. Within each
    module, parameters with equal (lr_multiplier, wd_multiplier, is_last_layer) share one group, in order of first
    appearance; groups of different modules are never merged (as official). Each group has the keys `params`,
    `param_names` ("<module>.<name>", PyTorch's own key), `module`, `lr_multiplier`, `wd_multiplier` and
    `is_last_layer`, which `apply_schedules` reads.
    """
    if _number("layerwise_decay", layerwise_decay) <= 0:
        raise ValueError(f"layerwise_decay={layerwise_decay}: expected a positive number")
    if _number("patch_embed_lr_mult", patch_embed_lr_mult) < 0:
        raise ValueError(f"patch_embed_lr_mult={patch_embed_lr_mult}: expected a non-negative number")
    groups: list[dict] = []
    owner: dict[int, str] = {}
    for key, module in modules.items():
        if not isinstance(module, nn.Module):
            raise TypeError(f"modules[{key!r}] is a {type(module).__name__}, expected an nn.Module")
        n_blocks = getattr(module, "n_blocks", 0)
        fused: dict[tuple[float, float, bool], dict] = {}
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            qualified = f"{key}.{_clean(name)}"
            if id(p) in owner:
                raise ValueError(f"parameter {qualified} is also {owner[id(p)]}: modules must not share parameters")
            owner[id(p)] = qualified
            mults = param_multipliers(
                name,
                n_blocks=n_blocks,
                layerwise_decay=layerwise_decay,
                patch_embed_lr_mult=patch_embed_lr_mult,
                no_wd_on_tokens=no_wd_on_tokens,
            )
            if mults not in fused:
                fused[mults] = {
                    "params": [],
                    "param_names": [],
                    "module": key,
                    **dict(zip(_GROUP_KEYS, mults, strict=True)),
                }
            fused[mults]["params"].append(p)
            fused[mults]["param_names"].append(qualified)
        groups.extend(fused.values())
    if not groups:
        raise ValueError(f"no trainable parameters in modules {list(modules)}")
    return groups


def build_optimizer(
    groups: Iterable[dict],
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    foreach: bool | None = None,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(...)` (official: betas from optim.adamw_beta1/2, eps 1e-8, foreach on CUDA).

    lr and weight decay are set by `apply_schedules` before every step; `foreach` / `fused` None lets PyTorch pick.
    """
    groups = list(groups)
    for g in groups:
        missing = [k for k in ("params", *_GROUP_KEYS) if k not in g]
        if missing:
            raise ValueError(f"parameter group without {missing}: build the groups with param_groups()")
    return torch.optim.AdamW(groups, betas=betas, foreach=foreach, fused=fused)


def apply_schedules(optimizer: torch.optim.Optimizer, values: Mapping[str, float]) -> None:
    """Set each group's lr = (last_layer_lr if is_last_layer else lr) * lr_multiplier and weight_decay = wd *
    wd_multiplier; `values` holds "lr", "wd" and "last_layer_lr" (e.g. `Schedules.at(it)`)."""
    missing = [k for k in ("lr", "wd", "last_layer_lr") if k not in values]
    if missing:
        raise ValueError(f"values lack {missing}: expected the keys of Schedules.at(it)")
    lr, wd, last_layer_lr = values["lr"], values["wd"], values["last_layer_lr"]
    for g in optimizer.param_groups:
        if any(k not in g for k in _GROUP_KEYS):
            raise ValueError("optimizer group without lr/wd multipliers: build the groups with param_groups()")
        g["weight_decay"] = wd * g["wd_multiplier"]
        g["lr"] = (last_layer_lr if g["is_last_layer"] else lr) * g["lr_multiplier"]
