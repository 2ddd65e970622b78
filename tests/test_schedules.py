"""Schedules, lr scaling and parameter groups against the official DINOv2 code (fixtures from
tools/make_schedule_fixtures.py), plus the properties the training loop relies on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from opendino.models.heads import DINOHead
from opendino.models.layers import LayerScale
from opendino.models.vit import DinoVisionTransformer, build_vit
from opendino.train.schedules import (
    Schedule,
    apply_schedules,
    build_optimizer,
    build_schedules,
    cosine_schedule,
    layer_id,
    param_groups,
    param_multipliers,
    scaled_lr,
)

FIXTURES = Path(__file__).parent / "fixtures" / "official"
SCHEDULES = json.loads((FIXTURES / "schedules.json").read_text())
GROUPS = json.loads((FIXTURES / "param_groups.json").read_text())["cases"]


def _build_kwargs(cfg: dict) -> dict:
    """Official build_schedulers config -> build_schedules keywords."""
    o, t = cfg["optim"], cfg["teacher"]
    return dict(
        lr=o["lr"],
        min_lr=o["min_lr"],
        epochs=o["epochs"],
        warmup_epochs=o["warmup_epochs"],
        weight_decay=o["weight_decay"],
        weight_decay_end=o["weight_decay_end"],
        momentum_teacher=t["momentum_teacher"],
        final_momentum_teacher=t["final_momentum_teacher"],
        warmup_teacher_temp=t["warmup_teacher_temp"],
        teacher_temp=t["teacher_temp"],
        warmup_teacher_temp_epochs=t["warmup_teacher_temp_epochs"],
        freeze_last_layer_epochs=o["freeze_last_layer_epochs"],
        epoch_length=cfg["train"]["OFFICIAL_EPOCH_LENGTH"],
    )


OFFICIAL_CFG = SCHEDULES["build_schedulers"]["cfg"]
OFFICIAL_SCHEDULES = build_schedules(**_build_kwargs(OFFICIAL_CFG))
NAMES = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")


# ---------------------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("case", SCHEDULES["cosine"], ids=lambda c: "-".join(f"{v}" for v in c["kwargs"].values()))
def test_cosine_schedule_bit_exact(case):
    kwargs = case["kwargs"]
    values = cosine_schedule(**kwargs)
    assert values.dtype == np.float64
    assert values.tolist() == case["values"]  # exact, float by float
    s = Schedule(values, kwargs["final_value"])
    for offset, expected in zip(SCHEDULES["beyond_offsets"], case["beyond"], strict=True):
        assert s[kwargs["total_iters"] + offset] == expected


def test_build_schedules_bit_exact():
    fixture = SCHEDULES["build_schedulers"]
    for name in NAMES:
        s = getattr(OFFICIAL_SCHEDULES, name)
        assert s.values.tolist() == fixture["values"][name], name
        for offset, expected in zip(SCHEDULES["beyond_offsets"], fixture["beyond"][name], strict=True):
            assert s[len(s) + offset] == expected, name
    for it in (0, 7, 29, 30, 64, 119, 120, 500):
        at = OFFICIAL_SCHEDULES.at(it)
        assert list(at) == list(NAMES)
        assert all(isinstance(v, float) for v in at.values())
        assert at == {n: getattr(OFFICIAL_SCHEDULES, n)[it] for n in NAMES}


def test_teacher_temp_warms_up_linearly_then_stays_constant():
    t = OFFICIAL_CFG["teacher"]
    warmup = t["warmup_teacher_temp_epochs"] * OFFICIAL_CFG["train"]["OFFICIAL_EPOCH_LENGTH"]
    temps = [OFFICIAL_SCHEDULES.at(it)["teacher_temp"] for it in range(3 * warmup)]
    assert temps[0] == t["warmup_teacher_temp"]
    np.testing.assert_allclose(np.diff(temps[:warmup]), (t["teacher_temp"] - t["warmup_teacher_temp"]) / (warmup - 1))
    assert temps[warmup - 1 :] == [t["teacher_temp"]] * (2 * warmup + 1)


def test_last_layer_lr_is_zero_while_frozen_then_follows_lr():
    o = OFFICIAL_CFG["optim"]
    freeze = o["freeze_last_layer_epochs"] * OFFICIAL_CFG["train"]["OFFICIAL_EPOCH_LENGTH"]
    total = len(OFFICIAL_SCHEDULES.lr)
    for it in range(total + 5):
        at = OFFICIAL_SCHEDULES.at(it)
        assert at["last_layer_lr"] == (0.0 if it < freeze else at["lr"])
    assert OFFICIAL_SCHEDULES.lr[freeze - 1] > 0


def test_lr_warmup_peak_and_end():
    o = OFFICIAL_CFG["optim"]
    warmup = o["warmup_epochs"] * OFFICIAL_CFG["train"]["OFFICIAL_EPOCH_LENGTH"]
    lr = OFFICIAL_SCHEDULES.lr
    assert lr[0] == 0.0
    assert lr[warmup - 1] == lr[warmup] == o["lr"]  # official linspace endpoint: the peak occurs twice
    assert max(lr.values) == o["lr"]
    assert np.all(np.diff(lr.values[warmup:]) < 0)
    assert lr[len(lr)] == o["min_lr"] < lr[len(lr) - 1]


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="shorter than warmup_iters"):
        cosine_schedule(1.0, 0.0, total_iters=5, warmup_iters=4, freeze_iters=2)
    with pytest.raises(ValueError, match="total_iters"):
        cosine_schedule(1.0, 0.0, total_iters=10.0)
    with pytest.raises(ValueError, match="base_value"):
        cosine_schedule(float("nan"), 0.0, total_iters=10)
    with pytest.raises(ValueError, match="iteration"):
        Schedule(np.ones(3), 0.0)[-1]
    kwargs = _build_kwargs(OFFICIAL_CFG)
    with pytest.raises(ValueError, match="warmup_epochs"):
        build_schedules(**{**kwargs, "warmup_epochs": kwargs["epochs"] + 1})
    with pytest.raises(ValueError, match="epoch_length"):
        build_schedules(**{**kwargs, "epoch_length": 0})


def test_scaled_lr_matches_official_rule():
    for case in SCHEDULES["scaled_lr"]:
        global_batch = case["batch_size_per_gpu"] * case["world_size"]
        assert scaled_lr(case["base_lr"], global_batch) == case["lr"]
        assert scaled_lr(case["base_lr"], global_batch, rule="sqrt_wrt_1024") == case["lr"]
    with pytest.raises(ValueError, match="linear_wrt_256"):
        scaled_lr(0.004, 256, rule="linear_wrt_256")
    with pytest.raises(ValueError, match="global_batch"):
        scaled_lr(0.004, 0)


# ----------------------------------------------------------------------------------------------------- param groups
def _student(case: dict) -> dict[str, torch.nn.Module]:
    student = {"backbone": DinoVisionTransformer(**case["backbone"]), "dino_head": DINOHead(**case["head"])}
    if case["separate_ibot_head"]:
        student["ibot_head"] = DINOHead(**case["head"])
    return student


def _groups(case: dict, **kwargs) -> list[dict]:
    return param_groups(
        _student(case),
        layerwise_decay=case["layerwise_decay"],
        patch_embed_lr_mult=case["patch_embed_lr_mult"],
        **kwargs,
    )


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_param_groups_match_official(name):
    case = GROUPS[name]
    ours = [
        dict(
            module=g["module"],
            lr_multiplier=g["lr_multiplier"],
            wd_multiplier=g["wd_multiplier"],
            is_last_layer=g["is_last_layer"],
            param_names=[n.removeprefix(g["module"] + ".") for n in g["param_names"]],
        )
        for g in _groups(case)
    ]
    official = [{k: v for k, v in g.items() if k != "foreach"} for g in case["groups"]]
    assert ours == official  # same groups, same order, same members, exact multipliers


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_apply_schedules_matches_official(name):
    case = GROUPS[name]
    groups = _groups(case)
    optimizer = build_optimizer(groups, betas=tuple(case["betas"]))
    assert optimizer.defaults["betas"] == tuple(case["betas"])
    apply_schedules(optimizer, {**case["apply_values"], "momentum": 0.5, "teacher_temp": 0.1})
    got = [dict(lr=g["lr"], weight_decay=g["weight_decay"]) for g in optimizer.param_groups]
    assert got == case["applied"]


def test_every_trainable_parameter_in_exactly_one_group():
    student = {"backbone": build_vit("debug", block_chunks=2, init_values=1e-5), "dino_head": DINOHead(96, 50)}
    student["backbone"].mask_token.requires_grad_(False)
    groups = param_groups(student, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for m in student.values() for p in m.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    names = [n for g in groups for n in g["param_names"]]
    assert "backbone.mask_token" not in names
    assert len(names) == len(set(names)) == len(grouped)
    with pytest.raises(ValueError, match="share parameters"):
        param_groups({"a": student["dino_head"], "b": student["dino_head"]})


def test_no_weight_decay_set():
    student = {
        "backbone": build_vit("debug", block_chunks=0, init_values=1e-5, num_register_tokens=2),
        "dino_head": DINOHead(96, 50),
    }

    def no_wd(groups):
        return {n for g in groups if g["wd_multiplier"] == 0.0 for n in g["param_names"]}

    expected = {  # by module type: biases, LayerNorm weights, LayerScale gammas
        f"{m}.{prefix + '.' if prefix else ''}{n}"
        for m, mod in student.items()
        for prefix, sub in mod.named_modules()
        for n, _ in sub.named_parameters(recurse=False)
        if n == "bias" or isinstance(sub, torch.nn.LayerNorm | LayerScale)
    }
    assert no_wd(param_groups(student)) == expected  # official: tokens and last_layer.weight_g are decayed
    assert "backbone.blocks.0.ls1.gamma" in expected and "backbone.norm.weight" in expected
    tokens = {f"backbone.{t}" for t in ("cls_token", "pos_embed", "mask_token", "register_tokens")}
    assert no_wd(param_groups(student, no_wd_on_tokens=True)) == expected | tokens


def test_layer_ids_and_multipliers():
    assert [layer_id(n, 4) for n in ("cls_token", "patch_embed.proj.weight", "blocks.2.attn.qkv.weight")] == [0, 0, 3]
    assert layer_id("blocks.1.3.mlp.fc1.weight", 4) == 4  # chunked: the global index, not the chunk
    assert layer_id("norm.weight", 4) == 5
    assert layer_id("mlp.0.weight", 0) == layer_id("last_layer.weight_g", 0) == 1
    # torch.compile / FSDP1 / activation-checkpoint wrappers do not change the result
    wrapped = "_orig_mod.blocks.0._fsdp_wrapped_module.1._checkpoint_wrapped_module.attn.proj.bias"
    assert param_multipliers(wrapped, n_blocks=4, layerwise_decay=0.5) == (0.5**3, 0.0, False)
    assert param_multipliers("patch_embed.proj.weight", n_blocks=2, layerwise_decay=0.5, patch_embed_lr_mult=0.2) == (
        0.5**3 * 0.2,
        1.0,
        False,
    )
    with pytest.raises(ValueError, match="n_blocks=4"):
        layer_id("blocks.4.norm1.weight", 4)


def test_frozen_last_layer_does_not_move_and_the_rest_does():
    student = {
        "backbone": build_vit("debug", block_chunks=0),
        "dino_head": DINOHead(96, 50, hidden_dim=64, bottleneck_dim=32),
    }
    optimizer = build_optimizer(param_groups(student, layerwise_decay=0.9, patch_embed_lr_mult=0.2))
    before = {n: p.detach().clone() for m in student.values() for n, p in m.named_parameters()}
    x = torch.randn(2, 3, 64, 64)
    student["dino_head"](student["backbone"](x)).square().mean().backward()
    apply_schedules(optimizer, OFFICIAL_SCHEDULES.at(12))  # in the lr warm-up, last layer still frozen
    optimizer.step()
    head = dict(student["dino_head"].named_parameters())
    assert torch.equal(head["last_layer.weight_v"], before["last_layer.weight_v"])
    assert torch.equal(head["last_layer.weight_g"], before["last_layer.weight_g"])
    assert not torch.equal(head["mlp.0.weight"], before["mlp.0.weight"])
    assert not torch.equal(student["backbone"].blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])


def test_bad_groups_and_values_are_rejected():
    with pytest.raises(ValueError, match="param_groups"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}])
    optimizer = build_optimizer(param_groups({"head": DINOHead(8, 4, hidden_dim=8, bottleneck_dim=4)}))
    with pytest.raises(ValueError, match="last_layer_lr"):
        apply_schedules(optimizer, {"lr": 1.0, "wd": 0.0})
    with pytest.raises(TypeError, match=r"nn\.Module"):
        param_groups({"head": torch.zeros(1)})
    with pytest.raises(ValueError, match="layerwise_decay"):
        param_groups({"head": DINOHead(8, 4)}, layerwise_decay=0.0)
