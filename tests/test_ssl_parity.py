"""One training step of `SSLModel` against the official `SSLMetaArch.forward_backward`, end to end.

The fixture (fixtures/official/ssl_step.safetensors, written by tools/make_ssl_fixtures.py) holds the weights, the
centres and one collated batch of the official step, and what that step computed from them: teacher targets, the
loss dict and the backpropagated total, gradients and the updated centres, for four cases (iBOT head shared or
separate x softmax centring or Sinkhorn-Knopp). Here the same weights go into our model (the official student and
teacher keys are ours under `student.` / `teacher.`; `dino_loss.center` is our `dino_center.center`, the (1, 1, K)
`ibot_patch_loss.center` our (1, K) `ibot_center.center`) and our step runs on the same batch.

The backbone is smaller than any preset (48-d, 2 blocks; see the fixture's metadata) so that the fixture stays
small: the `debug` preset is replaced by it while the model is built.
"""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from opendino.cli import load_train_config
from opendino.data.collate import Batch, TrainSample
from opendino.data.pipeline import make_collate
from opendino.models import vit
from opendino.train.ssl import SSLModel, TeacherTargets

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "ssl_step.safetensors"
CASES = ("shared_centering", "shared_sinkhorn", "separate_centering", "separate_sinkhorn")
# float32 on CPU; largest differences measured: losses 2e-7 relative, teacher targets 6e-7 absolute, gradients
# 1.9e-6 absolute (under 1e-6 of each tensor's largest entry), centres 1.5e-8 absolute
TOL = {"rtol": 1e-5, "atol": 1e-6}


@cache
def _fixture() -> tuple[dict[str, Tensor], dict]:
    with safe_open(str(FIXTURE), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return load_file(FIXTURE), meta


def _cfg(separate_head: bool, centering: str):
    _, meta = _fixture()
    o, d = meta["overrides"], meta["defaults"]
    lo, hi = d["ibot.mask_ratio_min_max"]
    heads = [
        f"{part}.{key}={o[part][key]}"
        for part in ("dino", "ibot")
        for key in ("head_n_prototypes", "head_bottleneck_dim", "head_hidden_dim", "head_nlayers")
    ]
    return load_train_config(
        "debug",
        [
            "data.source=unused",
            f"crops.global_crops_size={o['crops']['global_crops_size']}",
            f"crops.local_crops_size={o['crops']['local_crops_size']}",
            f"crops.local_crops_number={o['crops']['local_crops_number']}",
            f"model.patch_size={o['student']['patch_size']}",
            f"model.drop_path_rate={o['student']['drop_path_rate']}",
            f"model.layerscale={o['student']['layerscale']}",
            f"model.block_chunks={o['student']['block_chunks']}",
            f"model.ffn_layer={o['student']['ffn_layer']}",
            *heads,
            f"dino.loss_weight={d['dino.loss_weight']}",
            f"koleo.loss_weight={d['dino.koleo_loss_weight']}",
            f"ibot.loss_weight={d['ibot.loss_weight']}",
            f"ibot.mask_sample_probability={d['ibot.mask_sample_probability']}",
            f"ibot.mask_ratio_min_max=[{lo},{hi}]",
            f"ibot.separate_head={separate_head}",
            f"teacher.centering={centering}",
        ],
    )


def _batch() -> Batch:
    t, meta = _fixture()
    return Batch(
        global_crops=t["batch.global_crops"].float(),
        local_crops=t["batch.local_crops"].float(),
        masks=t["batch.masks"],
        mask_indices=t["batch.mask_indices"],
        masks_weight=t["batch.masks_weight"],
        n_masked_patches=t["batch.n_masked_patches"],
        upperbound=int(t["batch.upperbound"]),
        n_images=meta["B"],
        indices=torch.arange(meta["B"]),
        bad_images=[],
    )


class Step(NamedTuple):
    case: str
    model: SSLModel
    targets: TeacherTargets
    losses: dict[str, Tensor]


def _model(case: str) -> SSLModel:
    """Our model with the official weights and centres of `case` loaded (strict)."""
    t, meta = _fixture()
    spec = meta["cases"][case]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(vit.PRESETS, "debug", dict(meta["tiny_arch"]))
        model = SSLModel(_cfg(spec["separate_head"], spec["centering"]))
    state = {k.removeprefix("state."): v.float() for k, v in t.items() if k.startswith("state.")}
    if not spec["separate_head"]:
        state = {k: v for k, v in state.items() if not k.startswith("ibot_head.")}
    ours = {f"{part}.{k}": v for part in ("student", "teacher") for k, v in state.items()}
    ours["dino_center.center"] = t["center.dino"].float()
    ibot_center = t["center.ibot_separate" if spec["separate_head"] else "center.ibot_shared"]
    ours["ibot_center.center"] = ibot_center.float().reshape(1, -1)  # official (1, 1, K), ours (1, K)
    model.load_state_dict(ours, strict=True)
    return model


@pytest.fixture(scope="module", params=CASES)
def step(request: pytest.FixtureRequest) -> Step:
    case = request.param
    model = _model(case)
    batch = _batch()
    targets = model.teacher_targets(batch, _fixture()[1]["teacher_temp"])
    losses = model.compute_losses(model.student_outputs(batch), targets, batch)
    losses["total"].backward()
    return Step(case, model, targets, losses)


def _official(case: str, name: str) -> Tensor:
    return _fixture()[0][f"{case}.{name}"]


def test_fixture_is_the_documented_setup():
    t, meta = _fixture()
    assert set(meta["cases"]) == set(CASES)
    assert meta["official_commit"].startswith("b8931f7")
    masks = t["batch.masks"]
    n_masked = int(masks.sum())
    assert masks.any(1).sum() == 3 and n_masked == int(t["batch.n_masked_patches"]) == meta["n_masked_patches"] > 0
    assert list(t["batch.mask_indices"]) == list(masks.flatten().nonzero().flatten())


def test_our_collate_makes_the_official_masks_from_the_same_random_state():
    t, meta = _fixture()
    b, n_local = meta["B"], meta["n_local_crops"]
    g, loc = t["batch.global_crops"].float(), t["batch.local_crops"].float()
    samples = [
        TrainSample({"global_crops": [g[i], g[b + i]], "local_crops": [loc[j * b + i] for j in range(n_local)]}, i, 0)
        for i in range(b)
    ]
    spec = meta["cases"]["shared_centering"]
    ours = make_collate(_cfg(spec["separate_head"], spec["centering"]))(samples, random.Random(meta["mask_seed"]))
    expected = _batch()
    for name in ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight", "n_masked_patches"):
        torch.testing.assert_close(getattr(ours, name), getattr(expected, name), rtol=0, atol=0, msg=name)
    assert ours.upperbound == expected.upperbound


def test_teacher_targets_match_the_official(step: Step):
    torch.testing.assert_close(step.targets.dino, _official(step.case, "teacher.dino"), **TOL)
    torch.testing.assert_close(step.targets.ibot, _official(step.case, "teacher.ibot"), **TOL)


def test_loss_terms_and_total_match_the_official(step: Step):
    """Official loss dict: koleo_loss = koleo_loss_weight * KoLeo / 2 and ibot_loss = iBOT / 2 (display scaling);
    the total is its backpropagated `loss_accumulator`."""
    koleo_weight = step.model.cfg.koleo.loss_weight
    ours = step.losses
    pairs = {
        "dino_local_crops_loss": ours["dino_local"],
        "dino_global_crops_loss": ours["dino_global"],
        "koleo_loss": koleo_weight * ours["koleo"] / 2,
        "ibot_loss": ours["ibot"] / 2,
        "total": ours["total"],
    }
    for name, value in pairs.items():
        torch.testing.assert_close(value.detach(), _official(step.case, f"loss.{name}"), **TOL, msg=name)


def test_gradients_match_the_official(step: Step):
    t, _ = _fixture()
    params = dict(step.model.student.named_parameters())
    prefix = f"{step.case}.grad_norm."
    norms = {k.removeprefix(prefix): v for k, v in t.items() if k.startswith(prefix)}
    assert set(norms) == set(params)  # every student parameter, and only those, has an official gradient
    for name, p in params.items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad.norm(), norms[name], **TOL, msg=name)
    prefix = f"{step.case}.grad."
    full = {k.removeprefix(prefix): v for k, v in t.items() if k.startswith(prefix)}
    assert "backbone.mask_token" in full and "dino_head.last_layer.weight_v" in full
    for name, grad in full.items():
        torch.testing.assert_close(params[name].grad, grad, **TOL, msg=name)
    assert not any(p.grad is not None for p in step.model.teacher.parameters())


def test_centres_after_the_step_match_the_official(step: Step):
    """Centring: the official deferred update, applied; Sinkhorn-Knopp leaves both centres as they were."""
    dino = step.model.dino_center.center
    ibot = step.model.ibot_center.center
    torch.testing.assert_close(dino, _official(step.case, "center_after.dino"), **TOL)
    torch.testing.assert_close(ibot, _official(step.case, "center_after.ibot").reshape(1, -1), **TOL)
