"""Logistic regression on frozen CLS features, as the official DINOv2 evaluation, and the `opendino eval logreg`
command.

Protocol (`dinov2/eval/log_regression.py` at b8931f7, facts sheet §6): raw CLS features after the final norm (not
L2-normalised) in float64; L2-regularised multinomial logistic regression fitted by L-BFGS (max_iter 1000,
tol 1e-12, up to 50 line-search steps); C over 10 ** linspace(-6, 5, 45) (float32 as the official computes it);
C chosen by top-1 accuracy on a random 10% of train (`torch.manual_seed(0)`, `randperm`, the first n // 10 held
out; the seed is the config's, 0 by default; ties go to the smaller C, as the official `MetricTracker`'s first
maximum), then refit on all of train with that C and scored on val.

Differences: the official fits with cuML on the GPU; this runs scikit-learn's `LogisticRegression(solver="lbfgs")`
on the CPU, which minimises the same objective (cuML's default `penalty_normalized` makes its C sklearn's). Each fit
starts from the previous C's solution (warm start along the increasing-C path, also for the final refit): the
problem is strictly convex, so the optimum is the same, reached in fewer iterations. Under torchrun the C grid is
split in contiguous blocks over processes (the official splits it round-robin).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from opendino import dist

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression

    from opendino.config import LogregEvalConfig

__all__ = ["LogregSweep", "c_grid", "fit_logreg", "holdout_split", "predict_scores", "run", "save_c_curve", "sweep_c"]


def c_grid(min_exp: float = -6.0, max_exp: float = 5.0, steps: int = 45) -> list[float]:
    """The official grid of C: 10 ** linspace(min_exp, max_exp, steps), computed in float32 as the official does."""
    if steps <= 0 or min_exp > max_exp:
        raise ValueError(f"C grid: steps={steps} must be positive and min_exp={min_exp} <= max_exp={max_exp}")
    return [float(c) for c in (10 ** torch.linspace(min_exp, max_exp, steps)).tolist()]


def holdout_split(n: int, fraction: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(fit indices, held-out indices) of n training samples: a `randperm` seeded with `seed`, whose first
    floor(n * fraction) indices are held out (the official: seed 0, n // 10)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction}: expected 0 < fraction < 1")
    held = math.floor(n * fraction + 1e-9)
    if held < 1 or held >= n:
        raise ValueError(f"{n} training samples: holding out {fraction:g} of them leaves {held} to pick C with")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[held:], perm[:held]


def _estimator(C: float, max_iter: int, tol: float, warm_start: bool) -> LogisticRegression:
    from sklearn.linear_model import LogisticRegression

    # the default penalty is L2 in every scikit-learn version (1.8+ spells it l1_ratio=0); lbfgs is multinomial
    return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=tol, warm_start=warm_start)


def _as_float64(x: Tensor | np.ndarray) -> np.ndarray:
    x = x.numpy() if isinstance(x, Tensor) else x
    return np.ascontiguousarray(x, dtype=np.float64)


def _check_xy(x: Tensor | np.ndarray, y: Tensor | np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_float64(x), np.asarray(y.numpy() if isinstance(y, Tensor) else y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{name}: features (n, D) and labels (n,) expected, got {x.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        raise ValueError(f"{name}: logistic regression needs samples of at least 2 classes, got {np.unique(y)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features hold NaN or infinite values")
    return x, y.astype(np.int64)


def fit_logreg(
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    C: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-12,
    init: LogisticRegression | None = None,
) -> LogisticRegression:
    """An L-BFGS logistic regression fitted on float64 `x` (n, D) with integer labels `y` (n,) at `C`; `init`: a
    fitted model with the same classes to start from (a warm start: same optimum, fewer iterations)."""
    from sklearn.exceptions import ConvergenceWarning

    x, y = _check_xy(x, y, "fit_logreg")
    if init is not None and not np.array_equal(init.classes_, np.unique(y)):
        init = None  # its coefficients are for other classes
    model = copy.deepcopy(init) if init is not None else _estimator(C, max_iter, tol, warm_start=False)
    model.set_params(C=C, max_iter=max_iter, tol=tol, warm_start=init is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # n_iter_ == max_iter tells it
        model.fit(x, y)
    return model


def predict_scores(model: LogisticRegression, x: Tensor | np.ndarray, num_classes: int) -> Tensor:
    """(n, num_classes) float64 class probabilities; classes absent from the model's training labels score 0."""
    probs = model.predict_proba(_as_float64(x))
    scores = np.zeros((probs.shape[0], num_classes), dtype=np.float64)
    scores[:, model.classes_] = probs
    return torch.from_numpy(scores)


@dataclass
class LogregSweep:
    """The held-out accuracy of each C and the model at the best one (the smallest C among equals)."""

    cs: list[float]
    holdout_top1: list[float]
    n_iter: list[int]  # L-BFGS iterations of each fit (max_iter: stopped before convergence)
    best_index: int
    best_model: LogisticRegression  # fitted on the fit part at best_c

    @property
    def best_c(self) -> float:
        return self.cs[self.best_index]


def sweep_c(
    x_fit: Tensor | np.ndarray,
    y_fit: Tensor | np.ndarray,
    x_holdout: Tensor | np.ndarray,
    y_holdout: Tensor | np.ndarray,
    cs: Sequence[float],
    *,
    max_iter: int = 1000,
    tol: float = 1e-12,
    warm_start: bool = True,
    progress: bool = False,
) -> LogregSweep:
    """Fit at every C of `cs` (in increasing order, each from the previous solution when `warm_start`) and score
    top-1 accuracy on the held-out part. Under torchrun each process sweeps a contiguous block of `cs`."""
    cs = sorted(float(c) for c in cs)
    if not cs or cs[0] <= 0:
        raise ValueError(f"cs={cs}: give one or more positive values of C")
    x_fit, y_fit = _check_xy(x_fit, y_fit, "fit part")
    x_holdout, y_holdout = _as_float64(x_holdout), np.asarray(y_holdout)
    world, rank = dist.world_size(), dist.rank()
    per = -(-len(cs) // world)
    mine = range(rank * per, min((rank + 1) * per, len(cs)))
    results: dict[int, tuple[float, int]] = {}
    best: tuple[float, int, LogisticRegression] | None = None  # (accuracy, index, model)
    model = None
    for i in tqdm(mine, desc="logreg C sweep", unit="C", disable=None if progress and dist.is_main() else True):
        model = fit_logreg(x_fit, y_fit, cs[i], max_iter=max_iter, tol=tol, init=model if warm_start else None)
        acc = float((model.predict(x_holdout) == y_holdout).mean())
        results[i] = (acc, int(model.n_iter_[0]))
        if best is None or acc > best[0]:
            best = (acc, i, copy.deepcopy(model))
    parts = dist.all_gather_object((results, best))
    for part_results, _ in parts:
        results.update(part_results)
    top = max((b for _, b in parts if b is not None), key=lambda b: (b[0], -b[1]))  # ties: the smaller C
    return LogregSweep(
        cs=cs,
        holdout_top1=[results[i][0] for i in range(len(cs))],
        n_iter=[results[i][1] for i in range(len(cs))],
        best_index=top[1],
        best_model=top[2],
    )


def save_c_curve(sweep: LogregSweep, path: str | os.PathLike[str], title: str = "") -> Path:
    """Held-out top-1 accuracy against C (log scale), the chosen C marked."""
    from opendino.eval.pictures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.semilogx(sweep.cs, sweep.holdout_top1, marker=".")
    ax.axvline(sweep.best_c, color="tab:red", linestyle="--", label=f"best C = {sweep.best_c:.3g}")
    ax.set_xlabel("C (inverse L2 strength)")
    ax.set_ylabel("held-out top-1")
    ax.set_title(title or "logistic regression: choice of C")
    ax.grid(alpha=0.3)
    ax.legend()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------- opendino eval logreg
class MissingDependencyError(RuntimeError):
    """scikit-learn is not installed (the `eval` extra); the command line prints it as one line, exit code 2."""

    exit_code = 2


def run(cfg: LogregEvalConfig) -> dict[str, Any]:
    """`opendino eval logreg`: pick C on a held-out part of train, refit on all of train, score val."""
    try:
        import sklearn  # noqa: F401
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency
    except ImportError as e:
        raise MissingDependencyError(
            f"logistic regression needs scikit-learn ({e}); install it with: pip install 'opendino[eval]'"
        ) from None

    from opendino.data.augment import make_eval_transform
    from opendino.eval.common import list_labelled_images, markdown_table, setup
    from opendino.eval.knn import labelled_features
    from opendino.eval.metrics import classification_metrics
    from opendino.eval.pictures import save_confusion_matrix

    ctx = setup("logreg", cfg)
    train = list_labelled_images(cfg.train)
    val = list_labelled_images(cfg.val, classes=train.classes)
    transform = make_eval_transform(cfg.resize_size, cfg.crop_size)
    train_x, train_y, train_bad = labelled_features(ctx, train, transform, desc="train features")
    val_x, val_y, val_bad = labelled_features(ctx, val, transform, desc="val features")

    fit_idx, held_idx = holdout_split(len(train_y), cfg.holdout_fraction, cfg.seed)
    cs = c_grid(cfg.c_min_exp, cfg.c_max_exp, cfg.c_steps)
    with threadpool_limits(cfg.threads or None):  # None: leave the libraries' thread pools as they are
        sweep = sweep_c(train_x[fit_idx], train_y[fit_idx], train_x[held_idx], train_y[held_idx], cs,
                        max_iter=cfg.max_iter, tol=cfg.tol, warm_start=cfg.warm_start, progress=True)  # fmt: skip
        init = sweep.best_model if cfg.warm_start else None
        final = fit_logreg(train_x, train_y, sweep.best_c, max_iter=cfg.max_iter, tol=cfg.tol, init=init)
    result = classification_metrics(predict_scores(final, val_x, len(train.classes)), val_y, train.classes)

    pictures = ["confusion.png", "c_curve.png"]
    if dist.is_main():
        title = f"logreg C={sweep.best_c:.3g}: top-1 {result['top1']:.3f} ({len(val_y)} val images)"
        save_confusion_matrix(result["confusion"], train.classes, ctx.picture_path(pictures[0]), title=title)
        save_c_curve(sweep, ctx.picture_path(pictures[1]))
    metrics = {
        "top1": result["top1"], "top5": result["top5"], "mean_per_class": result["mean_per_class"],
        "best_c": sweep.best_c, "holdout_top1": sweep.holdout_top1[sweep.best_index],
        "final_n_iter": int(final.n_iter_[0]),
    }  # fmt: skip
    summary = markdown_table(
        ["best C", "held-out top-1", "val top-1", "val top-5", "val mean per-class"],
        [[f"{sweep.best_c:.4g}", sweep.holdout_top1[sweep.best_index], result["top1"], result["top5"],
          result["mean_per_class"]]],
    )  # fmt: skip
    curve = markdown_table(
        ["C", "held-out top-1", "L-BFGS iterations"],
        [[f"{c:.4g}", a, it] for c, a, it in zip(sweep.cs, sweep.holdout_top1, sweep.n_iter, strict=True)],
    )
    dataset = {
        "train": cfg.train, "val": cfg.val, "classes": len(train.classes), "train_images": len(train_y),
        "holdout_images": len(held_idx), "val_images": len(val_y),
        "transform": f"resize {cfg.resize_size}, centre crop {cfg.crop_size}", "features": "raw CLS, float64",
        "warm_start": cfg.warm_start, "max_iter": cfg.max_iter, "threads": cfg.threads or "default",
        "world_size": dist.world_size(),
    }  # fmt: skip
    extra = {
        "curve": {"c": sweep.cs, "holdout_top1": sweep.holdout_top1, "n_iter": sweep.n_iter},
        "per_class": result["per_class"],
        "confusion": result["confusion"],
        "pictures": pictures,
    }
    return ctx.write_results(
        dataset=dataset, metrics=metrics, tables=[summary, curve], extra=extra, bad_images=[*train_bad, *val_bad]
    )
