"""Named backbones and checkpoint loading: the one door through which weights enter opendino.

`dinov2_vits14` ... `dinov2_vitg14_reg` build the official hub models with the official hub arguments
(`dinov2/hub/backbones.py` at b8931f7: img_size 518, patch 14, LayerScale 1.0, flat blocks, SwiGLU for ViT-g;
`*_reg`: 4 registers, antialiased interpolation, offset 0). Nothing here downloads: `pretrained` is a local path.

`load_backbone` accepts a preset name, an official `.pth`, an official training checkpoint (teacher weights, chunked
`blocks.<chunk>.<i>` keys), a safetensors file, a timm state dict, a Hugging Face `Dinov2Model` /
`Dinov2WithRegistersModel` folder, or an opendino run directory. It detects the layout, converts it to the official
one, infers the architecture from the weights (or reads it from metadata), builds the model on the meta device and
assigns the weights. Pickled checkpoints are read with `torch.load(weights_only=True)`: a file cannot run code.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from opendino.models.layers import swiglu_hidden_features
from opendino.models.vit import PRESETS, DinoVisionTransformer

__all__ = [
    "HUB_MODELS",
    "CheckpointMismatchError",
    "build_backbone",
    "hub_kwargs",
    "infer_arch",
    "is_preset",
    "load_backbone",
    "load_backbone_state",
    "run_convert",
    "save_backbone",
    "save_backbone_state",
]

# Official hub arguments (dinov2/hub/backbones.py:18-59) shared by the eight released models.
_HUB_DEFAULTS = dict(
    img_size=518,
    patch_size=14,
    init_values=1.0,
    ffn_layer="mlp",
    block_chunks=0,
    num_register_tokens=0,
    interpolate_antialias=False,
    interpolate_offset=0.1,
)
_REG = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
HUB_MODELS: dict[str, dict[str, Any]] = {
    "dinov2_vits14": dict(arch="vit_small"),
    "dinov2_vitb14": dict(arch="vit_base"),
    "dinov2_vitl14": dict(arch="vit_large"),
    "dinov2_vitg14": dict(arch="vit_giant2", ffn_layer="swiglufused"),
    "dinov2_vits14_reg": dict(arch="vit_small", **_REG),
    "dinov2_vitb14_reg": dict(arch="vit_base", **_REG),
    "dinov2_vitl14_reg": dict(arch="vit_large", **_REG),
    "dinov2_vitg14_reg": dict(arch="vit_giant2", ffn_layer="swiglufused", **_REG),
    # ours: a tiny model for tests and CPU runs
    "debug": dict(arch="debug", img_size=64, patch_size=8),
}
# Head counts of the official sizes: the one architecture number that weights cannot tell.
_HEADS_BY_DIM = {PRESETS[a]["embed_dim"]: PRESETS[a]["num_heads"] for a in ("vit_small", "vit_base", "vit_large")}
_HEADS_BY_DIM[PRESETS["vit_giant2"]["embed_dim"]] = PRESETS["vit_giant2"]["num_heads"]
_METADATA_KEY = "opendino.arch"
RUN_BACKBONE_FILE = "teacher_backbone.safetensors"
TIMM_EXTRAS_SUFFIX = ".opendino-extras.safetensors"


def is_preset(source: str | Path) -> TypeGuard[str]:
    """A preset name (random weights) rather than a path; an existing file of that name wins."""
    return isinstance(source, str) and source in HUB_MODELS and not Path(source).exists()


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the architecture: lists missing / unexpected keys and shape conflicts."""


def hub_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """Full `DinoVisionTransformer` keywords of a named model (see HUB_MODELS), with overrides applied."""
    if name not in HUB_MODELS:
        raise ValueError(f"unknown backbone {name!r}: expected one of {sorted(HUB_MODELS)} or a path")
    spec = dict(HUB_MODELS[name])
    arch = spec.pop("arch")
    return {**_HUB_DEFAULTS, **PRESETS[arch], **spec, **overrides}


def build_backbone(name: str, *, pretrained: str | Path | None = None, **kwargs: Any) -> DinoVisionTransformer:
    """Build a named backbone; with `pretrained` (a local checkpoint path) load its weights strictly."""
    if pretrained is True or pretrained is False:
        raise ValueError(
            f"pretrained={pretrained!r}: opendino never downloads weights; pass the path of a local checkpoint "
            f"(e.g. {name}_pretrain.pth) or None"
        )
    model = DinoVisionTransformer(**hub_kwargs(name, **kwargs))
    if pretrained is not None:
        state, _ = load_backbone_state(pretrained)
        _check_fits(model, state)
        model.load_state_dict(state, strict=True)
    return model


def _hub_fn(name: str):
    def fn(*, pretrained: str | Path | None = None, **kwargs: Any) -> DinoVisionTransformer:
        return build_backbone(name, pretrained=pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"DINOv2 `{name}` with the official hub arguments; `pretrained`: a local checkpoint path or None."
    return fn


dinov2_vits14 = _hub_fn("dinov2_vits14")
dinov2_vitb14 = _hub_fn("dinov2_vitb14")
dinov2_vitl14 = _hub_fn("dinov2_vitl14")
dinov2_vitg14 = _hub_fn("dinov2_vitg14")
dinov2_vits14_reg = _hub_fn("dinov2_vits14_reg")
dinov2_vitb14_reg = _hub_fn("dinov2_vitb14_reg")
dinov2_vitl14_reg = _hub_fn("dinov2_vitl14_reg")
dinov2_vitg14_reg = _hub_fn("dinov2_vitg14_reg")


# ---------------------------------------------------------------------------------------------- reading weights
def _torch_load(path: Path) -> Any:
    for mmap in (True, False):  # mmap needs the zip format; legacy files load without it
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:  # weights_only refused an object: never unpickle code
            raise ValueError(f"{path}: not a tensors-only checkpoint, refusing to unpickle it ({e})") from e
        except Exception as e:
            if not mmap:
                raise ValueError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {e})") from e
    raise AssertionError("unreachable")


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
        except Exception as e:
            raise ValueError(f"{path}: cannot read this safetensors file ({type(e).__name__}: {e})") from e
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj), {}


def _read_hf_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    config = json.loads((folder / "config.json").read_text())
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()][:1]
    if not files:
        raise FileNotFoundError(f"{folder}: config.json found but no model.safetensors or pytorch_model.bin")
    from opendino.models import convert

    state: dict[str, Any] = {}
    for name in files:
        state.update(_read_file(folder / name)[0])
    return state, convert.official_kwargs_from_hf_config(config)


def _unwrap(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone's tensors out of a bare state dict or an (official / opendino) training checkpoint."""
    for key in ("teacher", "model", "state_dict", "model_ema"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    for prefix in ("teacher.backbone.", "backbone."):  # a whole SSL model: keep the (teacher) backbone
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _timm_sidecar(path: Path) -> Path:
    return path.with_name(path.name.split(".")[0] + TIMM_EXTRAS_SUFFIX)


def _to_official(state: dict[str, Tensor], extras: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    from opendino.models import convert

    try:
        layout = convert.detect_layout(state)
    except ValueError as e:
        raise CheckpointMismatchError(f"not a DINOv2 backbone: {e}") from None
    if layout == "timm":
        return convert.timm_to_official(state, extras=extras)
    if layout == "hf":
        return convert.hf_to_official(state)
    if layout == "official_chunked":
        # blocks.<chunk>.<global index>.* -> blocks.<global index>.* (the chunk is an FSDP wrapping detail)
        return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
    return state


def load_backbone_state(source: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(official-layout state dict, architecture keywords known from metadata or config) of a file or folder."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or folder, and not a preset name ({sorted(HUB_MODELS)})")
    arch: dict[str, Any] = {}
    if path.is_dir():
        if (path / RUN_BACKBONE_FILE).exists():
            path = path / RUN_BACKBONE_FILE
        elif (path / "config.json").exists():
            state, arch = _read_hf_folder(path)
            return _to_official(_unwrap(state)), arch
        else:
            raise FileNotFoundError(f"{path}: neither an opendino run ({RUN_BACKBONE_FILE}) nor a Hugging Face folder")
    state, metadata = _read_file(path)
    if _METADATA_KEY in metadata:
        arch = json.loads(metadata[_METADATA_KEY])
    sidecar = _timm_sidecar(path)  # what a timm file has no slot for, written beside it by run_convert
    extras = _read_file(sidecar)[0] if sidecar.exists() else None
    state = _to_official(_unwrap(state), extras)
    if not state:
        raise ValueError(f"{path}: no backbone tensors found")
    return state, arch


def infer_arch(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Constructor keywords read off an official-layout state dict. Not in the weights, so by convention: the
    head count (official sizes, else 64 channels per head, else None) and the interpolation flags (the official register
    models antialias with offset 0, the others use offset 0.1)."""
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise CheckpointMismatchError(f"not a DINOv2 backbone: no cls_token / patch_embed keys (have {_few(state)})")
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    n_reg = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    if "blocks.0.mlp.w12.weight" in state:
        ffn, hidden = "swiglufused", state["blocks.0.mlp.w12.weight"].shape[0] // 2
        mlp_ratio = 4.0 if swiglu_hidden_features(dim * 4) == hidden else hidden * 1.5 / dim
    elif "blocks.0.mlp.fc1.weight" in state:
        ffn, mlp_ratio = "mlp", state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    else:
        ffn, mlp_ratio = "identity", 4.0
    return dict(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=state["patch_embed.proj.weight"].shape[1],
        embed_dim=dim,
        depth=depth,
        num_heads=_HEADS_BY_DIM.get(dim, dim // 64 if dim % 64 == 0 else None),
        mlp_ratio=mlp_ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        proj_bias="blocks.0.attn.proj.bias" in state,
        ffn_bias=any(k.startswith("blocks.0.mlp.") and k.endswith(".bias") for k in state) or ffn == "identity",
        init_values=1.0 if "blocks.0.ls1.gamma" in state else None,
        ffn_layer=ffn,
        block_chunks=0,
        num_register_tokens=n_reg,
        interpolate_antialias=n_reg > 0,
        interpolate_offset=0.0 if n_reg > 0 else 0.1,
    )


def _few(keys: Any, n: int = 12) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _check_fits(model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [f"missing keys ({len(missing)}): {_few(missing)}"] if missing else []
        parts += [f"unexpected keys ({len(unexpected)}): {_few(unexpected)}"] if unexpected else []
        parts += [f"shape conflicts ({len(shapes)}): {_few(shapes, 6)}"] if shapes else []
        raise CheckpointMismatchError("weights do not fit the architecture:\n  " + "\n  ".join(parts))


def _resolve_arch(state: Mapping[str, Tensor], known: Mapping[str, Any], arch: Mapping[str, Any] | None) -> dict:
    kwargs = {**infer_arch(state), **known, **dict(arch or {}), "block_chunks": 0}
    if kwargs["num_heads"] is None:
        raise CheckpointMismatchError(
            f"cannot infer num_heads for embed_dim {kwargs['embed_dim']} from the weights: pass it, e.g. "
            "load_backbone(path, arch={'num_heads': 6})"
        )
    return kwargs


def load_backbone(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    arch: Mapping[str, Any] | None = None,
    eval_mode: bool = True,
) -> DinoVisionTransformer:
    """A backbone from a preset name (random weights, with a warning) or a checkpoint file / folder (see module doc).

    `arch` overrides architecture keywords that cannot be read off the weights (e.g. `num_heads`, interpolation).
    `dtype` casts the weights (float32 by default; None keeps the checkpoint's).
    """
    if is_preset(source):
        warnings.warn(
            f"{source!r}: randomly initialised weights (opendino never downloads); pass a checkpoint path for "
            "pretrained weights",
            stacklevel=2,
        )
        return build_backbone(source, **dict(arch or {})).to(device=device, dtype=dtype).train(not eval_mode)
    state, known = load_backbone_state(source)
    kwargs = _resolve_arch(state, known, arch)
    with torch.device("meta"):
        model = DinoVisionTransformer(**kwargs)
    _check_fits(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).train(not eval_mode)


def save_backbone(model: DinoVisionTransformer, path: str | Path) -> Path:
    """Write the backbone in the official key layout (flat blocks), atomically: `.safetensors` with the architecture
    in its metadata, or a tensors-only `.pth` as the official releases are."""
    return save_backbone_state(model.state_dict(), model.arch, path)


def save_backbone_state(state: Mapping[str, Tensor], arch: Mapping[str, Any], path: str | Path) -> Path:
    """`save_backbone` for a state dict (e.g. gathered from sharded training) and its constructor keywords."""
    path = Path(path)
    official = _to_official({k: v.detach().cpu() for k, v in state.items()})
    metadata = {_METADATA_KEY: json.dumps({**arch, "block_chunks": 0})} if path.suffix == ".safetensors" else None
    _write_state(official, path, metadata)
    return path


def _write_state(state: Mapping[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A temporary file renamed into place: a reader never sees a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    else:
        torch.save(dict(state), tmp)
    tmp.replace(path)


def run_convert(src: str | Path, dst: str | Path, *, to: str, arch: Mapping[str, Any] | None = None) -> Path:
    """Convert any checkpoint `load_backbone` reads into the official, timm or Hugging Face layout.

    official: `dst` .pth (as the official releases) or .safetensors (with the architecture in its metadata).
    timm: `dst` .pth / .safetensors for `timm.create_model(name, pretrained=False, **kwargs).load_state_dict`;
      the name and kwargs are printed and stored in the safetensors metadata; the tensors timm has no slot for
      (mask token, the class position embedding of register models) go to a `<stem>.opendino-extras.safetensors`
      file beside it, so that converting back is bit-identical.
    hf: `dst` is a folder with config.json and model.safetensors for `Dinov2Model.from_pretrained` (or
      `Dinov2WithRegistersModel`).
    """
    from opendino.models import convert

    if to not in ("official", "timm", "hf"):
        raise ValueError(f"to={to!r}: expected 'official', 'timm' or 'hf'")
    state, known = load_backbone_state(src)
    kwargs = _resolve_arch(state, known, arch)
    with torch.device("meta"):
        reference = DinoVisionTransformer(**kwargs)
    _check_fits(reference, state)  # never write a checkpoint that would not load
    state = {k: state[k] for k in reference.state_dict()}  # the official key order
    dst = Path(dst)
    if to == "official":
        _write_state(state, dst, {_METADATA_KEY: json.dumps(kwargs)} if dst.suffix == ".safetensors" else None)
    elif to == "timm":
        name, timm_kwargs = convert.timm_model_name_and_kwargs(**kwargs)
        meta = {"timm_model": name, "timm_kwargs": json.dumps(timm_kwargs), _METADATA_KEY: json.dumps(kwargs)}
        _write_state(convert.official_to_timm(state), dst, meta if dst.suffix == ".safetensors" else None)
        _write_state(convert.timm_extras(state), _timm_sidecar(dst), {})
        print(f"timm.create_model({name!r}, pretrained=False, **{timm_kwargs})")
    else:
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "config.json").write_text(json.dumps(convert.hf_config_from_official(**kwargs), indent=2))
        _write_state(convert.official_to_hf(state, names="hub"), dst / "model.safetensors", {"format": "pt"})
    return dst
