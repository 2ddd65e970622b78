"""The README's main command: `opendino quickstart`, run as a user runs it (relative output folder)."""

from __future__ import annotations

import json

import pytest
import torch

from opendino.cli import main
from opendino.eval.knn import knn_accuracy, knn_scores


def test_quickstart_with_a_relative_output_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--n-per-class", "6", "device=cpu"]) == 0
    report = json.loads((tmp_path / "runs" / "quickstart" / "quickstart.json").read_text())
    assert report["images"] == 60 and report["feature_dim"] == 96
    assert 0.0 <= report["knn_top1"]["k=10"] <= 1.0
    assert json.loads(capsys.readouterr().out)["classes"] == 10


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
