"""What the demo computes, without the web: decode an upload, run the backbone, and return JSON-ready dicts whose
pictures are PNG data URLs (`data:image/png;base64,...`), so that a page can show them with no file on disk.

Every view is built from the pure functions of `opendino.viz` on the picture the backbone sees (the upload resized
so that its shorter side is `image_size`, see `viz.input_size`), so all pictures of one image have that size:
- analyze: input, foreground (first PCA component of this image's patches, background dimmed), PCA colours of the
  foreground patches, class-token attention of the last block (mean and per head), and with heads loaded the linear
  depth (own range, `magma_r`) and segmentation (the evaluation's palette) predictions;
- similarity: cosine similarity of one patch to every patch of the image (and of a second image), on one shared
  colour scale from the lowest similarity shown to 1, the query patch outlined;
- match: mutual nearest neighbours among each image's own foreground patches (the masks the analyze view shows),
  drawn as lines coloured by the first image's PCA.

Several threads may call one `Demo`: backbone and head calls are serialised by a lock (they would only compete for
the same cores), everything else is per call. The only shared data is `FeatureCache`, a small LRU of patch features
keyed by the upload's SHA-256 and the input size: it lets a similarity click reuse the forward pass of the analysis,
and gives the same answer as recomputing.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from opendino.data.sources import BadImageError, load_image_bytes
from opendino.viz import (
    DenseHead,
    ImageFeatures,
    check_head,
    cls_attention,
    figures,
    foreground_masks,
    image_features,
    load_head,
    mutual_nearest_neighbours,
    patch_at,
    pca_maps,
    predict_depth_map,
    predict_segmentation,
    similarity_map,
)
from opendino.viz.run import MATCH_LINE_FLOOR

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Demo",
    "FeatureCache",
    "InputError",
    "Upload",
    "example_path",
    "examples",
    "png_data_url",
]

DEFAULT_MAX_PIXELS = 40_000_000  # largest decoded upload (width x height): a 40-megapixel photo
SIMILARITY_ALPHA = 0.7  # weight of the similarity colours over the image in the similarity view
QUERY_OUTLINE = (0, 255, 255)  # cyan box around the clicked patch (and the best patch of the other image)
NAME_CHARS = 80  # upload names are cut to this many characters in messages


class InputError(ValueError):
    """A request the demo refuses; `status` is the HTTP status (400: bad input, 413: too large)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the user gave it (only for messages) and its bytes."""

    name: str
    data: bytes

    @property
    def key(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def label(self) -> str:
        name = " ".join(self.name.split()) or "upload"
        return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 3] + "..."


def png_data_url(picture: np.ndarray) -> str:
    """(H, W) or (H, W, 3) uint8 -> a PNG data URL."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(picture)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _hex(colour: np.ndarray) -> str:
    r, g, b = (round(float(c) * 255) for c in np.clip(colour, 0, 1))
    return f"#{r:02x}{g:02x}{b:02x}"


def colour_stops(cmap: str, n: int = 11) -> list[str]:
    """`n` evenly spaced colours of a matplotlib colormap, low to high (for a colour bar on the page)."""
    return ["#" + bytes(c).hex() for c in figures.colormap(np.linspace(0.0, 1.0, n), cmap, 0.0, 1.0)]


# ------------------------------------------------------------------------------------------------------ examples
def examples() -> list[dict[str, str]]:
    """The bundled example photos: file, title, source and licence of each (examples/examples.json)."""
    text = resources.files("opendino.demo").joinpath("examples", "examples.json").read_text(encoding="utf-8")
    return list(json.loads(text)["examples"])


def example_path(file: str) -> Path | None:
    """Path of a bundled example by file name, or None when `file` is not one of them."""
    if file not in {e["file"] for e in examples()}:
        return None
    return Path(str(resources.files("opendino.demo").joinpath("examples", file)))


# ------------------------------------------------------------------------------------------------------ features
class FeatureCache:
    """Patch features of the last `size` images, by (SHA-256 of the upload, input size); thread-safe; 0 = off."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"feature cache size {size}: must be >= 0")
        self.size = size
        self._items: OrderedDict[tuple[str, int], ImageFeatures] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> ImageFeatures | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[str, int], value: ImageFeatures) -> None:
        if not self.size:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def _outline(picture: np.ndarray, row: int, col: int, patch: int) -> np.ndarray:
    """A box drawn just outside patch (row, col), so that the patch itself stays visible."""
    canvas = Image.fromarray(picture)
    width = max(1, round(patch / 4))
    box = (col * patch - width, row * patch - width, (col + 1) * patch - 1 + width, (row + 1) * patch - 1 + width)
    ImageDraw.Draw(canvas).rectangle(box, outline=QUERY_OUTLINE, width=width)
    return np.asarray(canvas)


def _similarity_picture(features: ImageFeatures, sim: np.ndarray, low: float, high: float) -> np.ndarray:
    """The image under the similarity colours (inferno over [low, high])."""
    colours = figures.colormap(figures.upsample(sim, features.image.shape[:2]), "inferno", low, high)
    mixed = SIMILARITY_ALPHA * colours + (1 - SIMILARITY_ALPHA) * features.image
    return (mixed + 0.5).astype(np.uint8)


def _best(sim: np.ndarray, k: int, skip: tuple[int, int] | None = None) -> list[list[float]]:
    """The `k` most similar patches as [row, col, cosine], `skip` (the query patch itself) left out."""
    flat = sim.ravel().astype(np.float64)
    order = np.argsort(-flat, kind="stable")
    w = sim.shape[1]
    out = []
    for i in order:
        r, c = divmod(int(i), w)
        if (r, c) != skip:
            out.append([r, c, round(float(flat[i]), 4)])
        if len(out) == k:
            break
    return out


# ------------------------------------------------------------------------------------------------------ the demo
class Demo:
    """A loaded backbone (and optional depth / segmentation heads) and the views of the demo page."""

    def __init__(
        self,
        model: nn.Module,
        *,
        label: str,
        image_size: int = 448,
        depth_head: DenseHead | None = None,
        seg_head: DenseHead | None = None,
        threshold: float = 0.0,
        matches: int = 40,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache_size: int = 16,
    ) -> None:
        patch = int(model.patch_size)  # type: ignore[arg-type]
        if image_size <= 0 or image_size % patch:
            near = max(patch, round(image_size / patch) * patch)
            raise ValueError(
                f"image_size={image_size}: must be a positive multiple of the patch size {patch} ({near}?)"
            )
        for task, head in (("depth", depth_head), ("seg", seg_head)):
            if head is not None:
                check_head(head, model, task)
        if max_pixels <= 0 or matches <= 0 or not math.isfinite(threshold):
            raise ValueError(
                f"max_pixels={max_pixels}, matches={matches} must be positive, threshold={threshold} finite"
            )
        self.model = model.eval()
        self.label = label
        self.image_size = image_size
        self.patch_size = patch
        self.depth_head, self.seg_head = depth_head, seg_head
        self.threshold, self.matches, self.max_pixels = float(threshold), int(matches), int(max_pixels)
        self.cache = FeatureCache(cache_size)
        self._lock = threading.Lock()  # one backbone / head call at a time

    @classmethod
    def from_config(cls, cfg: Any) -> Demo:
        """Load the backbone and heads named by a `config.DemoConfig`."""
        from opendino.eval.features import pick_device
        from opendino.models.hub import load_backbone

        device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)  # a preset name means random weights: the seed fixes them
        model = load_backbone(cfg.backbone, device=device).eval()
        heads = {task: load_head(path, device=device) if path else None
                 for task, path in (("depth", cfg.depth_head), ("seg", cfg.seg_head))}  # fmt: skip
        _warn_foreign_heads(heads, cfg)
        source = Path(cfg.backbone).expanduser()
        label = source.name if source.exists() else f"{cfg.backbone} (random weights, seed {cfg.seed})"
        return cls(
            model,
            label=label,
            image_size=cfg.image_size,
            depth_head=heads["depth"],
            seg_head=heads["seg"],
            threshold=cfg.threshold,
            matches=cfg.matches,
            max_pixels=cfg.max_pixels,
            cache_size=cfg.feature_cache,
        )

    # ---------------------------------------------------------------------------------------------- inputs
    def decode(self, upload: Upload) -> Image.Image:
        """The upload as an RGB image, or `InputError` saying why not (not an image, truncated, too many pixels)."""
        try:
            return load_image_bytes(upload.data, upload.label, max_pixels=self.max_pixels)
        except BadImageError as e:
            raise InputError(f"{upload.label}: {e.reason}") from None

    def features(self, upload: Upload, image: Image.Image | None = None) -> ImageFeatures:
        """Patch features of an upload (from the cache when the same bytes were seen at this size)."""
        key = (upload.key, self.image_size)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        image = self.decode(upload) if image is None else image
        with self._lock:
            feats = image_features(self.model, image, image_size=self.image_size)
        self.cache.put(key, feats)
        return feats

    def info(self) -> dict[str, Any]:
        """What the page shows about the backbone, the loaded heads and the limits."""
        m = self.model
        depth = seg = None
        if self.depth_head is not None:
            meta = self.depth_head.meta
            depth = {"head": self.depth_head.path.parent.name, "range": [meta["min_depth"], meta["max_depth"]]}
        if self.seg_head is not None:
            seg = {"head": self.seg_head.path.parent.name, "classes": list(self.seg_head.meta["class_names"])}
        return {
            "backbone": self.label,
            "patch_size": self.patch_size,
            "embed_dim": int(m.embed_dim),  # type: ignore[arg-type]
            "num_heads": int(m.num_heads),  # type: ignore[arg-type]
            "n_blocks": int(m.n_blocks),  # type: ignore[arg-type]
            "registers": int(m.num_register_tokens),  # type: ignore[arg-type]
            "image_size": self.image_size,
            "device": str(next(m.parameters()).device),
            "heads": {"depth": depth, "seg": seg},
            "defaults": {"threshold": self.threshold, "matches": self.matches},
            "limits": {"max_pixels": self.max_pixels},
            "colormaps": {"inferno": colour_stops("inferno"), "magma_r": colour_stops("magma_r")},
            "examples": examples(),
        }

    def _threshold(self, threshold: float | None) -> float:
        t = self.threshold if threshold is None else float(threshold)
        if not math.isfinite(t) or abs(t) > 10:
            raise InputError(f"threshold={threshold}: expected a number of standard deviations in [-10, 10]")
        return t

    # ---------------------------------------------------------------------------------------------- views
    def analyze(self, upload: Upload, *, threshold: float | None = None) -> dict[str, Any]:
        """Input, foreground, PCA, attention (mean, per head) and, with heads, depth and segmentation of one image."""
        started = time.perf_counter()
        t = self._threshold(threshold)
        image = self.decode(upload)
        feats = self.features(upload, image)
        with self._lock:
            att = cls_attention(self.model, image, image_size=self.image_size)
        size = feats.image.shape[:2]
        maps = pca_maps([feats], threshold=t)
        mask = maps.masks[0]
        pictures = {
            "input": feats.image,
            "foreground": figures.foreground_overlay(feats.image, mask),
            "pca": figures.pca_picture(maps.rgb[0], size),
            "attention": figures.heatmap(att.mean, size),
        }
        result: dict[str, Any] = {
            "name": upload.label,
            "original_size": [image.height, image.width],
            "input_size": list(size),
            "grid": list(feats.grid),
            "patch_size": feats.patch_size,
            "threshold": t,
            "foreground_fraction": round(float(mask.mean()), 4),
            "explained_variance_ratio": [round(float(v), 4) for v in maps.pca.explained_variance_ratio],
            "attention_block": att.block,
            "attention_max": [round(float(h.max()), 4) for h in att.heads],
            "attention_heads": [png_data_url(figures.heatmap(h, size)) for h in att.heads],
            "depth": None,
            "seg": None,
        }
        if self.depth_head is not None:
            depth, result["depth"] = self._depth(feats)
            pictures["depth"] = depth
        if self.seg_head is not None:
            seg, result["seg"] = self._seg(feats)
            pictures["seg"] = seg
        result["pictures"] = {name: png_data_url(p) for name, p in pictures.items()}
        result["seconds"] = round(time.perf_counter() - started, 3)
        return result

    def _depth(self, feats: ImageFeatures) -> tuple[np.ndarray, dict[str, Any]]:
        assert self.depth_head is not None
        with self._lock:
            dm = predict_depth_map(self.model, self.depth_head, Image.fromarray(feats.image))
        h, w = feats.image.shape[:2]
        depth = np.asarray(Image.fromarray(dm.depth, mode="F").resize((w, h), Image.Resampling.BILINEAR))
        lo, hi = float(depth.min()), float(depth.max())
        facts = {"min": round(lo, 3), "max": round(hi, 3), "head_range": [dm.min_depth, dm.max_depth]}
        return figures.depth_picture(depth, lo, hi if hi > lo else lo + 1e-3), facts

    def _seg(self, feats: ImageFeatures) -> tuple[np.ndarray, dict[str, Any]]:
        assert self.seg_head is not None
        with self._lock:
            sm = predict_segmentation(self.model, self.seg_head, Image.fromarray(feats.image))
        counts = np.bincount(sm.labels.ravel(), minlength=len(sm.class_names))
        present = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] > 0]
        classes = [
            {
                "name": sm.class_names[k] if k < len(sm.class_names) else f"class {k}",
                "colour": _hex(sm.colours[k]) if k < len(sm.colours) else "#000000",
                "share": round(float(counts[k] / counts.sum()), 4),
            }
            for k in present
        ]
        return figures.seg_picture(sm.labels, sm.colours), {"classes": classes}

    def similarity(self, query: Upload, x: float, y: float, other: Upload | None = None) -> dict[str, Any]:
        """Cosine similarity of the patch under pixel (x, y) of the query's input picture to every patch of the
        query and of `other`, on one colour scale; the 5 most similar patches of each."""
        started = time.perf_counter()
        fq = self.features(query)
        fo = self.features(other) if other is not None else None
        try:
            row, col = patch_at(fq, x, y)
        except ValueError as e:
            raise InputError(str(e)) from None
        maps = [similarity_map(fq, row, col)]
        if fo is not None:
            maps.append(similarity_map(fq, row, col, fo))
        low = max(-1.0, min(float(m.min()) for m in maps))
        high = 1.0 if low < 1.0 else low + 1e-3
        query_picture = _outline(_similarity_picture(fq, maps[0], low, high), row, col, fq.patch_size)
        result: dict[str, Any] = {
            "patch": [row, col],
            "grid": list(fq.grid),
            "range": [round(low, 4), high],
            "query": {"picture": png_data_url(query_picture), "best": _best(maps[0], 5, skip=(row, col))},
            "other": None,
        }
        if fo is not None:
            best = _best(maps[1], 5)
            r, c = int(best[0][0]), int(best[0][1])
            picture = _outline(_similarity_picture(fo, maps[1], low, high), r, c, fo.patch_size)
            result["other"] = {"picture": png_data_url(picture), "grid": list(fo.grid), "best": best}
        result["seconds"] = round(time.perf_counter() - started, 3)
        return result

    def match(
        self, a: Upload, b: Upload, *, threshold: float | None = None, top: int | None = None, all_patches: bool = False
    ) -> dict[str, Any]:
        """Mutual nearest neighbours between two images, among each one's foreground patches (or all patches), the
        `top` strongest drawn side by side as lines coloured by the PCA of the first image."""
        started = time.perf_counter()
        t = self._threshold(threshold)
        top = self.matches if top is None else int(top)
        if not 1 <= top <= 1000:
            raise InputError(f"matches={top}: expected 1 to 1000 lines")
        fa, fb = self.features(a), self.features(b)
        if all_patches:
            mask_a = mask_b = None
        else:
            mask_a, mask_b = (foreground_masks([f], t).masks[0] for f in (fa, fb))
        m = mutual_nearest_neighbours(fa, fb, mask_a=mask_a, mask_b=mask_b, top=top)
        rgb = pca_maps([fa], masks=None if mask_a is None else [mask_a], remove_background=False).rgb[0]
        colours = MATCH_LINE_FLOOR + (1 - MATCH_LINE_FLOOR) * rgb[m.a[:, 0], m.a[:, 1]]
        picture = figures.match_picture(fa.image, fb.image, m, colours, fa.patch_size)
        return {
            "names": [a.label, b.label],
            "grids": [list(fa.grid), list(fb.grid)],
            "input_sizes": [list(fa.image.shape[:2]), list(fb.image.shape[:2])],
            "count": len(m),
            "threshold": t,
            "all_patches": bool(all_patches),
            "similarity": [round(float(m.similarity.min()), 4), round(float(m.similarity.max()), 4)] if len(m) else [],
            "pictures": {"matches": png_data_url(picture)},
            "size": list(picture.shape[:2]),
            "seconds": round(time.perf_counter() - started, 3),
        }


def _warn_foreign_heads(heads: dict[str, DenseHead | None], cfg: Any) -> None:
    import warnings

    from opendino.eval.features import backbone_identity
    from opendino.viz.heads import same_backbone

    identity = None
    for task, head in heads.items():
        if head is None:
            continue
        identity = identity or backbone_identity(cfg.backbone, cfg.seed)
        if not same_backbone(head, identity):
            warnings.warn(
                f"the {task} head {head.path} was trained on {head.meta.get('backbone')!r}, not on these weights "
                f"({cfg.backbone}): its predictions will not mean much",
                stacklevel=3,
            )
