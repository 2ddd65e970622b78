"""The SSL model: student / EMA teacher structure, one step's pieces, and the official loss composition."""

from __future__ import annotations

import random

import pytest
import torch

from opendino.cli import load_train_config
from opendino.data.collate import SSLCollate, TrainSample
from opendino.data.pipeline import make_collate
from opendino.train.loop import build_schedules_for, train_step
from opendino.train.schedules import apply_schedules, build_optimizer, param_groups
from opendino.train.ssl import SSLModel


def _cfg(*overrides: str):
    return load_train_config("debug", ["data.source=unused", "model.drop_path_rate=0", *overrides])


def _batch(cfg, n_images: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = cfg.crops
    samples = [
        TrainSample(
            {
                "global_crops": [
                    torch.randn(3, c.global_crops_size, c.global_crops_size, generator=g) for _ in range(2)
                ],
                "local_crops": [
                    torch.randn(3, c.local_crops_size, c.local_crops_size, generator=g)
                    for _ in range(c.local_crops_number)
                ],
            },
            i,
            seed * 100 + i,
        )
        for i in range(n_images)
    ]
    collate: SSLCollate = make_collate(cfg)
    return collate(samples, random.Random(seed))


def test_teacher_starts_as_the_student_and_never_gets_gradients():
    torch.manual_seed(0)
    model = SSLModel(_cfg("ibot.separate_head=true"))
    s, t = model.student.state_dict(), model.teacher.state_dict()
    assert list(s) == list(t) and all(torch.equal(s[k], t[k]) for k in s)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    keys = list(model.state_dict())
    assert {k.split(".")[0] for k in keys} == {"student", "teacher", "dino_center", "ibot_center"}
    assert "student.ibot_head.last_layer.weight_g" in keys and "teacher.backbone.blocks.0.attn.qkv.weight" in keys
    # the teacher has no stochastic depth; the student has the configured rate
    rates = {b.sample_drop_ratio for b in SSLModel(_cfg("model.drop_path_rate=0.3")).student.backbone.iter_blocks()}
    assert rates == {0.3} and {b.sample_drop_ratio for b in model.teacher.backbone.iter_blocks()} == {0.0}


def test_tied_heads_share_one_head_and_untied_have_two():
    tied, untied = SSLModel(_cfg()), SSLModel(_cfg("ibot.separate_head=true"))
    assert set(tied.student_parts()) == {"backbone", "dino_head"}
    assert set(untied.student_parts()) == {"backbone", "dino_head", "ibot_head"}


def test_a_step_moves_the_student_and_the_teacher_follows_by_ema():
    torch.manual_seed(0)
    cfg = _cfg()
    model = SSLModel(cfg)
    opt = build_optimizer(param_groups(model.student_parts(), layerwise_decay=0.9, patch_embed_lr_mult=0.2))
    values = build_schedules_for(cfg, 1).at(20)  # past the warm-up: a non-zero learning rate
    apply_schedules(opt, values)
    teacher_before = [p.detach().clone() for p in model.teacher.parameters()]
    losses, finite, targets, _ = train_step(
        model, _batch(cfg), opt, values, amp_dtype=None, scaler=None, clip_grad=cfg.optim.clip_grad
    )
    assert finite and set(losses) == {"dino_local", "dino_global", "koleo", "ibot", "total"}
    assert torch.isfinite(losses["total"])
    expected_total = losses["dino_local"] + losses["dino_global"] + 0.1 * losses["koleo"] + losses["ibot"]
    torch.testing.assert_close(losses["total"], expected_total)
    m = values["momentum"]
    moved = 0
    for tb, t, s in zip(teacher_before, model.teacher.parameters(), model.student.parameters(), strict=True):
        torch.testing.assert_close(t, m * tb + (1 - m) * s, rtol=0, atol=1e-6)
        moved += int(not torch.equal(s, tb))
    assert moved > 0
    # teacher targets are distributions; the softmax centre moved away from zero
    torch.testing.assert_close(targets.dino.sum(-1), torch.ones(len(targets.dino)))
    assert model.dino_center.center.abs().sum() > 0


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_both_centerings_give_targets_for_every_masked_token(centering):
    torch.manual_seed(0)
    cfg = _cfg(f"teacher.centering={centering}")
    model = SSLModel(cfg)
    batch = _batch(cfg, n_images=6)
    targets = model.teacher_targets(batch, 0.05)
    assert targets.dino.shape == (12, cfg.dino.head_n_prototypes)
    assert targets.ibot.shape == (batch.mask_indices.numel(), cfg.dino.head_n_prototypes)
    assert batch.mask_indices.numel() > 0
    torch.testing.assert_close(targets.ibot.sum(-1), torch.ones(len(targets.ibot)))


def test_weights_switch_terms_off():
    torch.manual_seed(0)
    cfg = _cfg("ibot.loss_weight=0", "koleo.loss_weight=0", "crops.local_crops_number=0")
    model = SSLModel(cfg)
    batch = _batch(cfg)
    assert batch.mask_indices.numel() == 0  # no masking without the iBOT term
    losses = model.compute_losses(model.student_outputs(batch), model.teacher_targets(batch, 0.04), batch)
    assert losses["ibot"] == 0 and losses["koleo"] == 0 and losses["dino_local"] == 0
    torch.testing.assert_close(losses["total"], losses["dino_global"])


def test_a_non_finite_loss_skips_the_update_and_restores_the_centres():
    torch.manual_seed(0)
    cfg = _cfg()
    model = SSLModel(cfg)
    opt = build_optimizer(param_groups(model.student_parts(), layerwise_decay=0.9, patch_embed_lr_mult=0.2))
    values = build_schedules_for(cfg, 1).at(20)
    apply_schedules(opt, values)
    batch = _batch(cfg)
    batch.global_crops[0, 0, 0, 0] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, finite, _, _ = train_step(model, batch, opt, values, amp_dtype=None, scaler=None, clip_grad=3.0)
    assert not finite
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.student.parameters())
