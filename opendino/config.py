"""Typed configuration: one frozen dataclass per stage, loaded from YAML plus dotted `key=value` overrides.

Rules the whole project relies on:
- an unknown key, a wrong type or an impossible value is a `ConfigError` naming the key (with a suggestion for
  near-misses) before any work starts;
- a loaded config is never mutated (frozen dataclasses); derived values are pure functions of it;
- this module imports nothing from the package.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["ConfigError", "ExtractConfig", "QuickstartConfig", "field_docs", "load", "parse_overrides", "to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot run: names the offending key and what was expected."""


# ---------------------------------------------------------------------------------------------- schemas
@dataclass(frozen=True)
class ExtractConfig:
    """`opendino extract`: features of every image of a folder / list, written in resumable shards."""

    backbone: str  # preset name, checkpoint file, Hugging Face folder or opendino run directory
    data: str  # image folder (recursive), .txt list (one path per line) or .csv with a `path` column
    out: str  # output folder: shard files, manifest.json, bad_images.tsv
    resize_size: int = 256  # shorter side before the centre crop (official eval transform: 256)
    crop_size: int = 224  # centre crop, a multiple of the patch size (official: 224)
    full_image: tuple[int, int] | None = None  # (H, W): resize whole images to this size instead of resize+crop
    batch_size: int = 64  # images per forward pass
    num_workers: int = 4  # DataLoader decoding processes (0: decode in the main process)
    shard_size: int = 10_000  # images per output shard (a killed run resumes at shard granularity)
    format: str = "safetensors"  # "safetensors" or "npy"
    cls: bool = True  # write the CLS token (after the final norm): `cls` (n, D)
    mean_pool: bool = False  # write the mean of the patch tokens: `mean` (n, D)
    patch_tokens: bool = False  # write all patch tokens: `patch` (n, h*w, D); large
    save_dtype: str = "float32"  # dtype on disk: float32, float16 or bfloat16 (bfloat16 only with safetensors)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    amp: str = "bf16"  # autocast dtype on GPU: bf16, fp16 or none (CPU always runs fp32)
    channels_last: bool = True  # channels-last input memory format on GPU
    compile: bool = False  # torch.compile the backbone (pays off for large folders on GPU)
    max_image_pixels: int = 178_956_970  # larger images are skipped as decompression bombs
    overwrite: bool = False  # start afresh even if `out` holds a finished or partial extraction

    def __post_init__(self) -> None:
        _check_choice("format", self.format, ("safetensors", "npy"))
        _check_choice("save_dtype", self.save_dtype, ("float32", "float16", "bfloat16"))
        _check_choice("amp", self.amp, ("bf16", "fp16", "none"))
        for name in ("resize_size", "crop_size", "batch_size", "shard_size", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be positive")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers}: must be >= 0")
        if self.save_dtype == "bfloat16" and self.format == "npy":
            raise ConfigError("save_dtype=bfloat16 needs format=safetensors (numpy has no bfloat16)")
        if not (self.cls or self.mean_pool or self.patch_tokens):
            raise ConfigError("nothing to write: enable at least one of cls, mean_pool, patch_tokens")


@dataclass(frozen=True)
class QuickstartConfig:
    """`opendino quickstart`: the no-download demonstration on a generated labelled image set."""

    out: str = "runs/quickstart"  # folder for the generated images and the extracted features
    backbone: str = "debug"  # backbone to extract with (preset name or checkpoint)
    n_per_class: int = 40  # generated images per class (10 classes; half train, half val for kNN)
    image_size: int = 64  # side of the generated images, in pixels
    seed: int = 0  # seed of the image generator
    batch_size: int = 64  # images per forward pass
    num_workers: int = 0  # DataLoader decoding processes
    device: str = "auto"  # "auto", "cpu", "cuda", ...

    def __post_init__(self) -> None:
        if self.n_per_class < 2:
            raise ConfigError(f"n_per_class={self.n_per_class}: need at least 2 (one train, one val image)")
        if self.image_size < 16 or self.batch_size <= 0 or self.num_workers < 0:
            raise ConfigError("image_size must be >= 16, batch_size > 0 and num_workers >= 0")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {list(choices)}")


# ---------------------------------------------------------------------------------------------- loading
def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """["a.b=1", "c=[2, 3]"] -> nested {"a": {"b": 1}, "c": [2, 3]}; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=0.001)")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is set both as a value and as a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, Mapping) and isinstance(merged.get(k), dict) else v
    return merged


def load(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] | Mapping = ()) -> T:
    """Build `schema` from a YAML file (optional) and overrides (["k=v", ...] or a nested mapping)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the config ({e})") from e
        if not isinstance(loaded, dict | None):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded or {}
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return _build(schema, _merge(data, extra), prefix="")


def _build(schema: type[T], data: Mapping[str, Any], prefix: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {prefix}{near[0]!r}?" if near else f"; known keys: {sorted(fields)}"
            raise ConfigError(f"unknown key {prefix}{key!r}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {prefix}{name!r}")
    try:
        return schema(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}" if prefix else str(e)) from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check (and minimally convert: int -> float, list -> tuple) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in (o for o in options if o is not type(None)):
            try:
                return _coerce(opt, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r}: matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.")  # type: ignore[arg-type]
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r}: expected a list")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}={value!r}: expected {len(args)} values")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(f"{key}={value!r}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data (tuples become lists), for YAML / JSON output."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def field_docs(schema: type) -> dict[str, str]:
    """{field: its trailing comment} read from the schema's source: the one place a field is documented."""
    docs = {}
    for line in inspect.getsource(schema).splitlines():
        m = re.match(r"\s+(\w+): [^=#]+(?:=[^#]*)?#\s*(.+)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs
