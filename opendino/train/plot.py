"""`opendino plot RUN_DIR`: one PNG with the loss terms, the schedules, the collapse monitors and kNN accuracy of a
run, read from its `metrics.jsonl` (also written at the end of every training run as `RUN_DIR/training.png`)."""

from __future__ import annotations

import math
from pathlib import Path

from opendino.log import read_metrics

__all__ = ["plot_run"]

_PANELS: list[tuple[str, list[str], bool]] = [
    ("losses", ["loss/total", "loss/dino_global", "loss/dino_local", "loss/ibot", "loss/koleo"], False),
    ("learning rate", ["lr", "last_layer_lr"], True),
    ("weight decay / teacher momentum", ["wd", "momentum"], False),
    ("teacher temperature", ["teacher_temp"], False),
    (
        "collapse monitors (normalised)",
        [
            "collapse/teacher_mean_entropy",
            "collapse/teacher_sample_entropy",
            "collapse/student_std",
            "collapse/teacher_std",
            "collapse/effective_rank",
        ],
        False,
    ),
    ("throughput (images/s)", ["images_per_s"], False),
]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's curves to `out` (default RUN_DIR/training.png); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not an opendino training run, or not started yet)")
    records = read_metrics(metrics)
    if not records:
        raise ValueError(f"{metrics} holds no records yet")
    panels = [p for p in _PANELS if any(_series(records, k)[0] for k in p[1])]
    knn_keys = sorted({k for r in records for k in r if k.startswith("knn/")})
    if knn_keys:
        panels.append(("kNN top-1 accuracy", knn_keys, False))
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, keys, log) in zip(axes.flat, panels, strict=False):
        for key in keys:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, label=key.split("/")[-1], marker="o" if len(xs) < 20 else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, frameon=False)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{run_dir.name}: {records[-1]['step']} iterations", fontsize=11)
    fig.tight_layout()
    path = Path(out) if out is not None else run_dir / "training.png"
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
