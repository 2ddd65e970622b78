"""The README's main command: `opendino quickstart`, run as a user runs it (relative output folder)."""

from __future__ import annotations

import json

import pytest
import torch

from opendino.cli import main
from opendino.eval.knn import knn_accuracy, knn_scores


def test_quickstart_with_a_relative_output_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["quickstart", "--n-per-class", "4", "--image-size", "32", "--crop-size", "32", "--steps", "4"]
    assert main([*args, "--batch-size", "8", "--num-workers", "0", "device=cpu"]) == 0
    out = tmp_path / "runs" / "quickstart"
    report = json.loads((out / "quickstart.json").read_text())
    assert report["train_images"] == 40 and report["steps"] == 4 and report["classes"] == 10
    for key in ("knn_top1_trained", "knn_top1_random_init"):
        assert set(report[key]) == {"k=10", "k=20"} and all(0 <= v <= 1 for v in report[key].values())
    assert (out / "run" / "teacher_backbone.safetensors").is_file() and (out / "run" / "training.png").is_file()
    assert '"knn_top1_trained"' in capsys.readouterr().out
    # a rerun finds the finished run and does not train again
    metrics = (out / "run" / "metrics.jsonl").read_text()
    assert main([*args, "--batch-size", "8", "--num-workers", "0", "device=cpu"]) == 0
    assert (out / "run" / "metrics.jsonl").read_text() == metrics
    assert json.loads((out / "quickstart.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_quickstart_defaults_learn_features_better_than_random_init(tmp_path):
    """The README's main command with its defaults: pretraining must clearly beat the same architecture at random
    initialisation on kNN (measured on this 2-core CPU: about 0.25 against 0.15 at k=20, chance 0.10)."""
    from opendino.config import QuickstartConfig
    from opendino.quickstart import run_quickstart

    report = run_quickstart(QuickstartConfig(out=str(tmp_path / "qs"), device="cpu"))
    trained, random_init = report["knn_top1_trained"]["k=20"], report["knn_top1_random_init"]["k=20"]
    assert trained >= random_init + 0.05, report


def test_knn_on_separable_features_is_perfect_and_matches_a_loop():
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 5
    labels = torch.arange(4).repeat_interleave(10)
    train = centres[labels] + 0.1 * torch.randn(40, 16)
    queries = centres[torch.arange(4).repeat(3)] + 0.1 * torch.randn(12, 16)
    acc = knn_accuracy(train, labels, queries, torch.arange(4).repeat(3), ks=(5, 20))
    assert acc == {5: 1.0, 20: 1.0}
    # the official weighting, by a loop: softmax over the top-k cosine similarities / T, summed per class
    scores = knn_scores(train, labels, queries[:3], ks=(7,), temperature=0.07, chunk_size=2)[7]
    tn = torch.nn.functional.normalize(train, dim=1)
    for qi, q in enumerate(torch.nn.functional.normalize(queries[:3], dim=1)):
        sims = tn @ q
        top = sims.topk(7)
        w = (top.values / 0.07).softmax(0)
        expected = torch.zeros(4)
        for weight, j in zip(w, top.indices, strict=True):
            expected[labels[j]] += weight
        torch.testing.assert_close(scores[qi], expected)


def test_knn_refuses_empty_sets():
    with pytest.raises(ValueError, match="needs"):
        knn_accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(2, 4), torch.zeros(2))
