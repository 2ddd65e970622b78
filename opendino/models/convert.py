"""Convert DINOv2 backbone state dicts between the official layout and the timm and Hugging Face layouts.

Official: facebookresearch/dinov2 `DinoVisionTransformer` with flat `blocks.<i>` keys (hub models), also the layout
of `opendino.models.vit`. timm: `VisionTransformer` of timm 1.0's `vit_*_patch14[_reg4]_dinov2` entry points (facts
from `timm/models/vision_transformer.py`, `_convert_dinov2`). Hugging Face: `Dinov2Model` / `Dinov2WithRegistersModel`
by transformers 5 module names ("module") or by the names of Hub checkpoints, `save_pretrained` files and
transformers 4 modules ("hub"); facts from transformers 5.23 `models/dinov2*/` and `conversion_mapping.py`.
Key maps are data (`TIMM_KEY_MAP`, `HF_KEY_MAP`): one target name renames, several split along dim 0 (the inverse
concatenates), both exact; tensors a layout has no slot for are documented per function.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch
from torch import Tensor

from opendino.models.layers import swiglu_hidden_features

__all__ = [
    "HF_KEY_MAP",
    "TIMM_KEY_MAP",
    "Layout",
    "detect_layout",
    "hf_config_from_official",
    "hf_to_official",
    "official_kwargs_from_hf_config",
    "official_to_hf",
    "official_to_timm",
    "timm_extras",
    "timm_model_name_and_kwargs",
    "timm_to_official",
]

Layout = Literal["official", "official_chunked", "timm", "hf"]
HFNames = Literal["module", "hub"]
StateDict = Mapping[str, Tensor]

# A rule maps one official key template to one or more foreign key templates. Placeholders: {i} a block index,
# {p} "weight" or "bias". Several targets: the official tensor is split into equal parts along dim 0, in order.
Rule = tuple[str, tuple[str, ...]]

_SHARED_RULES: list[Rule] = [
    ("patch_embed.proj.{p}", ("patch_embed.proj.{p}",)),
    ("blocks.{i}.norm1.{p}", ("blocks.{i}.norm1.{p}",)),
    ("blocks.{i}.attn.qkv.{p}", ("blocks.{i}.attn.qkv.{p}",)),
    ("blocks.{i}.attn.proj.{p}", ("blocks.{i}.attn.proj.{p}",)),
    ("blocks.{i}.ls1.gamma", ("blocks.{i}.ls1.gamma",)),
    ("blocks.{i}.norm2.{p}", ("blocks.{i}.norm2.{p}",)),
    ("blocks.{i}.ls2.gamma", ("blocks.{i}.ls2.gamma",)),
    ("norm.{p}", ("norm.{p}",)),
]

# timm: the official names except for the register tokens and the SwiGLU FFN (timm's `SwiGLUPacked` is a GluMlp
# with gate first: fc1 = [x1; x2] like w12, fc2 = w3). cls_token / pos_embed / mask_token are handled in code.
TIMM_KEY_MAP: dict[str, list[Rule]] = {
    "common": [
        ("cls_token", ("cls_token",)),
        ("pos_embed", ("pos_embed",)),
        ("register_tokens", ("reg_token",)),
        *_SHARED_RULES,
    ],
    "mlp": [
        ("blocks.{i}.mlp.fc1.{p}", ("blocks.{i}.mlp.fc1.{p}",)),
        ("blocks.{i}.mlp.fc2.{p}", ("blocks.{i}.mlp.fc2.{p}",)),
    ],
    "swiglu": [
        ("blocks.{i}.mlp.w12.{p}", ("blocks.{i}.mlp.fc1.{p}",)),
        ("blocks.{i}.mlp.w3.{p}", ("blocks.{i}.mlp.fc2.{p}",)),
    ],
}

_L = "encoder.layer.{i}."
_HF_COMMON: list[Rule] = [
    ("cls_token", ("embeddings.cls_token",)),
    ("mask_token", ("embeddings.mask_token",)),  # (1, D) in both layouts
    ("pos_embed", ("embeddings.position_embeddings",)),  # (1, 1 + M*M, D) in both layouts
    ("register_tokens", ("embeddings.register_tokens",)),
    ("patch_embed.proj.{p}", ("embeddings.patch_embeddings.projection.{p}",)),
    ("blocks.{i}.norm1.{p}", (_L + "norm1.{p}",)),
    ("blocks.{i}.ls1.gamma", (_L + "layer_scale1.lambda1",)),
    ("blocks.{i}.norm2.{p}", (_L + "norm2.{p}",)),
    ("blocks.{i}.mlp.fc1.{p}", (_L + "mlp.fc1.{p}",)),
    ("blocks.{i}.mlp.fc2.{p}", (_L + "mlp.fc2.{p}",)),
    ("blocks.{i}.ls2.gamma", (_L + "layer_scale2.lambda1",)),
    ("norm.{p}", ("layernorm.{p}",)),
]
HF_KEY_MAP: dict[str, list[Rule]] = {
    # transformers >= 5 modules (what `load_state_dict` wants): split q/k/v, SwiGLU gate/up = w12's halves.
    "module": [
        *_HF_COMMON,
        ("blocks.{i}.attn.qkv.{p}", tuple(_L + f"attention.{n}_proj.{{p}}" for n in "qkv")),
        ("blocks.{i}.attn.proj.{p}", (_L + "attention.o_proj.{p}",)),
        ("blocks.{i}.mlp.w12.{p}", (_L + "mlp.gate_proj.{p}", _L + "mlp.up_proj.{p}")),
        ("blocks.{i}.mlp.w3.{p}", (_L + "mlp.down_proj.{p}",)),
    ],
    # Hub checkpoints, `save_pretrained` output and transformers 4 modules; weights_in is fused like w12.
    "hub": [
        *_HF_COMMON,
        ("blocks.{i}.attn.qkv.{p}", tuple(_L + f"attention.attention.{n}.{{p}}" for n in ("query", "key", "value"))),
        ("blocks.{i}.attn.proj.{p}", (_L + "attention.output.dense.{p}",)),
        ("blocks.{i}.mlp.w12.{p}", (_L + "mlp.weights_in.{p}",)),
        ("blocks.{i}.mlp.w3.{p}", (_L + "mlp.weights_out.{p}",)),
    ],
}
_HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"

# Official hub architectures (dinov2/models/vision_transformer.py) and their timm entry-point sizes.
_TIMM_SIZES = {(384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large", (1536, 40, 24): "giant"}
_TIMM_GIANT_MLP_RATIO = 2.66667 * 2  # timm's giant entry points: int(1536 * 5.33334) = 8192 = 2 * 4096
_TIMM_INIT_VALUES = 1e-5


# ---------------------------------------------------------------------------------------------- rule engine
_PLACEHOLDER_RE = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)"}


@dataclass(frozen=True)
class _CompiledRule:
    src: str
    dst: tuple[str, ...]
    src_re: re.Pattern[str]
    dst_re: tuple[re.Pattern[str], ...]


def _compile_template(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[a-z]\})", template)
    return re.compile("".join(_PLACEHOLDER_RE[p[1]] if p.startswith("{") else re.escape(p) for p in parts if p))


@cache
def _compile(rules: tuple[Rule, ...]) -> tuple[_CompiledRule, ...]:
    return tuple(
        _CompiledRule(src, dst, _compile_template(src), tuple(_compile_template(d) for d in dst)) for src, dst in rules
    )


def _preview(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    return str(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _forward(sd: StateDict, rules: Iterable[Rule], what: str) -> dict[str, Tensor]:
    """Official -> foreign names; a rule with several targets splits the tensor into equal parts along dim 0."""
    out: dict[str, Tensor] = {}
    unknown = []
    compiled = _compile(tuple(rules))
    for key, value in sd.items():
        match = None
        for rule in compiled:
            match = rule.src_re.fullmatch(key)
            if match:
                break
        if match is None:
            unknown.append(key)
            continue
        names = [d.format(**match.groupdict()) for d in rule.dst]
        if len(names) == 1:
            out[names[0]] = value
            continue
        if value.shape[0] % len(names):
            raise ValueError(f"{what}: {key} of shape {tuple(value.shape)} does not split into {len(names)} parts")
        for name, part in zip(names, value.chunk(len(names), dim=0), strict=True):
            out[name] = part.clone()  # own storage: safetensors refuses tensors that share memory
    if unknown:
        raise ValueError(f"{what}: no mapping for keys {_preview(unknown)}")
    return out


def _match_foreign(key: str, compiled: Iterable[_CompiledRule]) -> tuple[_CompiledRule, int, dict[str, str]] | None:
    """The rule, target index and placeholder values of a foreign key, or None."""
    for rule in compiled:
        for index, pattern in enumerate(rule.dst_re):
            match = pattern.fullmatch(key)
            if match:
                return rule, index, match.groupdict()
    return None


def _inverse(sd: StateDict, rules: Iterable[Rule], what: str) -> dict[str, Tensor]:
    """Foreign -> official names; the parts of a split tensor are concatenated back along dim 0."""
    out: dict[str, Tensor] = {}
    unknown = []
    compiled = _compile(tuple(rules))
    for key, value in sd.items():
        found = _match_foreign(key, compiled)
        if found is None:
            unknown.append(key)
            continue
        rule, index, groups = found
        if len(rule.dst) == 1:
            out[rule.src.format(**groups)] = value
            continue
        names = [d.format(**groups) for d in rule.dst]
        missing = [n for n in names if n not in sd]
        if missing:
            raise ValueError(f"{what}: {key} comes without its sibling(s) {missing}")
        if index == 0:  # the other parts are consumed here
            out[rule.src.format(**groups)] = torch.cat([sd[n] for n in names], dim=0)
    if unknown:
        raise ValueError(f"{what}: no mapping for keys {_preview(unknown)}")
    return out


# ---------------------------------------------------------------------------------------------- detection
def detect_layout(state_dict: StateDict) -> Layout:
    """Which layout a backbone state dict is in.

    "hf": a key ends with `embeddings.patch_embeddings.projection.weight` (any prefix, e.g. `dinov2.` of a task
    model, `dinov2_with_registers.`, `backbone.`). "official_chunked": `blocks.<chunk>.<i>.*` keys. "official": flat
    blocks and a `mask_token` (every official model has one), `register_tokens` or a SwiGLU `mlp.w12`. "timm": flat
    blocks otherwise (timm has no mask token; registers are `reg_token`). Anything else raises ValueError; wrapped
    training checkpoints (`teacher.backbone.`, `module.`) are for the checkpoint loader to unwrap first.
    """
    keys = list(state_dict)
    if any(k == _HF_ANCHOR or k.endswith("." + _HF_ANCHOR) for k in keys):
        return "hf"
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in keys):
        return "official_chunked"
    if "patch_embed.proj.weight" in state_dict and any(re.match(r"blocks\.\d+\.", k) for k in keys):
        if "mask_token" in state_dict or "register_tokens" in state_dict or any(".mlp.w12." in k for k in keys):
            return "official"
        return "timm"
    raise ValueError(f"unrecognised DINOv2 state-dict layout; keys: {_preview(keys)}")


def _require_official(sd: StateDict, what: str) -> None:
    layout = detect_layout(sd)
    if layout == "official_chunked":
        raise ValueError(f"{what}: chunked `blocks.<chunk>.<i>` keys; flatten them to `blocks.<i>` first")
    if layout != "official":
        raise ValueError(f"{what}: expected an official-layout state dict, got the {layout!r} layout")


def _block_indices(sd: StateDict, prefix: str = "blocks.") -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def _embed_dim(sd: StateDict) -> int:
    return int(sd["patch_embed.proj.weight"].shape[0])


# ---------------------------------------------------------------------------------------------- timm
def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def official_to_timm(state_dict: StateDict) -> dict[str, Tensor]:
    """Official -> timm `vit_*_patch14[_reg4]_dinov2` layout (load with `strict=True` into the model that
    `timm_model_name_and_kwargs` describes).

    Not representable in timm, hence not exact without `timm_extras`:
    - `mask_token`: timm has no slot; dropped (as timm's own `_convert_dinov2` does).
    - register models: timm builds them with `no_embed_class=True` (position embeddings for patches only), so the
      class token's position embedding is folded into the class token: timm `cls_token` = `cls_token` +
      `pos_embed[:, :1]`, timm `pos_embed` = `pos_embed[:, 1:]`. Outputs are unchanged (the official model computes
      the same sum), but the two addends cannot be recovered from it.
    Unsplit tensors are shared with the input, not copied.
    """
    _require_official(state_dict, "official_to_timm")
    sd = dict(state_dict)
    sd.pop("mask_token", None)
    if "register_tokens" in sd:
        pos = sd["pos_embed"]
        sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:].clone()
    return _forward(sd, TIMM_KEY_MAP["common"] + TIMM_KEY_MAP["mlp"] + TIMM_KEY_MAP["swiglu"], "official_to_timm")


def timm_extras(state_dict: StateDict) -> dict[str, Tensor]:
    """The official tensors that `official_to_timm` cannot carry verbatim: `mask_token`, and for register models the
    unfolded `cls_token` and `pos_embed`. Pass them to `timm_to_official(..., extras=...)` for an exact round trip."""
    _require_official(state_dict, "timm_extras")
    keys = ["mask_token"] + (["cls_token", "pos_embed"] if "register_tokens" in state_dict else [])
    return {k: state_dict[k] for k in keys if k in state_dict}


def _unfold_class_position(cls: Tensor, pos: Tensor, extras: StateDict) -> tuple[Tensor, Tensor]:
    """Official (cls_token, pos_embed) from timm's folded class token and patch-only position embeddings."""
    old_cls, old_pos = extras.get("cls_token"), extras.get("pos_embed")
    if old_cls is not None and old_pos is not None:
        if (
            old_pos.shape[1] == pos.shape[1] + 1
            and torch.equal(old_cls + old_pos[:, :1], cls)
            and torch.equal(old_pos[:, 1:], pos)
        ):
            return old_cls, old_pos
        warnings.warn(
            "timm_to_official: extras' cls_token/pos_embed do not fold to the timm tensors; keeping the folded class "
            "token and a zero class position embedding",
            stacklevel=3,
        )
    return cls, torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)


def timm_to_official(state_dict: StateDict, *, extras: StateDict | None = None) -> dict[str, Tensor]:
    """timm DINOv2 layout -> official layout.

    - `head.*` (a classifier, when the timm model has num_classes > 0) has no official slot: dropped with a warning.
    - `mask_token` has no timm slot: taken from `extras` if given, else re-created as zeros of shape (1, D) with a
      warning (inference never uses it; masked-image training does).
    - a timm `pos_embed` without a class-token row (register models, `no_embed_class=True`): the class token keeps
      timm's folded value and `pos_embed[:, 0]` is zero, which gives identical outputs. If `extras` holds the
      original `cls_token` and `pos_embed` and they fold to exactly the timm tensors, the originals are restored
      (bit-identical round trip); if they do not (e.g. the timm weights were fine-tuned since), a warning is issued
      and the folded form is kept.
    """
    layout = detect_layout(state_dict)
    if layout != "timm":
        raise ValueError(f"timm_to_official: expected a timm-layout state dict, got the {layout!r} layout")
    sd = dict(state_dict)
    extras = dict(extras or {})
    head = [k for k in sd if k.startswith("head.")]
    if head:
        warnings.warn(f"timm_to_official: dropping the classifier {head} (no slot in the backbone)", stacklevel=2)
        for k in head:
            del sd[k]
    first = _block_indices(sd)[0]
    fc1, fc2 = sd[f"blocks.{first}.mlp.fc1.weight"], sd[f"blocks.{first}.mlp.fc2.weight"]
    ffn = "swiglu" if fc1.shape[0] == 2 * fc2.shape[1] else "mlp"
    out = _inverse(sd, TIMM_KEY_MAP["common"] + TIMM_KEY_MAP[ffn], "timm_to_official")

    cls, pos = out["cls_token"], out["pos_embed"]
    if _is_square(pos.shape[1]):  # no class-token row (no_embed_class): unfold
        out["cls_token"], out["pos_embed"] = _unfold_class_position(cls, pos, extras)
    elif not _is_square(pos.shape[1] - 1):
        raise ValueError(f"timm_to_official: pos_embed has {pos.shape[1]} rows: neither M*M nor 1 + M*M")
    if "mask_token" in extras:
        out["mask_token"] = extras["mask_token"]
    else:
        warnings.warn("timm_to_official: timm has no mask_token; re-created as zeros", stacklevel=2)
        out["mask_token"] = cls.new_zeros(1, cls.shape[-1])
    return out


def timm_model_name_and_kwargs(
    *,
    img_size: int = 518,
    patch_size: int = 14,
    in_chans: int = 3,
    embed_dim: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    ffn_bias: bool = True,
    proj_bias: bool = True,
    init_values: float | None = 1.0,
    ffn_layer: str = "mlp",
    num_register_tokens: int = 0,
    interpolate_antialias: bool = False,
    interpolate_offset: float = 0.1,
    block_chunks: int = 0,
    drop_path_rate: float = 0.0,
    drop_path_uniform: bool = False,
    dynamic_img_size: bool = True,
) -> tuple[str, dict[str, Any]]:
    """timm entry point and keyword overrides for `timm.create_model(name, pretrained=False, **kwargs)` to build the
    timm twin of an official architecture (official constructor keywords), ready for `official_to_timm` weights.

    The name is the closest timm DINOv2 entry point (S/B/L with MLP, g with SwiGLU; `_reg4` with registers); sizes,
    register count, patch size and FFN width that differ from it are overridden (timm's entry points let keywords
    override their defaults). `num_classes=0` drops timm's classifier. With `dynamic_img_size` (default) timm accepts
    any multiple of the patch size, as the official model does; its position-embedding interpolation is bicubic
    with antialiasing to an explicit size, i.e. the official register models' (`interpolate_antialias=True`,
    `interpolate_offset=0`), not the official non-register models' (no antialiasing, scale factor (h0 + 0.1) / M):
    the latter differ from timm at any size but the native one. Training-only keywords (drop path, block chunks)
    do not matter for the state dict and are not passed.
    """
    del interpolate_antialias, interpolate_offset, block_chunks, drop_path_rate, drop_path_uniform
    if not (ffn_bias and proj_bias):
        raise ValueError(f"ffn_bias={ffn_bias}, proj_bias={proj_bias}: timm's DINOv2 models always have these biases")
    if ffn_layer not in ("mlp", "swiglu", "swiglufused"):
        raise ValueError(f"ffn_layer={ffn_layer!r}: timm twins exist for 'mlp', 'swiglu' and 'swiglufused'")
    if num_register_tokens < 0:
        raise ValueError(f"num_register_tokens={num_register_tokens} must be >= 0")
    swiglu = ffn_layer != "mlp"
    size = _TIMM_SIZES.get((embed_dim, depth, num_heads))
    if size is None or (size == "giant") != swiglu:
        size = "giant" if swiglu else "small"
    reg = "_reg4" if num_register_tokens else ""
    name = f"vit_{size}_patch14{reg}_dinov2"
    kwargs: dict[str, Any] = {"img_size": img_size, "num_classes": 0, "dynamic_img_size": dynamic_img_size}
    base_dim, base_depth, base_heads = next(k for k, v in _TIMM_SIZES.items() if v == size)
    if (embed_dim, depth, num_heads) != (base_dim, base_depth, base_heads):
        kwargs.update(embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    if swiglu:
        hidden = swiglu_hidden_features(int(embed_dim * mlp_ratio))  # official fused SwiGLU width
        if int(embed_dim * _TIMM_GIANT_MLP_RATIO) != 2 * hidden:
            kwargs["mlp_ratio"] = (2 * hidden + 0.5) / embed_dim  # timm: fc1 width = int(dim * mlp_ratio) = 2 * hidden
    elif mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = mlp_ratio
    if num_register_tokens not in (0, 4):
        kwargs["reg_tokens"] = num_register_tokens
    if patch_size != 14:
        kwargs["patch_size"] = patch_size
    if in_chans != 3:
        kwargs["in_chans"] = in_chans
    if not qkv_bias:
        kwargs["qkv_bias"] = False
    if not init_values:
        kwargs["init_values"] = None  # no LayerScale: no ls1/ls2 parameters
    elif init_values != _TIMM_INIT_VALUES:
        kwargs["init_values"] = init_values
    return name, kwargs


# ---------------------------------------------------------------------------------------------- Hugging Face
def official_to_hf(state_dict: StateDict, *, names: HFNames = "module", prefix: str = "") -> dict[str, Tensor]:
    """Official -> Hugging Face `Dinov2Model` (no registers) / `Dinov2WithRegistersModel` layout.

    `names="module"`: the module names of the installed transformers 5 (`load_state_dict(strict=True)` works);
    `names="hub"`: the names of Hub checkpoints and `save_pretrained` files (`from_pretrained` maps them) and of
    transformers 4 modules. `prefix` is prepended to every key (e.g. "dinov2." for `Dinov2ForImageClassification`,
    "dinov2_with_registers." for its register twin). Every official tensor has a slot (mask_token is (1, D) in both;
    a `Dinov2Config(use_mask_token=False)` model has none, use the default). A model without LayerScale
    (init_values None) has no `ls*.gamma`; HF always has `layer_scale*.lambda1`, which are filled with ones (exact)
    with a warning. The fused qkv (and SwiGLU w12 for "module") are split into owned copies; the rest is shared.
    """
    if names not in HF_KEY_MAP:
        raise ValueError(f"names={names!r}: expected one of {sorted(HF_KEY_MAP)}")
    _require_official(state_dict, "official_to_hf")
    sd = dict(state_dict)
    dim = _embed_dim(sd)
    missing_ls = [f"blocks.{i}.{ls}.gamma" for i in _block_indices(sd) for ls in ("ls1", "ls2")]
    missing_ls = [k for k in missing_ls if k not in sd]
    if missing_ls:
        warnings.warn(f"official_to_hf: no LayerScale in {len(missing_ls)} places; HF gets lambda1 = 1", stacklevel=2)
        ref = sd["patch_embed.proj.weight"]
        sd.update({k: ref.new_ones(dim) for k in missing_ls})
    out = _forward(sd, HF_KEY_MAP[names], "official_to_hf")
    return {prefix + k: v for k, v in out.items()}


def hf_to_official(state_dict: StateDict) -> dict[str, Tensor]:
    """Hugging Face DINOv2 layout (module or hub names, with or without a prefix such as `dinov2.`) -> official.

    The prefix is whatever precedes `embeddings.patch_embeddings.projection.weight`; keys outside it (a task head:
    `classifier.*`) have no official slot and are dropped with a warning. A checkpoint without a mask token
    (`use_mask_token=False`) gets zeros (1, D) with a warning; an empty `register_tokens` (0 registers) is dropped.
    """
    anchors = [k for k in state_dict if k == _HF_ANCHOR or k.endswith("." + _HF_ANCHOR)]
    if len(anchors) != 1:
        raise ValueError(f"hf_to_official: expected one '*{_HF_ANCHOR}' key, found {anchors}")
    prefix = anchors[0][: -len(_HF_ANCHOR)]
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    dropped = [k for k in state_dict if not k.startswith(prefix)]
    if dropped:
        warnings.warn(f"hf_to_official: dropping keys outside the backbone: {_preview(dropped)}", stacklevel=2)
    out = _inverse(sd, HF_KEY_MAP["module"] + HF_KEY_MAP["hub"], "hf_to_official")
    if "register_tokens" in out and out["register_tokens"].shape[1] == 0:
        del out["register_tokens"]
    if "mask_token" not in out:
        warnings.warn("hf_to_official: no mask_token in the checkpoint; re-created as zeros", stacklevel=2)
        cls = out["cls_token"]
        out["mask_token"] = cls.new_zeros(1, cls.shape[-1])
    return out


def hf_config_from_official(
    *,
    img_size: int = 518,
    patch_size: int = 14,
    in_chans: int = 3,
    embed_dim: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    ffn_bias: bool = True,
    proj_bias: bool = True,
    init_values: float | None = 1.0,
    ffn_layer: str = "mlp",
    num_register_tokens: int = 0,
    interpolate_antialias: bool = False,
    interpolate_offset: float = 0.1,
    block_chunks: int = 0,
    drop_path_rate: float = 0.0,
    drop_path_uniform: bool = False,
) -> dict[str, Any]:
    """`config.json` contents of the Hugging Face twin of an official architecture (official constructor keywords):
    `transformers.AutoConfig.for_model(**cfg)` or `Dinov2Config(**cfg)` / `Dinov2WithRegistersConfig(**cfg)`.

    model_type "dinov2" without registers, "dinov2_with_registers" with. HF has no interpolation settings: Dinov2
    interpolates bicubic to an explicit size without antialiasing, Dinov2WithRegisters with antialiasing. Hence
    at the native image size outputs match; at other sizes HF matches official register models (antialias, offset
    0) but not the official non-register models (offset 0.1 kludge). Other combinations warn. HF's `mlp_ratio` must
    be an integer; proj/FFN biases always exist. `init_values` only seeds `layerscale_value` (HF always has
    LayerScale; a model without it converts with lambda = 1).
    """
    del block_chunks, drop_path_uniform
    if not (ffn_bias and proj_bias):
        raise ValueError(f"ffn_bias={ffn_bias}, proj_bias={proj_bias}: HF's DINOv2 always has these biases")
    if ffn_layer not in ("mlp", "swiglu", "swiglufused"):
        raise ValueError(f"ffn_layer={ffn_layer!r}: HF supports 'mlp' and the fused SwiGLU ('swiglu', 'swiglufused')")
    if float(mlp_ratio) != int(mlp_ratio):
        raise ValueError(f"mlp_ratio={mlp_ratio}: HF's Dinov2Config takes an integer mlp_ratio")
    if num_register_tokens < 0:
        raise ValueError(f"num_register_tokens={num_register_tokens} must be >= 0")
    registers = num_register_tokens > 0
    if registers and (not interpolate_antialias or interpolate_offset):
        warnings.warn(
            f"interpolate_antialias={interpolate_antialias}, interpolate_offset={interpolate_offset}: HF register "
            "models interpolate with antialias and no offset; outputs will differ away from the native image size",
            stacklevel=2,
        )
    elif not registers and interpolate_antialias:
        warnings.warn(
            "interpolate_antialias=True: HF Dinov2 interpolates without antialias; outputs will differ away from the "
            "native image size",
            stacklevel=2,
        )
    cfg: dict[str, Any] = {
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "hidden_size": embed_dim,
        "num_hidden_layers": depth,
        "num_attention_heads": num_heads,
        "mlp_ratio": int(mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": 1e-6,
        "image_size": img_size,
        "patch_size": patch_size,
        "num_channels": in_chans,
        "qkv_bias": qkv_bias,
        "layerscale_value": float(init_values) if init_values else 1.0,
        "drop_path_rate": drop_path_rate,
        "use_swiglu_ffn": ffn_layer != "mlp",
    }
    if registers:
        cfg["num_register_tokens"] = num_register_tokens
    else:
        cfg["use_mask_token"] = True
    return cfg


def official_kwargs_from_hf_config(
    config: Mapping[str, Any], *, interpolation: Literal["official", "hf"] = "official"
) -> dict[str, Any]:
    """Official constructor keywords for the architecture of a Hugging Face DINOv2 config (a `config.json` dict or
    `config.to_dict()`), with flat blocks (block_chunks=0).

    `interpolation="official"` (default) sets the interpolation of the official checkpoints these HF models were
    converted from (dinov2: no antialias, offset 0.1; with registers: antialias, offset 0); `"hf"` reproduces HF's
    own forward at every size (dinov2: no antialias, offset 0). Both agree at the native image size.
    """
    model_type = config.get("model_type")
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(f"model_type={model_type!r}: expected 'dinov2' or 'dinov2_with_registers'")
    if interpolation not in ("official", "hf"):
        raise ValueError(f"interpolation={interpolation!r}: expected 'official' or 'hf'")
    use_swiglu = bool(config.get("use_swiglu_ffn", False))
    act = config.get("hidden_act", "gelu")
    if not use_swiglu and act != "gelu":
        raise ValueError(f"hidden_act={act!r}: the official MLP uses exact GELU ('gelu')")
    eps = config.get("layer_norm_eps", 1e-6)
    if eps != 1e-6:
        raise ValueError(f"layer_norm_eps={eps}: the official model uses 1e-6")

    def square(name: str, default: int) -> int:
        value = config.get(name, default)
        if isinstance(value, list | tuple):
            if len(value) != 2 or value[0] != value[1]:
                raise ValueError(f"{name}={value}: the official model takes a square size")
            value = value[0]
        return int(value)

    registers = int(config.get("num_register_tokens", 4)) if model_type == "dinov2_with_registers" else 0
    antialias = registers > 0
    offset = 0.1 if (registers == 0 and interpolation == "official") else 0.0
    layerscale = config.get("layerscale_value", 1.0)
    return {
        "img_size": square("image_size", 224),
        "patch_size": square("patch_size", 14 if model_type == "dinov2" else 16),
        "in_chans": int(config.get("num_channels", 3)),
        "embed_dim": int(config.get("hidden_size", 768)),
        "depth": int(config.get("num_hidden_layers", 12)),
        "num_heads": int(config.get("num_attention_heads", 12)),
        "mlp_ratio": float(config.get("mlp_ratio", 4)),
        "qkv_bias": bool(config.get("qkv_bias", True)),
        "init_values": float(layerscale) if layerscale else 1.0,  # HF always has LayerScale
        "ffn_layer": "swiglufused" if use_swiglu else "mlp",
        "num_register_tokens": registers,
        "interpolate_antialias": antialias,
        "interpolate_offset": offset,
        "block_chunks": 0,
    }
