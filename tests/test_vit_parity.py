"""Parity with the official DINOv2 code: outputs, key names and shapes.

The fixtures in tests/fixtures/official were computed once from facebookresearch/dinov2 @ b8931f7 by
tools/make_official_fixtures.py (numbers only; no official code is in this repository).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from opendino.models import DINOHead, DinoVisionTransformer
from opendino.models.hub import HUB_MODELS, build_backbone, hub_kwargs

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CASES = {k: v for k, v in json.loads((FIXTURES / "tiny_cases.json").read_text()).items() if not k.startswith("_")}
HUB_KEYS = {k: v for k, v in json.loads((FIXTURES / "hub_keys.json").read_text()).items() if not k.startswith("_")}
OUT_KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")
ATOL = 1e-5


def _read(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {"state": {}, "in": {}, "out": {}}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            group, key = name.split(".", 1)
            t = f.get_tensor(name)
            groups[group][key] = t.float() if t.is_floating_point() else t
    return groups


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    name = request.param
    data = _read(FIXTURES / f"tiny_{name}.safetensors")
    model = DinoVisionTransformer(**CASES[name]["kwargs"]).eval()
    model.load_state_dict(data["state"], strict=True)
    return name, model, data["in"], data["out"]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_forward_features(case):
    _, model, inputs, out = case
    runs = {
        "ff_square": model.forward_features(inputs["x_square"]),
        "ff_rect": model.forward_features(inputs["x_rect"]),
        "ff_big": model.forward_features(inputs["x_big"]),
        "ff_masked": model.forward_features(inputs["x_square"], masks=inputs["masks"]),
    }
    for run, result in runs.items():
        for key in OUT_KEYS:
            _close(result[key], out[f"{run}.{key}"])
    assert runs["ff_masked"]["masks"] is inputs["masks"]
    assert runs["ff_square"]["masks"] is None


@torch.no_grad()
def test_forward_and_intermediate_layers(case):
    _, model, inputs, out = case
    _close(model(inputs["x_square"]), out["forward_square"])
    n2 = model.get_intermediate_layers(inputs["x_rect"], n=2)
    assert isinstance(n2, tuple) and len(n2) == 2
    for i, t in enumerate(n2):
        _close(t, out[f"gil_n2.{i}"])
    pairs = model.get_intermediate_layers(inputs["x_rect"], n=[0, 2], reshape=True, return_class_token=True)
    for i, (patch, cls) in enumerate(pairs):
        _close(patch, out[f"gil_idx_reshape_cls.{i}.patch"])
        _close(cls, out[f"gil_idx_reshape_cls.{i}.cls"])
    _close(model.get_intermediate_layers(inputs["x_rect"], n=1, norm=False)[0], out["gil_nonorm.0"])
    # negative indices are ours, and mean the same blocks
    neg = model.get_intermediate_layers(inputs["x_rect"], n=[-model.n_blocks, -1 - (model.n_blocks - 3)])
    _close(neg[0], out["gil_idx_reshape_cls.0.patch"].flatten(2).transpose(1, 2))


@torch.no_grad()
def test_position_interpolation(case):
    _, model, inputs, out = case
    for name in ("rect", "big"):
        x = inputs[f"x_{name}"]
        tokens = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), model.patch_embed(x)), dim=1)
        _close(model.interpolate_pos_encoding(tokens, x.shape[2], x.shape[3]), out[f"pos_{name}"])


@torch.no_grad()
def test_list_input_equals_separate_calls(case):
    _, model, inputs, _ = case
    xs = [inputs["x_square"], inputs["x_rect"]]
    listed = model.forward_features(xs, [inputs["masks"], None])
    alone = [model.forward_features(xs[0], masks=inputs["masks"]), model.forward_features(xs[1])]
    for a, b in zip(listed, alone, strict=True):
        for key in OUT_KEYS:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert model(xs, is_training=True)[0]["x_norm_clstoken"].shape == (2, model.embed_dim)


def test_state_dict_keys_in_official_order():
    for name, spec in CASES.items():
        model = DinoVisionTransformer(**spec["kwargs"])
        assert list(model.state_dict()) == spec["state_dict_keys"], name


@pytest.mark.parametrize("name", sorted(HUB_KEYS))
def test_hub_model_keys_and_shapes(name):
    expected = HUB_KEYS[name]
    if name in HUB_MODELS:
        kwargs = hub_kwargs(name)
        assert {k: kwargs[k] for k in expected["kwargs"] if k != "block_fn"} == {
            k: v for k, v in expected["kwargs"].items() if k != "block_fn"
        }
    else:  # the official training layout (chunked blocks)
        kwargs = {k: v for k, v in expected["kwargs"].items() if k != "block_fn"}
    with torch.device("meta"):
        model = DinoVisionTransformer(**kwargs)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected["state_dict"])
    assert got == expected["state_dict"]


def test_hub_functions_load_strict(tmp_path):
    model = build_backbone("debug")
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    again = build_backbone("debug", pretrained=path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    with pytest.raises(ValueError, match="never downloads"):
        build_backbone("dinov2_vits14", pretrained=True)


@pytest.mark.parametrize("fixture", ["dino_head", "dino_head_1layer"])
def test_dino_head_parity(fixture):
    data = _read(FIXTURES / f"{fixture}.safetensors")
    nlayers = 1 if fixture.endswith("1layer") else 3
    head = DINOHead(in_dim=48, out_dim=100, nlayers=nlayers, hidden_dim=32, bottleneck_dim=16)
    assert list(head.state_dict()) == list(data["state"]) or set(head.state_dict()) == set(data["state"])
    head.load_state_dict(data["state"], strict=True)
    with torch.no_grad():
        _close(head.mlp(data["in"]["x"]), data["out"]["bottleneck"])
        _close(head(data["in"]["x"]), data["out"]["y"])


INIT = json.loads((FIXTURES / "init_seed0.json").read_text())


def _stats(sd: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    return {
        k: [v.double().sum().item(), v.double().square().sum().item(), *v.double().flatten()[:4].tolist()]
        for k, v in sd.items()
    }


@pytest.mark.parametrize("name", [k for k in INIT if k.startswith("vit")])
def test_same_seed_gives_the_official_initial_weights(name):
    torch.manual_seed(INIT["_meta"]["seed"])
    model = DinoVisionTransformer(**INIT[name]["kwargs"])
    got, expected = _stats(model.state_dict()), INIT[name]["tensors"]
    assert list(got) == list(expected)
    for k in expected:
        torch.testing.assert_close(torch.tensor(got[k]), torch.tensor(expected[k]), rtol=1e-7, atol=1e-12, msg=k)


def test_same_seed_gives_the_official_head_init():
    torch.manual_seed(INIT["_meta"]["seed"])
    head = DINOHead(**INIT["dino_head"]["kwargs"])
    got, expected = _stats(head.state_dict()), INIT["dino_head"]["tensors"]
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(torch.tensor(got[k]), torch.tensor(expected[k]), rtol=1e-7, atol=1e-12, msg=k)
