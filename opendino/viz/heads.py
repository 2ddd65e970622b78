"""Depth and segmentation views: the linear heads trained by `opendino eval depth` / `opendino eval seg`, read back
from their output folder and run on any image.

Both evaluations save `head.safetensors` beside results.json, with a JSON description under the metadata key
`opendino.head`: the task, the backbone blocks the head reads, the backbone (name and weights identity) and what
prediction needs (depth: bins and depth range, flip averaging; seg: classes, names, palette, test scales, flips,
window). Prediction reuses the evaluations' own inference (`eval.depth.predict_depth`, `eval.seg.predict`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from opendino.viz.core import DEFAULT_IMAGE_SIZE, model_device

__all__ = [
    "HEAD_FILE",
    "HEAD_METADATA_KEY",
    "DenseHead",
    "DepthMap",
    "SegMap",
    "check_head",
    "load_head",
    "predict_depth_map",
    "predict_segmentation",
    "same_backbone",
]

HEAD_FILE = "head.safetensors"
HEAD_METADATA_KEY = "opendino.head"


@dataclass
class DenseHead:
    """A trained linear head and its description (the `opendino.head` metadata)."""

    task: str  # "depth" or "seg"
    module: nn.Module
    meta: dict[str, Any]
    path: Path

    @property
    def blocks(self) -> list[int]:
        return [int(b) for b in self.meta["blocks"]]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            metadata = dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"{path}: cannot read this safetensors file ({type(e).__name__}: {e})") from e
    if HEAD_METADATA_KEY not in metadata:
        raise ValueError(
            f"{path}: no '{HEAD_METADATA_KEY}' description in the file (saved by an older opendino?): "
            "re-run `opendino eval depth` / `opendino eval seg` to save a head that can be read back"
        )
    return tensors, json.loads(metadata[HEAD_METADATA_KEY])


def load_head(source: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> DenseHead:
    """The head saved by `opendino eval depth` or `opendino eval seg`: their output folder or its head.safetensors."""
    from opendino.eval.depth import LinearDepthHead
    from opendino.eval.seg import LinearSegHead

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no {HEAD_FILE} (give the --out folder of `opendino eval depth` or `seg`)")
    state, meta = _read(path)
    task = meta.get("task")
    module: nn.Module
    if task == "depth":
        module = LinearDepthHead(
            int(meta["embed_dim"]),
            len(meta["blocks"]),
            n_bins=int(meta["n_bins"]),
            min_depth=float(meta["min_depth"]),
            max_depth=float(meta["max_depth"]),
        )
    elif task == "seg":
        module = LinearSegHead(int(meta["in_channels"]), int(meta["num_classes"]))
    else:
        raise ValueError(f"{path}: head task {task!r}, expected 'depth' or 'seg'")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not match the head's description ({e})") from e
    return DenseHead(task, module.to(device).eval(), meta, path)


def check_head(head: DenseHead, model: nn.Module, task: str) -> None:
    """A ValueError unless `head` is a `task` head ("depth" / "seg") that fits the backbone's width and depth."""
    if head.task != task:
        raise ValueError(f"{head.path} is a {head.task} head, not a {task} head")
    dim, depth = int(model.embed_dim), int(model.n_blocks)  # type: ignore[arg-type]
    if int(head.meta["embed_dim"]) != dim or max(head.blocks) >= depth:
        raise ValueError(
            f"{head.path}: trained on a backbone with {head.meta['embed_dim']} channels reading blocks {head.blocks}; "
            f"this backbone has {dim} channels and {depth} blocks (use the backbone the head was trained on: "
            f"{head.meta.get('backbone')!r})"
        )


def same_backbone(head: DenseHead, identity: dict[str, Any]) -> bool:
    """Whether `identity` (`eval.features.backbone_identity`) names the weights the head was trained on: the same
    preset and seed, or files of the same sizes and content hashes (wherever they are now)."""

    def key(ident: dict[str, Any]) -> Any:
        if "files" in ident:
            return sorted((f["size"], f["sha256_ends"]) for f in ident["files"])
        return ident

    return key(head.meta.get("backbone_identity") or {}) == key(identity)


def _shorter_side(image: Image.Image, size: int) -> Image.Image:
    scale = size / min(image.width, image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    return image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class DepthMap:
    """A depth prediction at the pixels of the (resized) input."""

    image: np.ndarray  # (H, W, 3) uint8: the resized input
    depth: np.ndarray  # (H, W) float32 metres
    min_depth: float  # the head's depth range (predictions are clamped to it)
    max_depth: float


@torch.no_grad()
def predict_depth_map(model: nn.Module, head: DenseHead, image: Image.Image, *, image_size: int = 0) -> DepthMap:
    """Depth of `image` resized to shorter side `image_size` (0: the size the head was trained at, or 448 for a head
    trained on native-size images), flip-averaged when the evaluation was."""
    from opendino.eval.depth import predict_depth
    from opendino.eval.depth_data import normalize

    check_head(head, model, "depth")
    size = image_size or int(head.meta.get("image_size") or 0) or DEFAULT_IMAGE_SIZE
    pixels = np.array(_shorter_side(image, size), dtype=np.uint8)
    device, _ = model_device(model)
    x = normalize(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0).to(device)
    module: Any = head.module  # a LinearDepthHead (load_head built it from the description)
    flip = bool(head.meta.get("flip_tta", True))
    depth = predict_depth(model, module, x, head.blocks, pixels.shape[:2], flip_tta=flip, amp="none")
    return DepthMap(
        pixels, depth.numpy().astype(np.float32), float(head.meta["min_depth"]), float(head.meta["max_depth"])
    )


@dataclass(frozen=True)
class SegMap:
    """A semantic segmentation at the pixels of the input."""

    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int64 class indices
    class_names: list[str]
    colours: np.ndarray  # (K, 3) float32 in [0, 1]: the evaluation's palette


@torch.no_grad()
def predict_segmentation(model: nn.Module, head: DenseHead, image: Image.Image, *, image_size: int = 0) -> SegMap:
    """Class per pixel of `image`, predicted at shorter side `image_size` (0: the head's test size) with the
    evaluation's test scales, flips and windows."""
    from opendino.eval.seg import predict

    check_head(head, model, "seg")
    meta = head.meta
    pixels = np.array(image.convert("RGB"), dtype=np.uint8)
    probs = predict(
        model,
        head.module,
        torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
        blocks=head.blocks,
        resize_size=image_size or int(meta["resize_size"]),
        scales=tuple(meta.get("scales", (1.0,))),
        flip=bool(meta.get("flip", False)),
        window=int(meta.get("window", 0)),
        amp="none",
    )
    colours = np.asarray(meta["palette"], dtype=np.float32).reshape(-1, 3) / 255.0
    return SegMap(pixels, probs.argmax(dim=0).cpu().numpy(), list(meta["class_names"]), colours)
