"""Tests of opendino.models.convert: official <-> timm / Hugging Face state dicts.

Tiny random models (pretrained=False everywhere, configs built locally, no downloads) check strict loading, feature
parity within 1e-5 (fp32, eval, CPU) and bit-identical round trips; the real S/B/L/g sizes, with and without
registers, are checked for keys and shapes on the meta device. The official side is
`opendino.models.vit.DinoVisionTransformer`; the expected timm layout is also checked against timm's own converter
of official checkpoints (`checkpoint_filter_fn`), the HF hub names against transformers' own loading/saving.
"""

from __future__ import annotations

import json
import warnings
from functools import cache

import pytest
import torch

from opendino.models.convert import (
    HF_KEY_MAP,
    detect_layout,
    hf_config_from_official,
    hf_to_official,
    official_kwargs_from_hf_config,
    official_to_hf,
    official_to_timm,
    timm_extras,
    timm_model_name_and_kwargs,
    timm_to_official,
)
from opendino.models.vit import PRESETS, DinoVisionTransformer

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
# Interpolation settings of the official hub models: v1 (no registers) and with registers.
V1 = dict(num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)
REG4 = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
TINY = dict(img_size=56, patch_size=14, depth=2, num_heads=4, mlp_ratio=4, init_values=1.0, block_chunks=0)
VARIANTS = {
    "mlp": dict(TINY, embed_dim=48, ffn_layer="mlp", **V1),
    "mlp_reg4": dict(TINY, embed_dim=48, ffn_layer="mlp", **REG4),
    # embed_dim 64: timm's giant default mlp_ratio does not give the official SwiGLU width, an override is needed
    "swiglu": dict(TINY, embed_dim=64, ffn_layer="swiglufused", **V1),
    "swiglu_reg4": dict(TINY, embed_dim=64, ffn_layer="swiglufused", **REG4),
}
REGISTER_VARIANTS = ["mlp_reg4", "swiglu_reg4"]


@cache
def official(variant: str) -> DinoVisionTransformer:
    """A tiny official-layout model with every tensor random (LayerNorm affine, biases, mask token included)."""
    torch.manual_seed(sorted(VARIANTS).index(variant))
    model = DinoVisionTransformer(**VARIANTS[variant]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.cls_token.normal_()
        model.mask_token.normal_()
        if model.register_tokens is not None:
            model.register_tokens.normal_()
        model.pos_embed.normal_(std=0.5)  # large enough for interpolation differences to show
    return model


def official_tokens(model: DinoVisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """All normed tokens (B, 1 + R + N, D) in sequence order cls, registers, patches."""
    with torch.no_grad():
        out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], dim=1)


def timm_twin(variant: str) -> torch.nn.Module:
    name, kwargs = timm_model_name_and_kwargs(**VARIANTS[variant])
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    model.load_state_dict(official_to_timm(official(variant).state_dict()), strict=True)
    return model


def hf_twin(variant: str) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(**hf_config_from_official(**VARIANTS[variant]))
    model = transformers.AutoModel.from_config(config).eval()
    model.load_state_dict(official_to_hf(official(variant).state_dict()), strict=True)
    return model


def hf_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state  # after the final layernorm: cls, registers, patches


def assert_same_state_dict(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    unequal = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not unequal, unequal


def image(*hw: int) -> torch.Tensor:
    return torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(hw[0] * 1000 + hw[1]))


# ---------------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_timm_features_match_at_native_size(variant: str) -> None:
    x = image(56, 56)
    torch.testing.assert_close(
        timm_twin(variant).forward_features(x).detach(), official_tokens(official(variant), x), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("variant", REGISTER_VARIANTS)
@pytest.mark.parametrize("hw", [(42, 42), (98, 70)])
def test_timm_features_match_register_models_at_other_sizes(variant: str, hw: tuple[int, int]) -> None:
    # timm (dynamic_img_size) interpolates bicubic + antialias to an explicit size: the register models' rule
    x = image(*hw)
    torch.testing.assert_close(
        timm_twin(variant).forward_features(x).detach(), official_tokens(official(variant), x), atol=ATOL, rtol=0
    )


def test_timm_layout_is_timms_own_conversion_of_official_checkpoints() -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    for variant in VARIANTS:
        sd = official(variant).state_dict()
        expected = checkpoint_filter_fn(dict(sd), timm_twin(variant))
        assert_same_state_dict(official_to_timm(sd), expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_timm_round_trips(variant: str) -> None:
    sd = official(variant).state_dict()
    keys = list(sd)
    timm_sd = official_to_timm(sd)
    assert list(sd) == keys  # input untouched
    assert "mask_token" not in timm_sd
    # exact with the extras
    assert_same_state_dict(timm_to_official(timm_sd, extras=timm_extras(sd)), sd)
    # without them: mask token back as zeros (warned), class position folded for register models, same outputs
    with pytest.warns(UserWarning, match="mask_token"):
        back = timm_to_official(timm_sd)
    assert torch.equal(back["mask_token"], torch.zeros_like(sd["mask_token"]))
    folded = {"mask_token", "cls_token", "pos_embed"} if "register_tokens" in sd else {"mask_token"}
    assert_same_state_dict(
        {k: v for k, v in back.items() if k not in folded}, {k: sd[k] for k in sd if k not in folded}
    )
    model = DinoVisionTransformer(**VARIANTS[variant]).eval()
    model.load_state_dict(back, strict=True)
    for hw in [(56, 56), (42, 70)]:
        torch.testing.assert_close(
            official_tokens(model, image(*hw)), official_tokens(official(variant), image(*hw)), atol=0, rtol=0
        )
    # timm -> official -> timm is exact either way
    with pytest.warns(UserWarning, match="mask_token"):
        assert_same_state_dict(official_to_timm(timm_to_official(timm_sd)), timm_sd)


def test_timm_stale_extras_warn_and_keep_the_folded_form() -> None:
    sd = official("mlp_reg4").state_dict()
    timm_sd = official_to_timm(sd)
    timm_sd["cls_token"] = timm_sd["cls_token"] + 1  # e.g. fine-tuned in timm since the export
    with pytest.warns(UserWarning, match="do not fold"):
        back = timm_to_official(timm_sd, extras=timm_extras(sd))
    assert torch.equal(back["cls_token"], timm_sd["cls_token"])
    assert torch.equal(back["pos_embed"][:, 0], torch.zeros_like(back["pos_embed"][:, 0]))
    assert torch.equal(back["mask_token"], sd["mask_token"])


def test_timm_classifier_head_is_dropped_with_a_warning() -> None:
    timm_sd = official_to_timm(official("mlp").state_dict())
    timm_sd["head.weight"], timm_sd["head.bias"] = torch.zeros(10, 48), torch.zeros(10)
    with pytest.warns(UserWarning, match="classifier"):
        back = timm_to_official(timm_sd, extras=timm_extras(official("mlp").state_dict()))
    assert not any(k.startswith("head.") for k in back)


# ---------------------------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_features_match_at_native_size(variant: str) -> None:
    x = image(56, 56)
    model = hf_twin(variant)
    expected = "Dinov2WithRegistersModel" if variant in REGISTER_VARIANTS else "Dinov2Model"
    assert type(model).__name__ == expected
    torch.testing.assert_close(hf_tokens(model, x), official_tokens(official(variant), x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", REGISTER_VARIANTS)
@pytest.mark.parametrize("hw", [(42, 42), (98, 70)])
def test_hf_features_match_register_models_at_other_sizes(variant: str, hw: tuple[int, int]) -> None:
    x = image(*hw)
    torch.testing.assert_close(hf_tokens(hf_twin(variant), x), official_tokens(official(variant), x), atol=ATOL, rtol=0)


def test_nonregister_interpolation_off_native_size() -> None:
    """Documented difference: official v1 models interpolate with the 0.1 offset kludge and no antialias; HF without
    the offset, timm with antialias. `official_kwargs_from_hf_config(interpolation="hf")` reproduces HF exactly."""
    x = image(42, 70)
    ours = official_tokens(official("mlp"), x)
    assert (hf_tokens(hf_twin("mlp"), x) - ours).abs().max() > 1e-3
    assert (timm_twin("mlp").forward_features(x).detach() - ours).abs().max() > 1e-3
    hf = hf_twin("mlp")
    kwargs = official_kwargs_from_hf_config(hf.config.to_dict(), interpolation="hf")
    assert (kwargs["interpolate_antialias"], kwargs["interpolate_offset"]) == (False, 0.0)
    model = DinoVisionTransformer(**kwargs).eval()
    model.load_state_dict(hf_to_official(hf.state_dict()), strict=True)
    torch.testing.assert_close(hf_tokens(hf, x), official_tokens(model, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("names", sorted(HF_KEY_MAP))
@pytest.mark.parametrize("prefix", ["", "dinov2."])
def test_hf_round_trips(variant: str, names: str, prefix: str) -> None:
    sd = official(variant).state_dict()
    hf_sd = official_to_hf(sd, names=names, prefix=prefix)
    assert all(k.startswith(prefix) for k in hf_sd)
    assert_same_state_dict(hf_to_official(hf_sd), sd)


@pytest.mark.parametrize("variant", ["mlp", "swiglu_reg4"])
def test_hf_hub_names_go_through_from_pretrained_and_save_pretrained(variant: str, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    sd = official(variant).state_dict()
    save_file(official_to_hf(sd, names="hub"), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_official(**VARIANTS[variant])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    x = image(56, 56)
    torch.testing.assert_close(hf_tokens(model.eval(), x), official_tokens(official(variant), x), atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert any(".attention.attention.query." in k for k in saved)  # save_pretrained writes the hub names
    assert_same_state_dict(hf_to_official(saved), sd)


def test_hf_task_model_prefix_and_head() -> None:
    sd = official("mlp_reg4").state_dict()
    config = transformers.AutoConfig.for_model(**hf_config_from_official(**VARIANTS["mlp_reg4"]), num_labels=3)
    model = transformers.Dinov2WithRegistersForImageClassification(config)
    head = {k: v for k, v in model.state_dict().items() if k.startswith("classifier.")}
    model.load_state_dict({**official_to_hf(sd, prefix="dinov2_with_registers."), **head}, strict=True)
    assert detect_layout(model.state_dict()) == "hf"
    with pytest.warns(UserWarning, match="classifier"):
        assert_same_state_dict(hf_to_official(model.state_dict()), sd)


def test_hf_without_layerscale_gets_unit_lambdas() -> None:
    kwargs = dict(VARIANTS["mlp"], init_values=None)
    torch.manual_seed(0)
    model = DinoVisionTransformer(**kwargs).eval()
    with pytest.warns(UserWarning, match="LayerScale"):
        hf_sd = official_to_hf(model.state_dict())
    hf = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**hf_config_from_official(**kwargs)))
    hf.load_state_dict(hf_sd, strict=True)
    x = image(56, 56)
    torch.testing.assert_close(hf_tokens(hf.eval(), x), official_tokens(model, x), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- configs, detection
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_config_round_trip(variant: str) -> None:
    kwargs = VARIANTS[variant]
    config = hf_config_from_official(**kwargs)
    assert config["model_type"] == ("dinov2_with_registers" if variant in REGISTER_VARIANTS else "dinov2")
    built = transformers.AutoConfig.for_model(**config).to_dict()
    back = official_kwargs_from_hf_config(built)
    assert {k: back[k] for k in kwargs} == {**kwargs, "mlp_ratio": 4.0}


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"mlp_ratio=2\.5"):
        hf_config_from_official(mlp_ratio=2.5)
    with pytest.raises(ValueError, match="square"):
        official_kwargs_from_hf_config({"model_type": "dinov2", "image_size": [224, 448]})
    with pytest.raises(ValueError, match="model_type='vit'"):
        official_kwargs_from_hf_config({"model_type": "vit"})
    with pytest.raises(ValueError, match="ffn_layer='identity'"):
        timm_model_name_and_kwargs(ffn_layer="identity")
    with pytest.warns(UserWarning, match="antialias"):
        hf_config_from_official(**dict(VARIANTS["mlp_reg4"], interpolate_antialias=False))


def test_detect_layout() -> None:
    for variant in VARIANTS:
        sd = official(variant).state_dict()
        assert detect_layout(sd) == "official"
        assert detect_layout(official_to_timm(sd)) == "timm"
        for names in HF_KEY_MAP:
            for prefix in ["", "dinov2.", "dinov2_with_registers.", "backbone."]:
                assert detect_layout(official_to_hf(sd, names=names, prefix=prefix)) == "hf"
    chunked = DinoVisionTransformer(**dict(VARIANTS["mlp"], block_chunks=2)).state_dict()
    assert detect_layout(chunked) == "official_chunked"
    with pytest.raises(ValueError, match="chunked"):
        official_to_timm(chunked)
    with pytest.raises(ValueError, match="unrecognised"):
        detect_layout({"teacher.backbone.cls_token": torch.zeros(1)})
    with pytest.raises(ValueError, match="'timm' layout"):
        official_to_hf(official_to_timm(official("mlp").state_dict()))
    with pytest.raises(ValueError, match="no mapping"):
        official_to_timm({**official("mlp").state_dict(), "blocks.0.attn.extra": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------- real sizes
REAL = {
    "vit_small": ("vit_small_patch14", "mlp"),
    "vit_base": ("vit_base_patch14", "mlp"),
    "vit_large": ("vit_large_patch14", "mlp"),
    "vit_giant2": ("vit_giant_patch14", "swiglufused"),
}


@pytest.mark.parametrize("arch", sorted(REAL))
@pytest.mark.parametrize("registers", [False, True])
def test_real_sizes_keys_and_shapes(arch: str, registers: bool) -> None:
    stem, ffn = REAL[arch]
    kwargs = dict(
        PRESETS[arch],
        img_size=518,
        patch_size=14,
        ffn_layer=ffn,
        init_values=1.0,
        block_chunks=0,
        **(REG4 if registers else V1),
    )
    name, timm_kwargs = timm_model_name_and_kwargs(**kwargs)
    assert name == stem + ("_reg4" if registers else "") + "_dinov2"
    assert not {"embed_dim", "depth", "num_heads", "mlp_ratio", "reg_tokens"} & set(timm_kwargs)
    with torch.device("meta"):
        sd = DinoVisionTransformer(**kwargs).state_dict()
        timm_model = timm.create_model(name, pretrained=False, **timm_kwargs)
        config = transformers.AutoConfig.for_model(**hf_config_from_official(**kwargs))
        hf_model = transformers.AutoModel.from_config(config)
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, kwargs["embed_dim"])

    def shapes(d: dict) -> dict:
        return {k: tuple(v.shape) for k, v in d.items()}

    timm_sd, hf_sd = official_to_timm(sd), official_to_hf(sd)
    assert shapes(timm_sd) == shapes(timm_model.state_dict())
    assert shapes(hf_sd) == shapes(hf_model.state_dict())
    timm_model.load_state_dict(timm_sd, strict=True, assign=True)
    hf_model.load_state_dict(hf_sd, strict=True, assign=True)
    with pytest.warns(UserWarning, match="mask_token"):
        assert shapes(timm_to_official(timm_sd)) == shapes(sd)
    assert shapes(hf_to_official(official_to_hf(sd, names="hub"))) == shapes(sd)
    assert official_kwargs_from_hf_config(config.to_dict()) == {
        **kwargs,
        "in_chans": 3,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
    }
