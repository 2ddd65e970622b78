"""What every `opendino eval NAME` shares: the frozen backbone and its identity, cached features, labelled folders,
and the results files.

An evaluation module exposes `run(cfg) -> dict` and is written as: `ctx = setup("knn", cfg)` (process group under
torchrun, seeded backbone in eval mode, output folder), `ctx.features(paths, transform)` (cached, sharded over
processes), then `ctx.write_results(...)`, which writes on the main process:
    results.json   {"evaluation", "backbone", "backbone_identity", "dataset", "params", "seed", "metrics", "extra",
                    "seconds", "created", "versions"}
    results.md     a title, the same facts as a list, and the evaluation's markdown table(s)
and returns the record. Pictures are saved by the evaluation through `ctx.picture_path(name)`.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opendino import dist
from opendino.config import to_dict
from opendino.eval.features import FeatureSet, backbone_identity, cached_features, default_cache_dir, pick_device

__all__ = ["EvalContext", "LabelledImages", "list_labelled_images", "markdown_table", "run_features", "setup"]


@dataclass
class LabelledImages:
    """Image paths with integer labels and the class names the labels index."""

    paths: list[str]
    labels: torch.Tensor
    classes: list[str]


def list_labelled_images(folder: str | os.PathLike[str], classes: Sequence[str] | None = None) -> LabelledImages:
    """An image folder with one sub-folder per class (the ImageFolder layout): paths, integer labels, class names.

    `classes` fixes the label order (e.g. the training set's for a validation folder); a class folder not in it is
    an error. Images are listed recursively within each class folder.
    """
    from opendino.data.sources import list_images

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{folder}: not a folder (expected one sub-folder of images per class)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise ValueError(f"{folder}: no class sub-folders (expected <folder>/<class>/<image>)")
    names = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(f"{folder}: classes {unknown[:5]} are not among the {len(names)} training classes")
    paths: list[str] = []
    labels: list[int] = []
    for name in found:
        try:
            files = list_images(root / name)
        except ValueError:  # an empty class folder
            continue
        paths += files
        labels += [names.index(name)] * len(files)
    if not paths:
        raise ValueError(f"{folder}: no images in the class sub-folders")
    return LabelledImages(paths=paths, labels=torch.tensor(labels, dtype=torch.long), classes=names)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are written with 4 decimals."""

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    import torchvision

    from opendino import __version__

    return {"opendino": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}


@dataclass
class EvalContext:
    """A frozen backbone ready to evaluate, with where its features and results go."""

    name: str
    cfg: Any
    model: torch.nn.Module
    device: torch.device
    identity: dict[str, Any]
    out: Path
    cache_dir: Path | None
    started: float = field(default_factory=time.perf_counter)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)  # type: ignore[arg-type]

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_size)  # type: ignore[arg-type]

    def features(
        self, paths: Sequence[str], transform, *, outputs: Sequence[str] = ("cls",), desc: str = "features"
    ) -> FeatureSet:
        """Features of `paths` (cached unless cache_dir is ""); bad images are left out and listed in `.bad`."""
        return cached_features(
            self.model,
            paths,
            transform,
            identity=self.identity,
            outputs=outputs,
            cache_dir=self.cache_dir,
            device=self.device,
            amp=self.cfg.amp,
            batch_size=self.cfg.batch_size,
            num_workers=self.cfg.num_workers,
            desc=desc,
        )

    def picture_path(self, filename: str) -> Path:
        return self.out / filename

    def write_results(
        self,
        *,
        dataset: dict[str, Any],
        metrics: dict[str, Any],
        tables: Sequence[str] = (),
        extra: dict[str, Any] | None = None,
        bad_images: Sequence[tuple[str, str]] = (),
    ) -> dict[str, Any]:
        """Write results.json and results.md (main process only) and return the record.

        `metrics`: the headline numbers (JSON-serialisable); `tables`: markdown tables for results.md; `extra`:
        longer outputs (per-class scores, curves) kept in the JSON only; `bad_images`: (path, reason) left out.
        """
        record = {
            "evaluation": self.name,
            "backbone": self.cfg.backbone,
            "backbone_identity": self.identity,
            "dataset": dataset,
            "params": to_dict(self.cfg),
            "seed": self.cfg.seed,
            "metrics": metrics,
            "extra": extra or {},
            "bad_images": [list(b) for b in bad_images],
            "seconds": round(time.perf_counter() - self.started, 2),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": _versions(),
        }
        if dist.is_main():
            _atomic_write(self.out / "results.json", json.dumps(record, indent=2, default=_jsonable) + "\n")
            facts = [
                f"- backbone: `{self.cfg.backbone}`",
                *(f"- {k}: `{v}`" for k, v in dataset.items()),
                f"- seed: {self.cfg.seed}; {record['seconds']} s; opendino {record['versions']['opendino']}, "
                f"torch {record['versions']['torch']}",
            ]
            if bad_images:
                facts.append(f"- {len(bad_images)} unreadable images left out (listed in results.json)")
            md = f"# opendino eval {self.name}\n\n" + "\n".join(facts) + "\n\n" + "\n".join(tables)
            _atomic_write(self.out / "results.md", md)
        return record


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to results.json")


def setup(name: str, cfg: Any) -> EvalContext:
    """Process group (under torchrun), the backbone in eval mode on its device, the output folder."""
    from opendino.models.hub import load_backbone

    device = pick_device(cfg.device)
    if dist.init_distributed(device) and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank())
    torch.manual_seed(cfg.seed)  # a preset name means random weights: the seed fixes them (and is in the cache key)
    model = load_backbone(cfg.backbone, device=device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    out = Path(cfg.out or f"runs/eval/{name}")
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    cache = None if cfg.cache_dir == "" else (default_cache_dir() if cfg.cache_dir == "auto" else Path(cfg.cache_dir))
    return EvalContext(
        name=name,
        cfg=cfg,
        model=model,
        device=device,
        identity=backbone_identity(cfg.backbone, cfg.seed),
        out=out,
        cache_dir=cache,
    )


def run_features(cfg: Any) -> dict[str, Any]:
    """`opendino eval features`: fill the cache for a folder and report the extraction throughput."""
    from opendino.data.augment import make_eval_transform
    from opendino.data.sources import list_images

    ctx = setup("features", cfg)
    paths = list_images(cfg.data)
    transform = make_eval_transform(cfg.resize_size, cfg.crop_size)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    started = time.perf_counter()
    fs = ctx.features(paths, transform, outputs=cfg.outputs, desc="features")
    seconds = time.perf_counter() - started
    shapes = {k: list(v.shape) for k, v in fs.features.items()}
    metrics = {"images": len(paths), "good": len(fs.paths), "from_cache": fs.from_cache, "seconds": round(seconds, 3),
               "images_per_second": round(len(paths) / max(seconds, 1e-9), 2)}  # fmt: skip
    table = markdown_table(["images", "unreadable", "seconds", "images/s", "outputs"],
                           [[len(paths), len(fs.bad), seconds, metrics["images_per_second"], shapes]])  # fmt: skip
    dataset = {"data": cfg.data, "transform": f"resize {cfg.resize_size}, centre crop {cfg.crop_size}",
               "device": str(ctx.device), "world_size": dist.world_size()}  # fmt: skip
    return ctx.write_results(dataset=dataset, metrics=metrics, tables=[table], extra={"shapes": shapes},
                             bad_images=fs.bad)  # fmt: skip
