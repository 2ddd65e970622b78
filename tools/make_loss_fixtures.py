#!/usr/bin/env python
"""Generate the loss parity fixture (tests/fixtures/official/losses.safetensors) from the OFFICIAL DINOv2 losses.

This script is ours and is never imported by opendino or its tests; they only read the numbers it writes.

It imports `DINOLoss`, `iBOTPatchLoss` and `KoLeoLoss` (`dinov2/loss/`), `collate_data_and_cast`
(`dinov2/data/collate.py`) and `MaskingGenerator` (`dinov2/data/masking.py`) from a checkout of
facebookresearch/dinov2 (the committed file was made from b8931f7bf91576930313be2c6d6af376033b35f0), blocks the
`xformers` import so the iBOT loss takes its pure-PyTorch cross-entropy, and starts a one-process gloo group (the
official iBOT Sinkhorn-Knopp all-reduces without checking for one). On random inputs of small sizes (B = 3 images,
2 global + 3 local crops, K = 32 prototypes, 4x4 = 16 patches, D = 24) it replays the teacher-target and loss part of
`SSLMetaArch.forward_backward` (`dinov2/train/ssl_meta_arch.py`, lines cited below) with the official module
objects, CPU, float32, one thread, and stores inputs (`in.*`), outputs (`out.*`) and, as JSON in the metadata entry
`sizes`, the sizes, temperatures, official commit and torch version.

Usage (from the repository root; deterministic: a rerun writes a byte-identical file):

    python tools/make_loss_fixtures.py --official /path/to/dinov2 --out tests/fixtures/official/losses.safetensors

Conventions of the stored tensors: every crop-stacked tensor is crop-major (crop 0 of all images, then crop 1, ...)
and the teacher's global crops are in their natural order; the official code reverses the teacher's two crops
(L162-L164), which is undone here before saving.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

B, N_GLOBAL, N_LOCAL, K, GRID, D = 3, 2, 3, 32, 4, 24
TEMPS = (0.04, 0.07)  # teacher temperature at the two centring steps (warm-up start, final)


def _official(path: Path):
    sys.path.insert(0, str(path))
    sys.modules["xformers"] = None  # type: ignore[assignment]  # ImportError -> the pure-PyTorch lossfunc
    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.masking import MaskingGenerator
    from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss

    return DINOLoss, iBOTPatchLoss, KoLeoLoss, collate_data_and_cast, MaskingGenerator


def _commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _swap_crops(x: torch.Tensor) -> torch.Tensor:
    """[crop 0; crop 1] <-> [crop 1; crop 0] along rows, as ssl_meta_arch L162-L164 (its own inverse)."""
    first, second = x.chunk(2)
    return torch.cat((second, first))


def _dino_terms(dino, student_global, student_local, teacher_probs_list, n_local_crops):
    """ssl_meta_arch L147-L148 and L278-L309: (dino_global_crops_loss, dino_local_crops_loss or None)."""
    n_local_terms = max(n_local_crops * N_GLOBAL, 1)
    n_global_terms = (N_GLOBAL - 1) * N_GLOBAL
    local = None
    if n_local_crops > 0:
        local = dino(
            student_output_list=student_local.chunk(n_local_crops),
            teacher_out_softmaxed_centered_list=teacher_probs_list,
        ) / (n_global_terms + n_local_terms)
    loss_scales = 2
    glob = (
        dino(
            student_output_list=[student_global], teacher_out_softmaxed_centered_list=[teacher_probs_list.flatten(0, 1)]
        )
        * loss_scales
        / (n_global_terms + n_local_terms)
    )
    return glob, local


def make(official: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    DINOLoss, iBOTPatchLoss, KoLeoLoss, collate_data_and_cast, MaskingGenerator = _official(official)
    torch.manual_seed(0)
    random.seed(0)
    n_patches = GRID * GRID
    t: dict[str, torch.Tensor] = {}

    # masks, exactly as the official collate makes them (dinov2/train/train.py L170-L172, collate.py)
    samples = [({"global_crops": [torch.zeros(1)] * N_GLOBAL, "local_crops": [torch.zeros(1)] * N_LOCAL}, 0)] * B
    generator = MaskingGenerator(input_size=(GRID, GRID), max_num_patches=0.5 * n_patches)
    batch = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, n_tokens=n_patches, mask_generator=generator)
    masks, mask_indices = batch["collated_masks"], batch["mask_indices_list"]
    n_masked = int(mask_indices.shape[0])
    t["in.masks"], t["in.masks_weight"] = masks, batch["masks_weight"]

    # random head outputs (DINO head logits are cosines, in [-1, 1])
    for step in (1, 2):
        t[f"in.teacher_cls_logits_step{step}"] = torch.rand(N_GLOBAL * B, K) * 2 - 1
        t[f"in.teacher_patch_logits_step{step}"] = torch.rand(N_GLOBAL * B, n_patches, K) * 2 - 1
    t["in.student_global_logits"] = torch.rand(N_GLOBAL * B, K) * 2 - 1
    t["in.student_local_logits"] = torch.rand(N_LOCAL * B, K) * 2 - 1
    t["in.student_patch_logits"] = torch.rand(N_GLOBAL * B, n_patches, K) * 2 - 1
    t["in.student_global_cls"] = torch.randn(N_GLOBAL * B, D)
    t["in.koleo_features"] = torch.randn(10, D)

    def masked_tokens(patch_logits):  # L184-L194 / L253-L262: index_select of the masked tokens, [:n_masked]
        return torch.index_select(patch_logits.flatten(0, 1), dim=0, index=mask_indices)[:n_masked]

    # teacher targets, train.centering == "centering": two steps so that the EMA is exercised (L199-L210)
    dino, ibot = DINOLoss(K), iBOTPatchLoss(K)
    for step, temp in zip((1, 2), TEMPS, strict=True):
        cls_logits = _swap_crops(t[f"in.teacher_cls_logits_step{step}"])
        probs = dino.softmax_center_teacher(cls_logits, teacher_temp=temp).view(N_GLOBAL, -1, K)
        t[f"out.centering.dino_center_before_step{step}"] = dino.center.clone()
        dino.update_center(cls_logits)
        t[f"out.centering.dino_probs_step{step}"] = _swap_crops(probs.flatten(0, 1))
        patch = masked_tokens(t[f"in.teacher_patch_logits_step{step}"]).unsqueeze(0)
        ibot_probs = ibot.softmax_center_teacher(patch[:, :n_masked], teacher_temp=temp).squeeze(0)
        t[f"out.centering.ibot_center_before_step{step}"] = ibot.center.clone()
        ibot.update_center(patch[:n_masked])
        t[f"out.centering.ibot_probs_step{step}"] = ibot_probs
    dino.apply_center_update()
    ibot.apply_center_update()
    t["out.centering.dino_center_after_step2"] = dino.center.clone()
    t["out.centering.ibot_center_after_step2"] = ibot.center.clone()
    centering_probs = t["out.centering.dino_probs_step2"]

    # teacher targets, train.centering == "sinkhorn_knopp" (L212-L222), step-2 logits at the final temperature
    cls_logits = _swap_crops(t["in.teacher_cls_logits_step2"])
    probs = dino.sinkhorn_knopp_teacher(cls_logits, teacher_temp=TEMPS[1]).view(N_GLOBAL, -1, K)
    t["out.sinkhorn.dino_probs"] = _swap_crops(probs.flatten(0, 1))
    t["out.sinkhorn.ibot_probs"] = ibot.sinkhorn_knopp_teacher(
        masked_tokens(t["in.teacher_patch_logits_step2"]),
        teacher_temp=TEMPS[1],
        n_masked_patches_tensor=batch["n_masked_patches"].clone(),
    )

    # DINO losses (L278-L309) for both kinds of targets, with gradients w.r.t. the student logits
    for kind, teacher_probs in (("centering", centering_probs), ("sinkhorn", t["out.sinkhorn.dino_probs"])):
        probs_list = _swap_crops(teacher_probs).view(N_GLOBAL, -1, K)  # the official (reversed) layout
        student_global = t["in.student_global_logits"].clone().requires_grad_()
        student_local = t["in.student_local_logits"].clone().requires_grad_()
        glob, local = _dino_terms(dino, student_global, student_local, probs_list, N_LOCAL)
        (glob + local).backward()
        t[f"out.dino_{kind}.global_loss"], t[f"out.dino_{kind}.local_loss"] = glob.detach(), local.detach()
        t[f"out.dino_{kind}.grad_student_global"] = student_global.grad
        t[f"out.dino_{kind}.grad_student_local"] = student_local.grad
    probs_list = _swap_crops(centering_probs).view(N_GLOBAL, -1, K)
    glob, _ = _dino_terms(dino, t["in.student_global_logits"], None, probs_list, n_local_crops=0)
    t["out.dino_nolocal.global_loss"] = glob

    # iBOT loss (L322-L340): forward_masked * loss_scales (2) * ibot_loss_scale (1 / n_global_crops)
    for kind in ("centering", "sinkhorn"):
        teacher_probs = t["out.centering.ibot_probs_step2"] if kind == "centering" else t["out.sinkhorn.ibot_probs"]
        student_patch = t["in.student_patch_logits"].clone().requires_grad_()
        loss = ibot.forward_masked(
            masked_tokens(student_patch),
            teacher_probs,
            student_masks_flat=masks,
            n_masked_patches=n_masked,
            masks_weight=batch["masks_weight"],
        )
        loss = loss * 2 * (1.0 / N_GLOBAL)
        loss.backward()
        t[f"out.ibot_{kind}.loss"], t[f"out.ibot_{kind}.grad_student_patch"] = loss.detach(), student_patch.grad
    t["in.teacher_patch_probs_dense"] = torch.softmax(t["in.teacher_patch_logits_step2"] / TEMPS[1], dim=-1)
    t["out.ibot_dense.loss"] = ibot(t["in.student_patch_logits"], t["in.teacher_patch_probs_dense"], masks)

    # KoLeo (L311-L317): one term per global crop of the student's CLS tokens, summed; and one plain call
    koleo = KoLeoLoss()
    cls = t["in.student_global_cls"].clone().requires_grad_()
    koleo_sum = sum(koleo(p) for p in cls.chunk(2))
    koleo_sum.backward()
    t["out.koleo.multicrop"], t["out.koleo.grad_student_global_cls"] = koleo_sum.detach(), cls.grad
    features = t["in.koleo_features"].clone().requires_grad_()
    single = koleo(features)
    single.backward()
    t["out.koleo.single"], t["out.koleo.grad_features"] = single.detach(), features.grad

    t = {k: v.detach().contiguous() for k, v in t.items()}
    sizes = {
        "B": B,
        "n_global_crops": N_GLOBAL,
        "n_local_crops": N_LOCAL,
        "K": K,
        "n_patches": n_patches,
        "D": D,
        "teacher_temps": list(TEMPS),
        "student_temp": dino.student_temp,
        "center_momentum": dino.center_momentum,
        "n_masked_patches": n_masked,
        "upperbound": int(batch["upperbound"]),
    }
    # one metadata entry: safetensors writes several in no fixed order, and reruns must be byte-identical
    meta = {"sizes": json.dumps({**sizes, "official_commit": _commit(official), "torch": torch.__version__})}
    return t, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, type=Path, help="checkout of facebookresearch/dinov2")
    parser.add_argument("--out", default=Path("tests/fixtures/official/losses.safetensors"), type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "`torch.cuda.amp.autocast", FutureWarning)  # KoLeoLoss.forward
    with tempfile.TemporaryDirectory() as tmp:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        try:
            tensors, meta = make(args.official)
        finally:
            torch.distributed.destroy_process_group()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=meta)
    print(f"wrote {len(tensors)} tensors to {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
