"""The self-supervised model: student (backbone + DINO head + iBOT head), EMA teacher, centering state.

One training step is a handful of named methods, each a small piece of `dinov2/train/ssl_meta_arch.py`:

    targets = model.teacher_targets(batch, teacher_temp)   # no grad: teacher probabilities (centred)
    student = model.student_outputs(batch)                 # student logits and pre-head CLS features
    losses = model.compute_losses(student, targets, batch) # DINO (global + local), iBOT, KoLeo, weighted total
    ... backward, clip, optimiser step ...
    model.update_teacher(momentum)                         # EMA, after the optimiser step

State-dict keys follow the official training checkpoints: `student.backbone.*`, `student.dino_head.*`,
`student.ibot_head.*` (untied heads only), `teacher.*` likewise, plus the softmax-centring buffers
`dino_center.center` and `ibot_center.center`. Every module is called once per step (the student backbone once on
the list [global crops, local crops]), so DDP, FSDP2, activation checkpointing and compile can wrap the parts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from opendino import dist
from opendino.config import DinoConfig, IbotConfig, TrainConfig
from opendino.data.collate import Batch
from opendino.losses import CenterEMA, dino_multicrop_loss, ibot_loss, koleo_multicrop, sinkhorn_knopp, softmax_center
from opendino.models.heads import DINOHead
from opendino.models.vit import DinoVisionTransformer, build_vit

__all__ = ["SSLModel", "SSLParts", "StudentOutputs", "TeacherTargets", "build_backbone_from_config"]


@dataclass
class TeacherTargets:
    """Teacher probabilities: `dino` (2B, K_dino) for the global crops, `ibot` (M, K_ibot) for the masked tokens."""

    dino: Tensor
    ibot: Tensor


@dataclass
class StudentOutputs:
    """Student logits (global (2B, K), local (n_local*B, K), masked (M, K_ibot)) and global CLS features (2B, D)."""

    global_logits: Tensor
    local_logits: Tensor
    masked_logits: Tensor
    global_cls: Tensor


def build_backbone_from_config(cfg: TrainConfig, *, student: bool) -> DinoVisionTransformer:
    """The backbone of `cfg.model` at `img_size = global_crops_size` (official); the teacher has no stochastic depth."""
    m = cfg.model
    return build_vit(
        m.arch,
        img_size=cfg.crops.global_crops_size,
        patch_size=m.patch_size,
        drop_path_rate=m.drop_path_rate if student else 0.0,
        drop_path_uniform=m.drop_path_uniform,
        init_values=m.layerscale or None,
        ffn_layer=m.ffn_layer,
        block_chunks=m.block_chunks,
        qkv_bias=m.qkv_bias,
        proj_bias=m.proj_bias,
        ffn_bias=m.ffn_bias,
        num_register_tokens=m.num_register_tokens,
        interpolate_antialias=m.interpolate_antialias,
        interpolate_offset=m.interpolate_offset,
    )


def _head(section: DinoConfig | IbotConfig, dim: int) -> DINOHead:
    """The DINO or iBOT head of a config section (both have the same head_* fields)."""
    return DINOHead(
        dim,
        section.head_n_prototypes,
        nlayers=section.head_nlayers,
        hidden_dim=section.head_hidden_dim,
        bottleneck_dim=section.head_bottleneck_dim,
    )


class SSLParts(nn.ModuleDict):
    """{"backbone", "dino_head"[, "ibot_head"]} of the student or the teacher, with typed access by attribute."""

    def _part(self, name: str) -> nn.Module:
        if name not in self._modules:  # AttributeError, so that hasattr() (used by add_module) answers False
            raise AttributeError(f"no {name!r} part")
        return cast(nn.Module, self._modules[name])

    @property
    def backbone(self) -> DinoVisionTransformer:
        return cast(DinoVisionTransformer, self._part("backbone"))

    @property
    def dino_head(self) -> DINOHead:
        return cast(DINOHead, self._part("dino_head"))

    @property
    def ibot_head(self) -> DINOHead:
        return cast(DINOHead, self._part("ibot_head"))


class SSLModel(nn.Module):
    """Student and EMA teacher of the DINOv2 recipe, with the loss composition of the official meta-architecture."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        backbone = build_backbone_from_config(cfg, student=True)
        dim = backbone.embed_dim
        self.separate_ibot_head = cfg.ibot.separate_head
        parts: dict[str, nn.Module] = {"backbone": backbone, "dino_head": _head(cfg.dino, dim)}
        if self.separate_ibot_head:
            parts["ibot_head"] = _head(cfg.ibot, dim)
        self.student = SSLParts(parts)
        teacher_parts = dict(parts, backbone=build_backbone_from_config(cfg, student=False))
        self.teacher = SSLParts({k: copy.deepcopy(v) if k != "backbone" else v for k, v in teacher_parts.items()})
        self.teacher.load_state_dict(self.student.state_dict())  # the teacher starts as the student (official)
        self.teacher.requires_grad_(False)
        n_ibot = cfg.ibot.head_n_prototypes if self.separate_ibot_head else cfg.dino.head_n_prototypes
        self.dino_center = CenterEMA(cfg.dino.head_n_prototypes, momentum=cfg.teacher.center_momentum)
        self.ibot_center = CenterEMA(n_ibot, momentum=cfg.teacher.center_momentum)

    # ------------------------------------------------------------------------------------------------- structure
    def init_weights(self) -> None:
        """Initialise the student as the official code does and copy it into the teacher (after `to_empty`)."""
        self.student.backbone.init_weights()
        self.student.dino_head.init_weights()
        if self.separate_ibot_head:
            self.student.ibot_head.init_weights()
        self.dino_center.center.zero_()
        self.ibot_center.center.zero_()
        self.copy_student_to_teacher()

    @torch.no_grad()
    def copy_student_to_teacher(self) -> None:
        for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            t.copy_(s)

    def student_parts(self) -> dict[str, nn.Module]:
        """{"backbone", "dino_head"[, "ibot_head"]}: the trained submodules (parameter groups, gradient clipping)."""
        return dict(self.student.items())

    @property
    def n_blocks(self) -> int:
        return self.student.backbone.n_blocks

    # ------------------------------------------------------------------------------------------------- the step
    @torch.no_grad()
    def teacher_targets(self, batch: Batch, teacher_temp: float) -> TeacherTargets:
        """Teacher probabilities for the global crops (in the crop order of the student's global crops, i.e. not yet
        swapped: the loss pairs crops) and for the masked patch tokens; updates the softmax centres."""
        out = self.teacher.backbone(batch.global_crops, is_training=True)
        cls = out["x_norm_clstoken"]  # (2B, D)
        patches = out["x_norm_patchtokens"]  # (2B, N, D)
        masked = patches.flatten(0, 1).index_select(0, batch.mask_indices)  # (M, D)
        if self.separate_ibot_head:
            cls_logits = self.teacher.dino_head(cls)
            masked_logits = self.teacher.ibot_head(masked)
        else:
            logits = self.teacher.dino_head(torch.cat([cls, masked]))
            cls_logits, masked_logits = logits[: cls.shape[0]], logits[cls.shape[0] :]
        cls_logits, masked_logits = cls_logits.float(), masked_logits.float()
        if self.cfg.teacher.centering == "centering":
            dino = softmax_center(cls_logits, self.dino_center.center, teacher_temp)
            ibot = softmax_center(masked_logits, self.ibot_center.center, teacher_temp)
            self.dino_center.update(cls_logits)
            if self.ibot_enabled and _everywhere(masked_logits.shape[0] > 0, cls_logits.device):
                # official: the mean over this process's masked tokens, then the mean over processes
                self.ibot_center.update(masked_logits.unsqueeze(0))
        else:
            dino = sinkhorn_knopp(cls_logits, teacher_temp)
            if self.ibot_enabled:  # a collective: every process calls it, even with no masked token of its own
                ibot = sinkhorn_knopp(masked_logits, teacher_temp, n_masked_patches=batch.n_masked_patches)
            else:
                ibot = masked_logits.softmax(-1)
        return TeacherTargets(dino=dino, ibot=ibot)

    @property
    def ibot_enabled(self) -> bool:
        """Whether the iBOT term is on (weight and masking); a process may still have no masked token in a step."""
        return self.cfg.ibot.loss_weight > 0 and self.cfg.ibot.mask_sample_probability > 0

    def student_outputs(self, batch: Batch) -> StudentOutputs:
        """One backbone call on [global crops (masked), local crops], one call per head."""
        backbone = self.student.backbone
        has_local = batch.local_crops.shape[0] > 0
        if has_local:
            g, loc = backbone([batch.global_crops, batch.local_crops], masks=[batch.masks, None], is_training=True)
            local_cls = loc["x_norm_clstoken"]
        else:
            g = backbone(batch.global_crops, masks=batch.masks, is_training=True)
            local_cls = g["x_norm_clstoken"][:0]
        global_cls = g["x_norm_clstoken"]
        masked = g["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch.mask_indices)
        n_g, n_l = global_cls.shape[0], local_cls.shape[0]
        if self.separate_ibot_head:
            cls_logits = self.student.dino_head(torch.cat([global_cls, local_cls]))
            masked_logits = self.student.ibot_head(masked)
        else:
            logits = self.student.dino_head(torch.cat([global_cls, local_cls, masked]))
            cls_logits, masked_logits = logits[: n_g + n_l], logits[n_g + n_l :]
        return StudentOutputs(
            global_logits=cls_logits[:n_g],
            local_logits=cls_logits[n_g:],
            masked_logits=masked_logits,
            global_cls=global_cls,
        )

    def compute_losses(self, student: StudentOutputs, targets: TeacherTargets, batch: Batch) -> dict[str, Tensor]:
        """All loss terms in one place, weighted as the official total: {dino_local, dino_global, koleo, ibot, total}.

        The terms are the unweighted official values; `total` applies `dino.loss_weight`, `koleo.loss_weight` and
        `ibot.loss_weight` (dinov2/train/ssl_meta_arch.py, forward_backward).
        """
        cfg = self.cfg
        dino_global, dino_local = dino_multicrop_loss(
            student.global_logits.float(),
            student.local_logits.float(),
            targets.dino,
            n_global_crops=cfg.crops.global_crops_number,
            student_temp=cfg.dino.student_temp,
        )
        zero = dino_global.new_zeros(())
        koleo = (
            koleo_multicrop(student.global_cls.float(), n_global_crops=cfg.crops.global_crops_number)
            if cfg.koleo.loss_weight > 0
            else zero
        )
        if self.ibot_enabled:
            ibot = ibot_loss(
                student.masked_logits.float(),
                targets.ibot,
                batch.masks_weight,
                n_images=batch.masks.shape[0],
                student_temp=cfg.ibot.student_temp,
            )
        else:
            ibot = zero
        total = (
            cfg.dino.loss_weight * (dino_global + dino_local)
            + cfg.koleo.loss_weight * koleo
            + cfg.ibot.loss_weight * ibot
        )
        return {"dino_local": dino_local, "dino_global": dino_global, "koleo": koleo, "ibot": ibot, "total": total}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter (official, foreach)."""
        t_params = list(self.teacher.parameters())
        s_params = list(self.student.parameters())
        t_local = [_local(p) for p in t_params]
        s_local = [_local(p) for p in s_params]
        torch._foreach_mul_(t_local, momentum)
        torch._foreach_add_(t_local, s_local, alpha=1.0 - momentum)


def _everywhere(flag: bool, device: torch.device) -> bool:
    """`flag` and-ed over all processes (one collective; the same answer everywhere; no device sync alone)."""
    if dist.world_size() == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    return bool(dist.all_reduce(t, op="min").item())


def _local(p: Tensor) -> Tensor:
    """The local shard of a (possibly FSDP2-sharded DTensor) parameter."""
    return p.to_local() if hasattr(p, "to_local") else p
