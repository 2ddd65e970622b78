"""`opendino quickstart`: the main job on an embedded default, with no download.

Draws a labelled image set (10 procedural classes, `opendino.data.synthetic`), extracts CLS features with a
backbone (by default the `debug` preset, randomly initialised with seed 0) through the same code path as
`opendino extract`, and reports the official weighted-kNN accuracy on a train / val split of the generated images,
beside chance level.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from opendino.config import ExtractConfig, QuickstartConfig
from opendino.data.synthetic import CLASSES, make_shapes_dataset
from opendino.eval.knn import knn_accuracy
from opendino.extract import load_extracted, run_extract

__all__ = ["run_quickstart"]


def run_quickstart(cfg: QuickstartConfig) -> dict:
    out = Path(cfg.out)
    items = make_shapes_dataset(out / "images", n_per_class=cfg.n_per_class, size=cfg.image_size, seed=cfg.seed)
    list_file = out / "images.txt"
    list_file.write_text("".join(str(Path(p).resolve()) + "\n" for p, _ in items))  # list entries resolve from here
    label_of = {str(Path(p).resolve()): y for p, y in items}
    crop = cfg.image_size // 14 * 14 if cfg.backbone != "debug" else cfg.image_size // 8 * 8
    summary = run_extract(
        ExtractConfig(
            backbone=cfg.backbone,
            data=str(list_file),
            out=str(out / "features"),
            resize_size=cfg.image_size,
            crop_size=crop,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            shard_size=1000,
            device=cfg.device,
            overwrite=True,
        )
    )
    feats = load_extracted(out / "features")
    if summary["n_bad"]:
        raise RuntimeError(f"{summary['n_bad']} generated images could not be read: see {out}/features/bad_images.tsv")
    labels = torch.tensor([label_of[str(Path(p).resolve())] for p in feats["paths"]])
    cls = torch.from_numpy(np.asarray(feats["cls"]))
    # even / odd images of each class: train / val
    order = torch.arange(len(labels))
    train, val = order % 2 == 0, order % 2 == 1
    acc = knn_accuracy(cls[train], labels[train], cls[val], labels[val], ks=(10, 20))
    report = {
        "images": len(items),
        "classes": len(CLASSES),
        "backbone": cfg.backbone,
        "feature_dim": int(cls.shape[1]),
        "extract_images_per_second": summary["images_per_second_this_run"],
        "knn_top1": {f"k={k}": round(v, 4) for k, v in acc.items()},
        "chance": round(1 / len(CLASSES), 4),
        "features": str(out / "features"),
    }
    (out / "quickstart.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report
