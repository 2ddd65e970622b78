"""`opendino eval robustness`: the CE / mCE arithmetic against hand-computed numbers, baselines and their checks,
the stratified subset, and end-to-end runs (kNN and linear) whose corrupted accuracies are recomputed independently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from opendino import config
from opendino.cli import main
from opendino.data.augment import IMAGENET_MEAN, IMAGENET_STD
from opendino.data.synthetic import make_shapes_dataset
from opendino.eval import robustness
from opendino.eval.corruptions import CORRUPTIONS, corrupt
from opendino.eval.knn import knn_scores
from opendino.eval.robustness import ALEXNET_ERRORS, corruption_errors, load_baseline, stratified_subset
from opendino.models.hub import build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: thread sync would dominate

SETS = dict(corruptions=("gaussian_noise", "contrast"), severities=(1, 5))


# ------------------------------------------------------------------------------------------------------ the math
def test_ce_mce_and_relative_mce_by_hand():
    errors = {"a": {1: 0.2, 2: 0.4}, "b": {1: 0.5, 2: 0.7}}
    base = {"a": {1: 0.4, 2: 0.6, 3: 0.9}, "b": {1: 0.6, 2: 0.8}}  # an extra severity in the baseline is ignored
    out = corruption_errors(errors, base, clean_error=0.1, baseline_clean_error=0.3)
    assert out["mean_error"] == pytest.approx(45.0)  # 100 * (0.2 + 0.4 + 0.5 + 0.7) / 4
    assert out["mean_error_per_corruption"] == pytest.approx({"a": 30.0, "b": 60.0})
    assert out["ce"] == pytest.approx({"a": 60.0, "b": 100 * 1.2 / 1.4})  # 100 * (0.2 + 0.4) / (0.4 + 0.6), ...
    assert out["mce"] == pytest.approx((60.0 + 100 * 1.2 / 1.4) / 2)
    # relative: 100 * ((0.2 - 0.1) + (0.4 - 0.1)) / ((0.4 - 0.3) + (0.6 - 0.3)) = 100; b: 100 * 1.0 / 0.8 = 125
    assert out["relative_ce"] == pytest.approx({"a": 100.0, "b": 125.0})
    assert out["relative_mce"] == pytest.approx(112.5)
    plain = corruption_errors(errors)
    assert set(plain) == {"mean_error", "mean_error_per_corruption"}
    assert "relative_mce" not in corruption_errors(errors, base)  # no clean errors, no relative CE
    degenerate = corruption_errors(errors, base, clean_error=0.1, baseline_clean_error=0.65)
    assert degenerate["relative_ce"]["a"] is None  # the baseline does not degrade on a: 0.4 + 0.6 <= 2 x 0.65
    assert degenerate["relative_ce"]["b"] == pytest.approx(100 * 1.0 / 0.1) and degenerate["relative_mce"] is None


def test_errors_are_checked():
    with pytest.raises(ValueError, match="fraction"):
        corruption_errors({"a": {1: 20.0}})
    with pytest.raises(ValueError, match="lacks"):
        corruption_errors({"a": {1: 0.2, 2: 0.3}}, {"a": {1: 0.5}})
    with pytest.raises(ValueError, match="all zero"):
        corruption_errors({"a": {1: 0.2}}, {"a": {1: 0.0}})
    with pytest.raises(ValueError, match="at least one"):
        corruption_errors({"a": {}})


def test_alexnet_baseline():
    base = load_baseline("alexnet", corruptions=CORRUPTIONS, severities=(1, 2, 3, 4, 5))
    assert base.clean_error is None and base.source == "AlexNet"
    same = {c: dict.fromkeys(range(1, 6), e) for c, e in ALEXNET_ERRORS.items()}
    out = corruption_errors(same, base.errors)
    assert out["ce"] == pytest.approx(dict.fromkeys(CORRUPTIONS, 100.0)) and out["mce"] == pytest.approx(100.0)
    half = corruption_errors({c: {s: e / 2 for s, e in v.items()} for c, v in same.items()}, base.errors)
    assert half["mce"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="severities 1-5"):
        load_baseline("alexnet", corruptions=CORRUPTIONS, severities=(1, 3))


def _fake_run(folder: Path, dataset: dict, errors: dict, evaluation: str = "robustness") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stored = {c: {str(s): e for s, e in v.items()} for c, v in errors.items()}
    record = {"evaluation": evaluation, "dataset": dataset, "extra": {"errors": stored, "clean_error": 0.2}}
    (folder / "results.json").write_text(json.dumps(record))
    return folder


def test_baseline_file_checks(tmp_path):
    dataset = {"val": "v", "images": 40, "subset_sha256": "abc", "classes": 10, "resize_size": 40, "crop_size": 32}
    errors = {"fog": {1: 0.5, 2: 0.6}, "snow": {1: 0.7, 2: 0.8}}
    run = _fake_run(tmp_path / "run", dataset, errors)
    base = load_baseline(run, corruptions=("fog",), severities=(1, 2), dataset=dataset)  # the folder is enough
    assert base.errors["fog"] == {1: 0.5, 2: 0.6} and base.clean_error == 0.2
    assert load_baseline(run / "results.json", corruptions=("fog", "snow"), severities=(2,), dataset=dataset)
    with pytest.raises(ValueError, match=r"crop_size: 64 here, 32 in the baseline"):
        load_baseline(run, corruptions=("fog",), severities=(1,), dataset={**dataset, "crop_size": 64})
    with pytest.raises(ValueError, match="subset_sha256"):
        load_baseline(run, corruptions=("fog",), severities=(1,), dataset={**dataset, "subset_sha256": "other"})
    with pytest.raises(ValueError, match="lacks 2"):
        load_baseline(run, corruptions=("fog", "frost"), severities=(1, 2), dataset=dataset)
    with pytest.raises(ValueError, match="lacks 1"):
        load_baseline(run, corruptions=("fog",), severities=(1, 3), dataset=dataset)
    with pytest.raises(ValueError, match="not of robustness"):
        load_baseline(_fake_run(tmp_path / "knn", dataset, errors, "knn"), corruptions=("fog",), severities=(1,))
    with pytest.raises(ValueError, match=r"no such results\.json"):
        load_baseline(tmp_path / "missing", corruptions=("fog",), severities=(1,))


def test_stratified_subset():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    subset = stratified_subset(labels, 4)
    assert torch.equal(subset, subset.sort().values)
    assert torch.bincount(labels[subset]).tolist() == [4, 3, 4]
    assert torch.equal(subset, stratified_subset(labels, 4))
    members = (labels == 0).nonzero().flatten()
    assert subset[labels[subset] == 0].tolist() == members[[0, 3, 6, 9]].tolist()  # evenly spaced, ends included
    assert torch.equal(stratified_subset(labels, 0), torch.arange(20))
    with pytest.raises(ValueError, match=">= 0"):
        stratified_subset(labels, -1)


# ------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robustness")
    make_shapes_dataset(root / "train", n_per_class=4, size=48, seed=0)
    make_shapes_dataset(root / "val", n_per_class=3, size=48, seed=1)
    return root


def _cfg(data: Path, tmp_path: Path, **kw) -> config.RobustnessEvalConfig:
    kw = {"classifier": "knn", **SETS, **kw}
    return config.RobustnessEvalConfig(
        backbone="debug", train=str(data / "train"), val=str(data / "val"), resize_size=40, crop_size=32,
        num_workers=0, batch_size=8, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / kw.pop("name", "out")), **kw,
    )  # fmt: skip


def _crops(paths: list[str]) -> torch.Tensor:
    """uint8 (n, 3, 32, 32): shorter side to 40 (Pillow bicubic), centre 32 px crop, written out by hand."""
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB").resize((40, 40), Image.BICUBIC).crop((4, 4, 36, 36))
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return torch.stack(out)


def _cls(model: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.forward_features((crops.float() / 255 - mean) / std)["x_norm_clstoken"]


def test_knn_run_matches_an_independent_computation(data, tmp_path):
    record = robustness.run(_cfg(data, tmp_path, max_per_class=2))
    from opendino.eval.common import list_labelled_images

    train = list_labelled_images(data / "train")
    val = list_labelled_images(data / "val", classes=train.classes)
    subset = stratified_subset(val.labels, 2)
    assert record["dataset"]["images"] == len(subset) == 20
    torch.manual_seed(0)  # the seed the evaluation gives a preset backbone
    model = build_backbone("debug").eval()
    train_cls = _cls(model, _crops(train.paths))
    crops, labels = _crops([val.paths[i] for i in subset]), val.labels[subset]

    def accuracy(queries: torch.Tensor) -> float:
        scores = knn_scores(train_cls, train.labels, queries, ks=(20,), temperature=0.07, num_classes=10)[20]
        return (scores.argmax(1) == labels).float().mean().item()

    assert record["metrics"]["clean_top1"] == pytest.approx(accuracy(_cls(model, crops)))
    for name in SETS["corruptions"]:
        for s in SETS["severities"]:
            batches = [(crops[i : i + 8], int(subset[i])) for i in range(0, 20, 8)]  # the loader's batches of 8
            cpu = torch.device("cpu")
            parts = [corrupt(x, name, s, robustness._generator(cpu, 0, name, s, first)) for x, first in batches]
            expected = accuracy(_cls(model, torch.cat(parts)))
            assert record["extra"]["accuracy"][name][str(s)] == pytest.approx(expected), (name, s)
            assert record["extra"]["errors"][name][str(s)] == pytest.approx(1 - expected)
    assert record["metrics"]["mean_error"] == pytest.approx(
        100 * np.mean([e for v in record["extra"]["errors"].values() for e in v.values()])
    )
    assert "mce" not in record["metrics"]
    out = Path(record["params"]["out"])
    assert (out / "errors.png").stat().st_size > 0 and (out / "corruptions.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "| gaussian_noise |" in md and "mean error %" in md


def test_without_corruption_every_set_scores_the_clean_accuracy(data, tmp_path, monkeypatch):
    monkeypatch.setattr(robustness, "corrupt", lambda images, name, severity, generator: images)
    record = robustness.run(_cfg(data, tmp_path))
    accuracies = [a for v in record["extra"]["accuracy"].values() for a in v.values()]
    assert accuracies == pytest.approx([record["metrics"]["clean_top1"]] * 4)  # the two paths see the same crops


def test_linear_run_and_a_run_normalised_by_it(data, tmp_path):
    first = robustness.run(_cfg(data, tmp_path, classifier="linear", linear_epochs=2, linear_epoch_length=10))
    assert first["metrics"]["classifier"].startswith("linear (")
    assert 0 <= first["metrics"]["clean_top1"] <= 1
    baseline = first["params"]["out"]
    again = robustness.run(_cfg(data, tmp_path, classifier="linear", linear_epochs=2, linear_epoch_length=10,
                                baseline=baseline, name="again"))  # fmt: skip
    assert again["metrics"]["mce"] == pytest.approx(100.0)  # the same backbone, seed and images: CE = 100 everywhere
    assert again["extra"]["ce"] == pytest.approx(dict.fromkeys(SETS["corruptions"], 100.0))
    assert again["metrics"]["baseline"] == str(Path(baseline) / "results.json")
    assert "CE |" in (Path(again["params"]["out"]) / "results.md").read_text()
    with pytest.raises(ValueError, match=r"other images: images: 10 here, 30 in the baseline"):
        robustness.run(_cfg(data, tmp_path, baseline=baseline, max_per_class=1, name="other"))


def test_cli(data, tmp_path, capsys):
    args = ["eval", "robustness", "--backbone", "debug", "--train", str(data / "train"), "--val", str(data / "val"),
            "--resize-size", "40", "--crop-size", "32", "--num-workers", "0", "--max-per-class", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "cli"), "classifier=knn",
            "corruptions=[fog]", "severities=[2]", "baseline=alexnet"]  # fmt: skip
    assert main(args) == 2
    assert "baseline=alexnet holds errors averaged over severities 1-5" in capsys.readouterr().err
    assert main(args[:-1]) == 0
    assert '"mean_error"' in capsys.readouterr().out
    record = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert list(record["extra"]["errors"]) == ["fog"] and record["dataset"]["images"] == 10
