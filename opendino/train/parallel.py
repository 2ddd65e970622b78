"""Ways to run the SSL model, applied as functions in a fixed order: `apply_ac` -> `apply_compile` -> `apply_fsdp` or
`apply_ddp` (the torchtitan order: activation checkpointing and compile wrap blocks before sharding groups them).

All of them keep parameter names (composable APIs: `checkpoint`, `Module.compile`, `fully_shard`, `replicate`), so
checkpoints, parameter groups and the exported backbone see the same keys in every mode.

- DDP: `replicate` on each student part (backbone, heads); gradients are averaged across processes in backward.
  The teacher needs no communication: it is updated from identical student weights on every process.
- FSDP2: `fully_shard` on every transformer block and on each part, student and teacher alike (the teacher's EMA
  update then runs on local shards; the teacher reshards after every forward, so its shards pair with the
  student's). Mixed precision: parameters in the compute dtype, gradient reduction in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from opendino import dist

if TYPE_CHECKING:
    from opendino.models.vit import DinoVisionTransformer
    from opendino.train.ssl import SSLModel

__all__ = ["apply_ac", "apply_compile", "apply_ddp", "apply_fsdp", "parallelize"]


def _blocks(backbone: DinoVisionTransformer) -> list[nn.Module]:
    return list(backbone.iter_blocks())


def apply_ac(model: SSLModel) -> None:
    """Activation checkpointing of every student transformer block (recompute in backward, save memory)."""
    from torch.distributed._composable import checkpoint

    for block in _blocks(model.student.backbone):
        checkpoint(block)


def apply_compile(model: SSLModel) -> None:
    """`torch.compile` each transformer block of student and teacher (same shapes every step: compiled once per crop
    size); in place, names unchanged."""
    for part in (model.student.backbone, model.teacher.backbone):
        for block in _blocks(part):
            block.compile()


def apply_fsdp(model: SSLModel, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2: shard every block, then each part, of student and teacher over all processes."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for side in (model.student, model.teacher):
        # The teacher runs no backward, which is where FSDP2 reshards a root module's parameters; left to its default
        # a teacher part (a root) would keep them unsharded after forward, and the EMA update would pair its full
        # tensors with the student's shards. Resharding after every forward keeps both sides sharded alike.
        reshard = True if side is model.teacher else None
        for block in _blocks(side.backbone):
            fully_shard(block, mp_policy=mp, reshard_after_forward=reshard)
        for part in side.values():
            fully_shard(part, mp_policy=mp, reshard_after_forward=reshard)


def apply_ddp(model: SSLModel) -> None:
    """Data parallelism with gradient averaging (composable DDP) on each student part."""
    from torch.distributed._composable import replicate

    for part in model.student.values():
        replicate(part)


def parallelize(
    model: SSLModel,
    *,
    parallel: str,
    compile: bool = False,
    activation_checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
) -> None:
    """Apply AC, compile and data parallelism (when several processes run) in the fixed order."""
    if activation_checkpointing:
        apply_ac(model)
    if compile:
        apply_compile(model)
    if dist.world_size() > 1 or (parallel == "fsdp" and dist.is_distributed()):
        if parallel == "fsdp":
            apply_fsdp(model, param_dtype=param_dtype)
        else:
            apply_ddp(model)
