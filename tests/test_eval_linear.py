"""Linear probes (`opendino eval linear`): batched heads against separate heads and the official code, the schedule,
feature construction, head selection, and the evaluation end to end on tiny image sets.

End to end, the backbone is the randomly initialised `debug` ViT: its features do not separate the synthetic shapes
(kNN and logistic regression are at chance there too), but they do separate colours, so the image set is one colour
per class with a random distractor square, where every head should be right on every validation image.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torch import nn

from opendino.config import ConfigError, LinearEvalConfig
from opendino.eval.linear import (
    OFFICIAL_LEARNING_RATES,
    LinearHeads,
    LinearProbeResult,
    cosine_factor,
    feature_batches,
    fit_linear_probes,
    linear_input,
    run,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: thread sync would dominate

FIXTURES = Path(__file__).parent / "fixtures" / "official"
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40), "yellow": (220, 200, 40)}


def _features(n: int, dim: int, *, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"cls_blocks": torch.randn(n, 4, dim, generator=gen), "mean": torch.randn(n, dim, generator=gen)}


def _set_heads(heads: LinearHeads, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> None:
    """Load per-head (C, in) weights and (C,) biases, heads in `heads.names` order."""
    n_lr = len(heads.learning_rates)
    with torch.no_grad():
        for g in range(len(heads.configs)):
            heads.weights[g].copy_(torch.stack(weights[g * n_lr : (g + 1) * n_lr]))
            heads.biases[g].copy_(torch.stack(biases[g * n_lr : (g + 1) * n_lr]))


# ------------------------------------------------------------------------------------------- against the official code
@pytest.fixture(scope="module")
def official():
    facts = json.loads((FIXTURES / "linear_training.json").read_text())
    return facts, load_file(str(FIXTURES / "linear_training.safetensors"))


def test_linear_input_matches_official_create_linear_input(official):
    facts, t = official
    cls_blocks = t["cls"][0].transpose(0, 1)  # (blocks, B, D) -> (B, blocks, D), oldest block first
    mean = t["patch"][0, -1].mean(dim=1)  # the last block's mean patch token
    for k, head in enumerate(facts["heads"]):
        ours = linear_input(cls_blocks, mean, head["n_last_blocks"], head["avgpool"])
        torch.testing.assert_close(ours, t[f"input_{k}"], rtol=0, atol=1e-6)
    assert linear_input(cls_blocks, mean, 4, True).shape == (facts["batch_size"], 5 * facts["embed_dim"])


def test_training_matches_official_heads_sgd_and_cosine(official):
    facts, t = official
    heads = LinearHeads(
        facts["embed_dim"], facts["num_classes"], learning_rates=facts["learning_rates"], n_last_blocks=(1, 4),
        avgpool=(False, True), batch_size=facts["batch_size"], total_iterations=facts["iterations"],
    )  # fmt: skip
    assert [(n, a) for n, a in heads.configs for _ in heads.learning_rates] == [
        (h["n_last_blocks"], h["avgpool"]) for h in facts["heads"]
    ]
    torch.testing.assert_close(heads.scaled_lrs.repeat(4).double(), torch.tensor(facts["scaled_lrs"]).double())
    n_heads = len(facts["heads"])
    _set_heads(heads, [t[f"init_weight_{k}"] for k in range(n_heads)], [t[f"init_bias_{k}"] for k in range(n_heads)])
    for it in range(facts["iterations"]):
        expected_lrs = torch.tensor(facts["lr_per_iteration"][it], dtype=torch.float64)
        ours = (heads.scaled_lrs.double() * cosine_factor(it, facts["iterations"])).repeat(4)
        torch.testing.assert_close(ours, expected_lrs, rtol=1e-6, atol=0)
        loss = heads.step(t["cls"][it].transpose(0, 1), t["patch"][it, -1].mean(dim=1), t["labels"][it])
        assert loss.item() == pytest.approx(facts["loss_per_iteration"][it], rel=1e-5)
    for k, head in enumerate(heads.heads()):
        assert not torch.equal(head.weight, t[f"init_weight_{k}"])  # the heads did move
        torch.testing.assert_close(head.weight, t[f"final_weight_{k}"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head.bias, t[f"final_bias_{k}"], rtol=1e-5, atol=1e-6)


def test_head_names_are_distinct_where_the_official_ones_collide(official):
    facts, _ = official
    default = facts["default_grid_batch_128"]
    assert default["param_groups"] == 52 and len(default["names"]) == 48  # official: 2 x 2 rates share a name
    heads = LinearHeads(8, 3, batch_size=128)
    assert len(heads.names) == len(set(heads.names)) == 52
    assert heads.names[0] == "1_blocks_avgpool_False_lr_1e-05" and heads.names[-1] == "4_blocks_avgpool_True_lr_0.1"


# --------------------------------------------------------------------------------------------- against a reference loop
def test_batched_heads_equal_separate_linear_layers_with_sgd():
    gen = torch.Generator().manual_seed(1)
    dim, classes, batch, steps, total = 6, 4, 10, 5, 8
    lrs = (0.3, 1.0, 4.0)
    heads = LinearHeads(dim, classes, learning_rates=lrs, n_last_blocks=(1, 2, 4), avgpool=(False, True),
                        batch_size=batch, total_iterations=total, seed=3)  # fmt: skip
    reference = []
    for clf in heads.heads():
        layer = nn.Linear(clf.weight.shape[1], classes)
        with torch.no_grad():
            layer.weight.copy_(clf.weight)
            layer.bias.copy_(clf.bias)
        opt = torch.optim.SGD(layer.parameters(), lr=clf.scaled_lr, momentum=0.9, weight_decay=0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=0)
        reference.append((clf, layer, opt, sched))
    for _ in range(steps):
        feats = _features(batch, dim, gen=gen)
        labels = torch.randint(0, classes, (batch,), generator=gen)
        total_loss = heads.step(feats["cls_blocks"], feats["mean"], labels)
        ref_loss = 0.0
        for clf, layer, opt, sched in reference:
            loss = nn.functional.cross_entropy(layer(linear_input(**feats, n_last_blocks=clf.n_last_blocks,
                                                                  avgpool=clf.avgpool)), labels)  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            ref_loss += loss.item()
        assert total_loss.item() == pytest.approx(ref_loss, rel=1e-5)
    for ours, (_, layer, _, _) in zip(heads.heads(), reference, strict=True):
        torch.testing.assert_close(ours.weight, layer.weight.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.bias, layer.bias.detach(), rtol=1e-5, atol=1e-7)


def test_cosine_factor_follows_torch_cosine_annealing():
    total, base = 37, 0.05
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=0)
    for it in range(total + 1):
        assert base * cosine_factor(it, total) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()
    assert cosine_factor(0, total) == 1.0 and cosine_factor(total, total) == pytest.approx(0.0, abs=1e-15)


def test_learning_rates_scale_with_batch_size_over_256():
    heads = LinearHeads(4, 3, batch_size=512)
    torch.testing.assert_close(heads.scaled_lrs, torch.tensor(OFFICIAL_LEARNING_RATES) * 2.0)
    assert [c.scaled_lr for c in heads.heads()][:13] == pytest.approx([lr * 2 for lr in OFFICIAL_LEARNING_RATES])


def test_linear_input_order_and_errors():
    cls_blocks = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mean = -torch.ones(2, 3)
    x = linear_input(cls_blocks, mean, 2, True)
    assert torch.equal(x[0], torch.tensor([6.0, 7, 8, 9, 10, 11, -1, -1, -1]))  # blocks 3 and 4 in order, then mean
    assert torch.equal(linear_input(cls_blocks, None, 1, False), cls_blocks[:, 3])
    with pytest.raises(ValueError, match="at least n_last_blocks=5"):
        linear_input(cls_blocks, mean, 5, False)
    with pytest.raises(ValueError, match="avgpool needs mean"):
        linear_input(cls_blocks, None, 1, True)


def test_heads_initialisation_and_classifier_logits():
    heads = LinearHeads(64, 50, learning_rates=(0.1, 1.0), seed=7)
    w = torch.cat([w.flatten() for w in heads.weights])
    assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4
    assert all(b.abs().sum() == 0 for b in heads.biases)
    assert torch.equal(LinearHeads(64, 50, learning_rates=(0.1, 1.0), seed=7).weights[3], heads.weights[3])
    feats = _features(5, 64, gen=torch.Generator().manual_seed(0))
    batched = torch.cat(heads.logits(**feats))  # (heads, 5, 50)
    for k, clf in enumerate(heads.heads()):
        torch.testing.assert_close(clf.logits(**feats), batched[k], rtol=1e-5, atol=1e-6)


def test_feature_batches_cover_every_row_once_per_epoch():
    n = 10
    feats = {
        "cls_blocks": torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 4, 2),
        "mean": torch.zeros(n, 2),
    }
    stream = feature_batches(feats, torch.arange(n), batch_size=4, seed=0)
    labels = torch.cat([next(stream)[2] for _ in range(5)])  # 20 rows = 2 epochs
    assert sorted(labels[:10].tolist()) == list(range(10)) and sorted(labels[10:].tolist()) == list(range(10))
    again = feature_batches(feats, torch.arange(n), batch_size=4, seed=0)
    assert torch.equal(torch.cat([next(again)[2] for _ in range(5)]), labels)
    first = next(feature_batches(feats, torch.arange(n), batch_size=4, seed=1))
    assert torch.equal(first[0][:, 0, 0].long(), first[2])  # features and labels stay aligned


def _clusters(n_per_class: int, classes: int, dim: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    cls = centres[labels][:, None, :] + torch.randn(len(labels), 4, dim, generator=gen)
    return {"cls_blocks": cls, "mean": torch.randn(len(labels), dim, generator=gen)}, labels


def test_fit_linear_probes_learns_separable_features_and_picks_first_best():
    train, train_labels = _clusters(40, 5, 16, seed=0)
    val, val_labels = _clusters(20, 5, 16, seed=1)
    kwargs = dict(num_classes=5, learning_rates=(1e-4, 0.01, 0.1), epochs=2, epoch_length=30, batch_size=32, seed=0)
    result = fit_linear_probes(train, train_labels, val, val_labels, **kwargs)
    assert isinstance(result, LinearProbeResult) and len(result.accuracies) == 12 == len(result.heads)
    best_acc = max(result.accuracies.values())
    assert best_acc > 0.95
    assert result.best.name == next(name for name, acc in result.accuracies.items() if acc == best_acc)
    assert result.accuracies[result.best.name] == pytest.approx(
        (result.best.logits(**val).argmax(1) == val_labels).float().mean().item()
    )
    assert result.accuracies["1_blocks_avgpool_False_lr_0.0001"] < best_acc  # too small a rate to get far
    assert result.best.weight.shape[0] == 5 and result.best.weight.device.type == "cpu"
    assert [p["iteration"] for p in result.curve] == [30, 60] and result.iterations == 60
    again = fit_linear_probes(train, train_labels, val, val_labels, **kwargs)
    assert again.accuracies == result.accuracies and torch.equal(again.best.weight, result.best.weight)


def test_fit_linear_probes_rejects_bad_input():
    train, labels = _clusters(4, 3, 8, seed=0)
    with pytest.raises(ValueError, match="missing \\['mean'\\]"):
        fit_linear_probes({"cls_blocks": train["cls_blocks"]}, labels, train, labels, num_classes=3)
    with pytest.raises(ValueError, match="labels \\(n,\\) with n > 0"):
        fit_linear_probes(train, labels[:-1], train, labels, num_classes=3)
    with pytest.raises(ValueError, match="labels must lie in \\[0, 2\\)"):
        fit_linear_probes(train, labels, train, labels, num_classes=2)
    with pytest.raises(ValueError, match=r"block counts in 1\.\.4"):
        fit_linear_probes(train, labels, train, labels, num_classes=3, n_last_blocks=(1, 8), epoch_length=1)
    with pytest.raises(ConfigError, match=r"block counts in 1\.\.4"):
        LinearEvalConfig(backbone="debug", train="a", val="b", n_last_blocks=(5,))


# ------------------------------------------------------------------------------------------------------- end to end
def _colour_images(root: Path, n_per_class: int, seed: int) -> None:
    """<root>/<colour>/<i>.png: the class colour with pixel noise and a randomly coloured square somewhere."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = np.clip(np.array(rgb, np.float32) + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            x, y = (int(v) for v in rng.integers(0, 40, 2))
            ImageDraw.Draw(img).rectangle([x, y, x + 20, y + 20], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            img.save(root / name / f"{i:03d}.png")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    _colour_images(root / "train", 16, seed=0)
    _colour_images(root / "val", 6, seed=1)
    return root


def _cfg(root: Path, tmp_path: Path, **kw) -> LinearEvalConfig:
    base = dict(backbone="debug", train=str(root / "train"), val=str(root / "val"), out=str(tmp_path / "out"),
                cache_dir=str(root / "cache"), num_workers=0, resize_size=64, crop_size=64, epochs=2, epoch_length=50,
                train_batch_size=32, learning_rates=(1e-3, 0.01, 0.1, 1.0), device="cpu")  # fmt: skip
    return LinearEvalConfig(**{**base, **kw})


@pytest.mark.filterwarnings("ignore:.*randomly initialised")
def test_run_fast_mode_end_to_end(shapes, tmp_path):
    record = run(_cfg(shapes, tmp_path))
    m, extra = record["metrics"], record["extra"]
    assert m["top1"] == m["top5"] == m["mean_per_class"] == 1.0
    assert set(extra["selection_accuracies"].values()) == {1.0}
    assert m["best_head"] == "1_blocks_avgpool_False_lr_0.001"  # all heads tie: the first one wins, as officially
    assert m["selected_on"] == "val" and m["selection_top1"] == 1.0 and m["iterations"] == 100
    assert extra["per_class"] == dict.fromkeys(COLOURS, 1.0) and extra["confusion"][2] == [0, 0, 6, 0]
    assert record["dataset"]["train_images"] == 64 and record["dataset"]["val_images"] == 24
    out = tmp_path / "out"
    assert (out / "confusion.png").stat().st_size > 0 and (out / "accuracy_vs_lr.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "| lr | applied lr | 1 block | 1 block + avgpool | 4 blocks | 4 blocks + avgpool |" in md and "**" in md
    assert json.loads((out / "results.json").read_text())["metrics"]["best_head"] == m["best_head"]


@pytest.mark.filterwarnings("ignore:.*randomly initialised")
def test_run_with_held_out_selection(shapes, tmp_path):
    record = run(_cfg(shapes, tmp_path, val_fraction=0.25, learning_rates=(0.01, 0.1), avgpool=(True,)))
    d, m = record["dataset"], record["metrics"]
    assert (d["train_images"], d["held_out_images"], d["val_images"]) == (48, 16, 24)
    assert m["selected_on"].startswith("held-out 16 train images")
    assert set(record["extra"]["val_accuracies"]) == set(record["extra"]["selection_accuracies"])
    assert record["extra"]["val_accuracies"][m["best_head"]] == pytest.approx(m["top1"])
    assert (tmp_path / "out" / "results.md").read_text().count("| lr | applied lr |") == 2


@pytest.mark.filterwarnings("ignore:.*randomly initialised")
def test_run_augment_mode_trains_on_the_fly(shapes, tmp_path):
    record = run(_cfg(shapes, tmp_path, mode="augment", epochs=1, epoch_length=3, train_batch_size=8,
                      learning_rates=(0.1,), n_last_blocks=(4,)))  # fmt: skip
    m = record["metrics"]
    assert m["iterations"] == 3 and len(record["extra"]["selection_accuracies"]) == 2
    assert 0.0 <= m["top1"] <= 1.0 and "RandomResizedCrop 64" in record["dataset"]["transform"]
    assert math.isfinite(record["extra"]["curve"][-1]["loss"])


@pytest.mark.gpu
def test_fit_linear_probes_on_gpu_matches_cpu():
    train, train_labels = _clusters(40, 5, 16, seed=0)
    val, val_labels = _clusters(20, 5, 16, seed=1)
    kwargs = dict(num_classes=5, learning_rates=(0.01, 0.1), epochs=1, epoch_length=20, batch_size=32)
    cpu = fit_linear_probes(train, train_labels, val, val_labels, device="cpu", **kwargs)
    gpu = fit_linear_probes(train, train_labels, val, val_labels, device="cuda", **kwargs)
    for a, b in zip(cpu.heads, gpu.heads, strict=True):
        assert b.weight.device.type == "cpu"
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
