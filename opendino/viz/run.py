"""`opendino viz KIND`: read the images, load the backbone (and the head), compute with the pure functions of
`opendino.viz` and write the pictures, then `viz.json` (parameters, per-image facts, files, skipped images).

Files written into `cfg.out`, per image NAME (the file stem, made unique):
    pca         NAME_pca.png (image | foreground | PCA), pca_grid.png (the whole set)
    foreground  NAME_foreground.png (mask at the image's own size), NAME_foreground.npy ((h, w) bool patch mask),
                NAME_foreground.json (threshold, grid, sizes)
    match       match_A_B.png, match_A_B.json (matched patches and similarities)
    attention   NAME_attention.png (image | mean | heads)
    depth       NAME_depth.png (image | depth with a colorbar), NAME_depth.npy ((H, W) metres)
    seg         NAME_seg.png (image | classes with a legend), NAME_seg.npy ((H, W) class indices)
An unreadable image is reported (stderr and viz.json) and skipped; the others are still drawn.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from opendino.viz import figures
from opendino.viz.attention import cls_attention
from opendino.viz.core import DEFAULT_IMAGE_SIZE, ImageFeatures, foreground_masks, image_features, pca_maps
from opendino.viz.heads import load_head, predict_depth_map, predict_segmentation, same_backbone
from opendino.viz.match import mutual_nearest_neighbours

__all__ = ["expand_images", "read_images", "run_viz", "unique_names"]

MATCH_LINE_FLOOR = 0.25  # match lines: PCA colour c drawn as 0.25 + 0.75 c, so that no line is black


def expand_images(sources: Sequence[str]) -> list[str]:
    """Files as given (checked when read) and the images of folders (recursive, sorted)."""
    from opendino.data.sources import list_images

    paths: list[str] = []
    for source in sources:
        paths += list_images(source) if os.path.isdir(source) else [source]
    return paths


def read_images(paths: Sequence[str]) -> tuple[list[tuple[str, Image.Image]], list[tuple[str, str]]]:
    """[(path, RGB image)] of the readable files and [(path, reason)] of the others (each also printed to stderr)."""
    from opendino.data.sources import BadImageError, load_image

    good, bad = [], []
    for path in paths:
        try:
            good.append((path, load_image(path)))
        except BadImageError as e:
            bad.append((path, e.reason))
            print(f"opendino viz: skipped {path}: {e.reason}", file=sys.stderr)
    return good, bad


def unique_names(paths: Sequence[str]) -> list[str]:
    """File stems, with -2, -3, ... appended to repeated ones."""
    names: list[str] = []
    for path in paths:
        stem, k = Path(path).stem, 2
        name = stem
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names.append(name)
    return names


def _write_json(path: Path, obj: Any) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _progress(items: Sequence, desc: str):
    return tqdm(items, desc=desc, unit="img", dynamic_ncols=True, disable=None)


class _Job:
    """What every drawer needs: the backbone, the readable images, their names, the settings, the output folder."""

    def __init__(self, cfg: Any, model: nn.Module, items: list[tuple[str, Image.Image]], out: Path) -> None:
        self.cfg, self.model, self.out = cfg, model, out
        self.paths = [p for p, _ in items]
        self.images = [img for _, img in items]
        self.names = unique_names(self.paths)
        self.label = Path(cfg.backbone).name if os.path.exists(cfg.backbone) else f"{cfg.backbone} (random weights)"
        self.files: list[Path] = []
        self.facts: list[dict[str, Any]] = [
            {"image": p, "name": n} for p, n in zip(self.paths, self.names, strict=True)
        ]

    @property
    def image_size(self) -> int:
        return self.cfg.image_size or DEFAULT_IMAGE_SIZE

    def features(self) -> list[ImageFeatures]:
        return [
            image_features(self.model, img, image_size=self.image_size) for img in _progress(self.images, "features")
        ]

    def groups(self, n: int) -> list[list[int]]:
        """Indices of the images fitted together: each alone (per_image) or all at once."""
        return [[i] for i in range(n)] if self.cfg.per_image else [list(range(n))]


def _pca(job: _Job) -> None:
    feats = job.features()
    rgbs: list[np.ndarray] = [np.empty(0)] * len(feats)
    masks: list[np.ndarray] = [np.empty(0)] * len(feats)
    for group in job.groups(len(feats)):
        maps = pca_maps(
            [feats[i] for i in group], threshold=job.cfg.threshold, remove_background=not job.cfg.keep_background
        )
        for k, i in enumerate(group):
            rgbs[i], masks[i] = maps.rgb[k], maps.masks[k]
            job.facts[i].update(
                grid=list(feats[i].grid),
                foreground_fraction=round(float(masks[i].mean()), 4),
                explained_variance_ratio=[round(float(v), 4) for v in maps.pca.explained_variance_ratio],
            )
    for i, f in enumerate(feats):
        title = f"{job.names[i]} · {job.label} · PCA of patch features"
        job.files.append(
            figures.save_pca_figure(job.out / f"{job.names[i]}_pca.png", f.image, masks[i], rgbs[i], title=title)
        )
    job.files.append(figures.save_pca_grid(job.out / "pca_grid.png", job.names, [f.image for f in feats], masks, rgbs))


def _foreground(job: _Job) -> None:
    feats = job.features()
    for group in job.groups(len(feats)):
        fg = foreground_masks([feats[i] for i in group], job.cfg.threshold)
        for k, i in enumerate(group):
            mask, name, image = fg.masks[k], job.names[i], job.images[i]
            facts: dict[str, Any] = {
                "image": job.paths[i],
                "threshold": fg.threshold,
                "threshold_units": "standard deviations of the first principal component's scores",
                "fitted_with": [job.paths[j] for j in group],
                "grid": list(mask.shape),
                "patch_size": feats[i].patch_size,
                "input_size": list(feats[i].image.shape[:2]),
                "image_size": [image.height, image.width],
                "foreground_fraction": round(float(mask.mean()), 4),
            }
            job.facts[i].update(grid=facts["grid"], foreground_fraction=facts["foreground_fraction"])
            job.files += [
                figures.save_png(job.out / f"{name}_foreground.png", figures.mask_picture(mask, facts["image_size"])),
                figures.save_npy(job.out / f"{name}_foreground.npy", mask),
                _write_json(job.out / f"{name}_foreground.json", facts),
            ]


def _match(job: _Job) -> None:
    a, b = job.features()
    if job.cfg.keep_background:
        mask_a = mask_b = None
    else:
        masks = (
            [foreground_masks([f], job.cfg.threshold).masks[0] for f in (a, b)]
            if job.cfg.per_image
            else foreground_masks([a, b], job.cfg.threshold).masks
        )
        mask_a, mask_b = masks
    matches = mutual_nearest_neighbours(a, b, mask_a=mask_a, mask_b=mask_b, top=job.cfg.matches)
    rgb = pca_maps([a], masks=None if mask_a is None else [mask_a], remove_background=False).rgb[0]
    colours = MATCH_LINE_FLOOR + (1 - MATCH_LINE_FLOOR) * rgb[matches.a[:, 0], matches.a[:, 1]]
    picture = figures.match_picture(a.image, b.image, matches, colours, a.patch_size)
    stem = f"match_{job.names[0]}_{job.names[1]}"
    where = "all patches" if job.cfg.keep_background else "foreground patches"
    low = f", similarity >= {matches.similarity[-1]:.2f}" if len(matches) else ""
    title = (
        f"{job.names[0]} → {job.names[1]} · {job.label}\n{len(matches)} strongest mutual nearest neighbours "
        f"among {where} (cosine{low}); colour = PCA of the first image"
    )
    rows = [
        [*map(int, pa), *map(int, pb), round(float(s), 5)]
        for pa, pb, s in zip(matches.a, matches.b, matches.similarity, strict=True)
    ]
    job.facts[0].update(grid=list(a.grid), matches=len(matches))
    job.facts[1].update(grid=list(b.grid))
    job.files += [
        figures.save_match_figure(job.out / f"{stem}.png", picture, title=title),
        _write_json(
            job.out / f"{stem}.json",
            {
                "images": job.paths,
                "patch_size": a.patch_size,
                "columns": ["row_a", "col_a", "row_b", "col_b", "cosine"],
                "matches": rows,
            },
        ),
    ]


def _attention(job: _Job) -> None:
    for i, image in enumerate(_progress(job.images, "attention")):
        maps = cls_attention(job.model, image, image_size=job.image_size, block=job.cfg.block)
        title = f"{job.names[i]} · {job.label} · class-token attention of block {maps.block} per head"
        job.facts[i].update(grid=list(maps.heads.shape[1:]), block=maps.block)
        job.files.append(figures.save_attention_figure(job.out / f"{job.names[i]}_attention.png", maps, title=title))


def _load_head(job: _Job):
    from opendino.eval.features import backbone_identity

    head = load_head(job.cfg.head, device=next(job.model.parameters()).device)
    if not same_backbone(head, backbone_identity(job.cfg.backbone, job.cfg.seed)):
        print(
            f"opendino viz: warning: the head in {job.cfg.head} was trained on {head.meta.get('backbone')!r}, "
            f"not on these weights ({job.cfg.backbone}); its predictions will not mean much",
            file=sys.stderr,
        )
    return head


def _depth(job: _Job) -> None:
    head = _load_head(job)
    for i, image in enumerate(_progress(job.images, "depth")):
        dm = predict_depth_map(job.model, head, image, image_size=job.cfg.image_size)
        title = f"{job.names[i]} · {job.label} · linear depth head ({Path(job.cfg.head).name})"
        job.facts[i].update(size=list(dm.depth.shape), depth_range=[float(dm.depth.min()), float(dm.depth.max())])
        job.files += [
            figures.save_depth_figure(job.out / f"{job.names[i]}_depth.png", dm, title=title),
            figures.save_npy(job.out / f"{job.names[i]}_depth.npy", dm.depth),
        ]


def _seg(job: _Job) -> None:
    head = _load_head(job)
    for i, image in enumerate(_progress(job.images, "seg")):
        sm = predict_segmentation(job.model, head, image, image_size=job.cfg.image_size)
        title = f"{job.names[i]} · {job.label} · linear segmentation head ({Path(job.cfg.head).name})"
        job.facts[i].update(size=list(sm.labels.shape))
        job.files += [
            figures.save_seg_figure(job.out / f"{job.names[i]}_seg.png", sm, title=title),
            figures.save_npy(job.out / f"{job.names[i]}_seg.npy", sm.labels.astype(np.int32)),
        ]


DRAWERS: dict[str, Callable[[_Job], None]] = {
    "pca": _pca,
    "foreground": _foreground,
    "match": _match,
    "attention": _attention,
    "depth": _depth,
    "seg": _seg,
}


def _check_image_size(cfg: Any, model: nn.Module) -> None:
    p = int(model.patch_size)  # type: ignore[arg-type]
    size = cfg.image_size or DEFAULT_IMAGE_SIZE
    if cfg.kind not in ("depth", "seg") and size % p:
        near = max(p, round(size / p) * p)
        raise ValueError(f"image_size={size} is not a multiple of the backbone's patch size {p} (try {near})")


def run_viz(cfg: Any) -> dict[str, Any]:
    """Draw `cfg.kind` (a `config.VizConfig`) for `cfg.images` into `cfg.out`; returns the record saved as viz.json."""
    from opendino.config import to_dict
    from opendino.eval.features import pick_device
    from opendino.models.hub import load_backbone

    started = time.perf_counter()
    # ---- images
    paths = expand_images(cfg.images)
    if cfg.kind == "match" and len(paths) != 2:
        raise ValueError(f"match takes exactly two images, got {len(paths)}: {paths[:5]}")
    items, skipped = read_images(paths)
    if cfg.kind == "match" and skipped:
        raise ValueError(f"match needs both images: {skipped[0][0]}: {skipped[0][1]}")
    if not items:
        raise ValueError(
            f"none of the {len(paths)} images could be read (" + "; ".join(f"{p}: {r}" for p, r in skipped[:3]) + ")"
        )
    # ---- backbone
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)  # a preset name means random weights: the seed fixes them
    model = load_backbone(cfg.backbone, device=device).eval()
    _check_image_size(cfg, model)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # ---- pictures
    job = _Job(cfg, model, items, out)
    DRAWERS[cfg.kind](job)
    record = {
        "kind": cfg.kind,
        "backbone": cfg.backbone,
        "params": to_dict(cfg),
        "images": job.facts,
        "skipped": [list(s) for s in skipped],
        "files": [f.name for f in job.files],
        "seconds": round(time.perf_counter() - started, 2),
    }
    _write_json(out / "viz.json", record)
    return record
