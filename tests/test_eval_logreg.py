"""`opendino eval logreg`: the official protocol's pieces (C grid, held-out split, choice of C), warm-started fits
against plain scikit-learn fits, bad input, and the command end to end on images whose answer is known."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from test_eval_knn import make_colour_folders

from opendino.cli import main
from opendino.eval.logreg import c_grid, fit_logreg, holdout_split, predict_scores, sweep_c


def blobs(n: int, dim: int = 6, classes: int = 3, noise: float = 1.6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes: held-out accuracy well below 1, so the choice of C matters."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return rng.normal(size=(classes, dim))[y] * 1.5 + rng.normal(size=(n, dim)) * noise, y


def plain_fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int = 1000) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=C, max_iter=max_iter, tol=1e-12).fit(x, y)


def test_c_grid_is_the_official_one():
    cs = c_grid()
    assert len(cs) == 45 and cs == sorted(cs)
    assert cs[0] == pytest.approx(1e-6, rel=1e-6) and cs[-1] == pytest.approx(1e5, rel=1e-6)
    assert cs[22] == pytest.approx(10**-0.5, rel=1e-6)  # the middle of linspace(-6, 5, 45)
    assert all(c == float(np.float32(c)) for c in cs)  # computed in float32, as the official torch.linspace
    with pytest.raises(ValueError, match="steps"):
        c_grid(1, 0, 5)


@pytest.mark.parametrize("n", [10, 99, 1000, 7500])
def test_holdout_split_is_the_official_randperm(n):
    fit, held = holdout_split(n, 0.1, seed=0)
    torch.manual_seed(0)  # the official: torch.manual_seed(0); torch.randperm(n); the first n // 10 held out
    perm = torch.randperm(n)
    assert torch.equal(held, perm[: n // 10]) and torch.equal(fit, perm[n // 10 :])
    assert not torch.equal(holdout_split(n, 0.1, seed=1)[1], held)


def test_sweep_with_warm_starts_matches_plain_scikit_learn_fits():
    x, y = blobs(150)
    fit, held = holdout_split(len(y), 0.2, seed=0)
    cs = c_grid(-3, 1, 9)
    sweep = sweep_c(x[fit], y[fit], x[held], y[held], cs)
    plain = [float((plain_fit(x[fit], y[fit], C).predict(x[held]) == y[held]).mean()) for C in cs]
    assert sweep.holdout_top1 == plain
    assert 0.5 < max(plain) < 1.0 and min(plain) < max(plain)
    assert sweep.best_c == cs[plain.index(max(plain))]  # the first (smallest) C of the best accuracy
    assert max(sweep.n_iter) < 1000  # converged: warm and cold starts reach one optimum
    # the final refit, warm-started from the sweep's model, against a plain fit at the chosen C
    final = fit_logreg(x, y, sweep.best_c, init=sweep.best_model)
    reference = plain_fit(x, y, sweep.best_c)
    np.testing.assert_allclose(final.predict_proba(x), reference.predict_proba(x), atol=1e-6)
    assert (final.predict(x) == reference.predict(x)).all()


def test_warm_start_saves_iterations():
    x, y = blobs(150, seed=1)
    fit, held = holdout_split(len(y), 0.2)
    cs = c_grid(-3, 1, 9)
    warm = sweep_c(x[fit], y[fit], x[held], y[held], cs)
    cold = sweep_c(x[fit], y[fit], x[held], y[held], cs, warm_start=False)
    assert warm.holdout_top1 == cold.holdout_top1
    assert sum(warm.n_iter) < sum(cold.n_iter)


def test_predict_scores_with_a_class_absent_from_training():
    x, y = blobs(60, classes=3)
    model = fit_logreg(x, np.where(y == 1, 3, y), 1.0)  # labels 0, 2, 3 of 5 classes
    scores = predict_scores(model, torch.from_numpy(x), 5)
    assert scores.shape == (60, 5) and scores.dtype == torch.float64
    assert (scores[:, [1, 4]] == 0).all()
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(60, dtype=torch.float64))


def test_bad_input_is_refused():
    x, y = blobs(20)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_logreg(x, np.zeros(20, dtype=np.int64), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        fit_logreg(np.full_like(x, np.nan), y, 1.0)
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        fit_logreg(x, y[:5], 1.0)
    with pytest.raises(ValueError, match="leaves 0"):
        holdout_split(5, 0.1)
    with pytest.raises(ValueError, match="positive values of C"):
        sweep_c(x, y, x, y, [0.0, 1.0])


def test_eval_logreg_command_end_to_end(tmp_path):
    root = make_colour_folders(tmp_path / "data", n_train=8, n_val=3)
    out = tmp_path / "out"
    args = ["eval", "logreg", "--backbone", "debug", "--train", str(root / "train"), "--val", str(root / "val"),
            "--out", str(out), "--num-workers", "0", "--resize-size", "40", "--crop-size", "32", "device=cpu",
            "c_min_exp=-2", "c_max_exp=2", "c_steps=5", "holdout_fraction=0.25", "max_iter=200",
            "threads=1"]  # fmt: skip
    assert main(args) == 0
    record = json.loads((out / "results.json").read_text())
    metrics = record["metrics"]
    assert metrics["top1"] == metrics["mean_per_class"] == metrics["holdout_top1"] == 1.0
    assert metrics["best_c"] == pytest.approx(0.01, rel=1e-6)  # every C separates the colours: the smallest wins
    assert record["dataset"]["holdout_images"] == 6 and record["dataset"]["train_images"] == 24
    assert len(record["extra"]["curve"]["c"]) == 5 and record["extra"]["confusion"] == [[3, 0, 0], [0, 3, 0], [0, 0, 3]]
    assert all((out / name).stat().st_size > 0 for name in record["extra"]["pictures"])
    assert "| best C | held-out top-1 |" in Path(out / "results.md").read_text()


def test_missing_scikit_learn_is_one_clear_line(monkeypatch, capsys):
    from opendino.cli import main

    monkeypatch.setitem(sys.modules, "sklearn", None)  # what an environment without the `eval` extra looks like
    assert main(["eval", "logreg", "--backbone", "debug", "--train", "a", "--val", "b"]) == 2
    err = capsys.readouterr().err
    assert "needs scikit-learn" in err and "opendino[eval]" in err
