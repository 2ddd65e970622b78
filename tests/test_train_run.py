"""The contract of `opendino train` (debug preset, CPU, seconds): what a run folder holds, and what bad input does.

- a run folder holds config.yaml (loads back into the same config), metrics.jsonl (one record per logged step),
  TensorBoard events, checkpoints, the teacher backbone (= the teacher of the last checkpoint, readable by
  `opendino.load_backbone`) and training.png; `opendino plot` redraws it;
- a bad configuration or data source is exit code 2 naming the key, before any run folder exists;
- unreadable images are counted and replaced, never fatal;
- a non-finite loss skips that update (student, teacher, optimiser and centres untouched) and is counted; too many
  in a row stop the run with its last checkpoint finite;
- the collapse monitors on constructed statistics.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import opendino
from opendino import config
from opendino.cli import load_train_config, main
from opendino.data.synthetic import make_shapes_dataset
from opendino.log import read_metrics
from opendino.train import loop
from opendino.train.checkpoint import find_latest, list_checkpoints, load_checkpoint
from opendino.train.loop import build_optimizer_for
from opendino.train.monitor import CollapseMonitor, collapse_stats
from opendino.train.ssl import SSLModel

REQUIRED_KEYS = (
    "loss/total",
    "loss/dino_global",
    "loss/dino_local",
    "loss/ibot",
    "loss/koleo",
    "lr",
    "wd",
    "momentum",
    "teacher_temp",
    "images_per_s",
    "data_wait",
    "nonfinite_total",
    "bad_images",
    "collapse/teacher_mean_entropy",
    "collapse/teacher_sample_entropy",
    "collapse/student_std",
    "collapse/teacher_std",
    "collapse/effective_rank",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a busy 2-core machine two threads per step are several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_shapes_dataset(root, n_per_class=4, size=32, seed=0)  # 40 images in class folders
    return root


def _args(images: Path, out: Path, *more: str) -> list[str]:
    return [
        f"data.source={images}",
        "data.num_workers=0",
        f"run.output_dir={out}",
        "run.max_steps=4",
        "run.log_every=1",
        "run.checkpoint_every=2",
        "run.progress=none",
        *more,
    ]


def _train_records(run: Path) -> list[dict]:
    """The step records of a run (kNN results are records of their own)."""
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss/total" in r]


def _resumed_model(cfg: config.TrainConfig, run: Path) -> SSLModel:
    """The SSLModel of the last checkpoint of `run`, loaded as the training loop resumes it."""
    model = SSLModel(cfg)
    load_checkpoint(find_latest(run), model, build_optimizer_for(model, cfg))
    return model


# ----------------------------------------------------------------------------------------------- a finished run
@pytest.fixture(scope="module")
def finished(images, tmp_path_factory):
    """One 4-step run through the CLI, logged every 2 steps, with a kNN evaluation at the end: (run folder, its
    config, CLI summary)."""
    root = tmp_path_factory.mktemp("finished")
    knn_train, knn_val = root / "knn_train", root / "knn_val"
    make_shapes_dataset(knn_train, n_per_class=2, size=32, seed=1)
    make_shapes_dataset(knn_val, n_per_class=1, size=32, seed=2)
    knn = (f"run.knn_train={knn_train}", f"run.knn_val={knn_val}", "run.knn_size=32")
    args = _args(images, root / "run", "run.log_every=2", *knn)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["train", "debug", *args]) == 0
    summary = json.loads(stdout.getvalue()[stdout.getvalue().index("{\n") :])
    return root / "run", load_train_config("debug", args), summary


def test_run_folder_contract(finished):
    run, cfg, summary = finished
    assert config.load(config.TrainConfig, run / "config.yaml") == cfg
    assert summary["steps"] == 4 and summary["run_dir"] == str(run)
    assert summary["nonfinite_total"] == 0 and summary["bad_images"] == 0
    assert math.isfinite(summary["losses"]["total"])
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.rglob("*.tmp*")) and not list(run.rglob(".tmp-*"))


def test_metrics_one_record_per_logged_step(finished):
    run, _, summary = finished
    records = _train_records(run)
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        missing = [k for k in REQUIRED_KEYS if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        assert all(isinstance(r[k], int | float) and math.isfinite(r[k]) for k in REQUIRED_KEYS)
        assert 0 <= r["data_wait"] <= 1 and r["images_per_s"] > 0
    assert 0.0 < records[0]["lr"] < records[-1]["lr"]  # in the warm-up
    assert records[-1]["loss/total"] == pytest.approx(summary["losses"]["total"])


def test_knn_evaluation_at_the_end(finished):
    run, _, _ = finished
    knn = [r for r in read_metrics(run / "metrics.jsonl") if any(k.startswith("knn/") for k in r)]
    assert [r["step"] for r in knn] == [4]
    assert set(knn[0]) == {"step", "knn/top1_k10", "knn/top1_k20"}
    assert all(0.0 <= knn[0][k] <= 1.0 for k in ("knn/top1_k10", "knn/top1_k20"))


def test_backbone_file_is_the_teacher_of_the_last_checkpoint(finished):
    run, cfg, summary = finished
    assert summary["backbone"] == str(run / "teacher_backbone.safetensors")
    model = _resumed_model(cfg, run)
    loaded = opendino.load_backbone(run).state_dict()
    teacher = model.teacher.backbone.state_dict()
    assert loaded.keys() == teacher.keys()
    assert all(torch.equal(loaded[k], teacher[k]) for k in teacher)
    student = model.student.backbone.state_dict()
    assert not all(torch.equal(student[k], teacher[k]) for k in teacher)  # the EMA lags the student


def test_plot_command(finished, tmp_path, capsys):
    run, _, _ = finished
    out = tmp_path / "curves.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob("*.tmp*"))
    capsys.readouterr()
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss/to')  # only a line torn by a kill
    assert main(["plot", str(tmp_path)]) == 2
    assert "no records" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("dino.head_n_prototypes=128", "Size mismatch"),  # another model
        ("optim.layerwise_decay=1.0", "parameter groups differ"),  # another optimiser layout
        ("run.resume=false", "run.resume=false"),  # a fresh start over an earlier run's checkpoints
    ],
)
def test_restart_that_does_not_fit_the_run_changes_nothing(finished, images, tmp_path, capsys, change, says):
    run, _, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert main(["train", "debug", *_args(images, copy, change)]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------------------------- bad input
def _no_images(root: Path) -> Path:
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "readme.txt").write_text("no pictures here")
    return root


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["run.max_step=3"], "run.max_step"),
        (["run.max_steps=many"], "run.max_steps"),
        (["crops.global_crops_size=30"], "crops.global_crops_size"),
        (["data.num_workers=-1"], "data.num_workers"),
        (["run.knn_train=/somewhere"], "knn_train"),
        (["run.precision=bf16", "run.device=cpu"], "run.precision"),
        (["data.source="], "data.source"),
        (["data.source={tmp}/missing"], "data.source"),
        (["data.source={tmp}/empty"], "data.source"),
        (["data.source={tmp}/no_images"], "data.source"),
    ],
)
def test_bad_config_is_rejected_before_any_work(images, tmp_path, capsys, overrides, named):
    (tmp_path / "empty").mkdir()
    _no_images(tmp_path / "no_images")
    out = tmp_path / "run"
    args = _args(images, out, *(o.format(tmp=tmp_path) for o in overrides))
    assert main(["train", "debug", *args]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not out.exists()


def test_no_data_source_and_unknown_preset(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "debug", f"run.output_dir={out}"]) == 2
    assert "data.source is empty" in capsys.readouterr().err
    assert main(["train", "debgu", f"run.output_dir={out}"]) == 2
    assert "debgu" in capsys.readouterr().err
    assert not out.exists()


def test_unreadable_images_are_counted_not_fatal(images, tmp_path, capsys):
    data = tmp_path / "data"
    make_shapes_dataset(data, n_per_class=4, size=32, seed=0)
    good = next(data.rglob("*.png")).read_bytes()
    (data / "disc" / "zero_bytes.png").write_bytes(b"")
    (data / "ring" / "truncated.png").write_bytes(good[: len(good) // 3])
    (data / "dots" / "text.jpg").write_text("this is not a JPEG\n")
    # 43 images, 3 steps of 16: every image is drawn at least once; two DataLoader workers decode them
    args = _args(data, tmp_path / "run", "run.max_steps=3", "data.num_workers=2")
    assert main(["train", "debug", *args]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n") :])
    assert summary["steps"] == 3 and summary["bad_images"] >= 3
    assert _train_records(tmp_path / "run")[-1]["bad_images"] == summary["bad_images"]
    for name in ("zero_bytes.png", "truncated.png", "text.jpg"):
        assert f"skipped unreadable image {data}" in out and name in out


# ----------------------------------------------------------------------------------------------- non-finite losses
def _nan_loss_at(monkeypatch, calls: list[int], bad) -> None:
    """`SSLModel.compute_losses` returns a NaN total at the steps (0-based) for which `bad(step)` holds."""
    original = SSLModel.compute_losses

    def compute_losses(self, student, targets, batch):
        losses = original(self, student, targets, batch)
        if bad(len(calls)):
            losses["total"] = losses["total"] * float("nan")
        calls.append(len(calls))
        return losses

    monkeypatch.setattr(SSLModel, "compute_losses", compute_losses)


def _snapshot(model: SSLModel, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, s in optimizer.state_dict()["state"].items():
        state.update({f"optim.{i}.{k}": v.clone() for k, v in s.items()})
    return state


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(a[k], b.get(k, a[k] + 1)) for k in a if k.startswith(prefix))


def test_nonfinite_loss_skips_the_update_and_is_counted(images, tmp_path, monkeypatch, capsys):
    calls: list[int] = []
    _nan_loss_at(monkeypatch, calls, lambda step: step in (2, 3))
    steps = []
    real_step = loop.train_step

    def spy(model, batch, optimizer, values, **kwargs):
        before = _snapshot(model, optimizer)
        result = real_step(model, batch, optimizer, values, **kwargs)
        steps.append((before, _snapshot(model, optimizer), result[1]))
        return result

    monkeypatch.setattr(loop, "train_step", spy)
    cfg = load_train_config("debug", _args(images, tmp_path / "run", "run.max_steps=6"))
    summary = loop.run_train(cfg)

    assert [finite for *_, finite in steps] == [True, True, False, False, True, True]
    for i, (before, after, finite) in enumerate(steps):
        if not finite:  # student, teacher, both centres and the AdamW moments as they were
            assert before.keys() == after.keys()
            assert all(torch.equal(before[k], after[k]) for k in before), f"step {i}"
        else:
            assert _changed(before, after, "dino_center.") and _changed(before, after, "ibot_center.")
            if i > 0:  # step 0 runs at learning rate 0
                for part in ("student.", "teacher.", "optim."):
                    assert _changed(before, after, part), f"step {i}: {part} unchanged"
    assert summary["steps"] == 6 and summary["nonfinite_total"] == 2 and math.isfinite(summary["losses"]["total"])
    records = _train_records(tmp_path / "run")
    assert [r["loss/total"] for r in records[2:4]] == ["nan", "nan"]
    assert [r["nonfinite_total"] for r in records] == [0, 0, 1, 2, 2, 2]
    assert math.isfinite(records[2]["loss/dino_global"])
    assert "step 3: non-finite loss" in capsys.readouterr().out


def test_too_many_nonfinite_steps_stop_the_run_with_a_finite_checkpoint(images, tmp_path, monkeypatch):
    calls: list[int] = []
    _nan_loss_at(monkeypatch, calls, lambda step: step >= 3)
    run = tmp_path / "run"
    cfg = load_train_config("debug", _args(images, run, "run.max_steps=10", "run.max_nonfinite_steps=3"))
    with pytest.raises(loop.NonFiniteLossError, match="3 consecutive steps"):
        loop.run_train(cfg)
    assert len(calls) == 6  # steps 3, 4, 5 non-finite: stopped after the third
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    state = json.loads((find_latest(run) / "state.json").read_text())
    assert state["nonfinite_total"] == state["nonfinite_in_a_row"] == 1
    model = _resumed_model(cfg, run)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    backbone = opendino.load_backbone(run).state_dict()
    assert all(torch.isfinite(v).all() for v in backbone.values())


def test_the_command_reports_a_stopped_run_in_one_line(images, tmp_path, monkeypatch, capsys):
    _nan_loss_at(monkeypatch, [], lambda step: True)
    code = main(["train", "debug", *_args(images, tmp_path / "run", "run.max_steps=5", "run.max_nonfinite_steps=2")])
    assert code == 3
    err = capsys.readouterr().err
    assert "opendino train: error: 2 consecutive steps with a non-finite loss" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------- collapse monitors
def test_collapse_stats_on_constructed_outputs():
    torch.manual_seed(0)
    n, d, k = 512, 64, 32
    same = torch.randn(1, d).expand(n, d).contiguous()
    one_prototype = F.one_hot(torch.zeros(n, dtype=torch.long), k).float()
    collapsed = collapse_stats(one_prototype, same, same)
    assert collapsed["collapse/teacher_mean_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["collapse/teacher_sample_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["collapse/student_std"] == collapsed["collapse/teacher_std"] == 0.0
    assert collapsed["collapse/effective_rank"] < 0.02  # one direction (from rounding) of 64
    assert len(CollapseMonitor().check(collapsed)) == 2  # dimensional and features

    spread = torch.randn(n, d)
    confident = F.one_hot(torch.randint(k, (n,)), k).float()
    healthy = collapse_stats(confident, spread, spread)
    assert healthy["collapse/teacher_mean_entropy"] > 0.95 and healthy["collapse/teacher_sample_entropy"] == 0.0
    assert healthy["collapse/student_std"] == pytest.approx(1.0, abs=0.05)
    assert healthy["collapse/effective_rank"] > 0.9

    uniform = collapse_stats(torch.full((n, k), 1 / k), spread, spread)
    assert uniform["collapse/teacher_sample_entropy"] == pytest.approx(1.0, abs=1e-5)
    line = torch.randn(n, 1) * torch.randn(1, d) + torch.randn(1, d)  # spread out, but along one direction
    assert collapse_stats(confident, line, line)["collapse/effective_rank"] < 0.02


def _stats(mean=0.9, sample=0.3, std=0.8, rank=0.5) -> dict[str, float]:
    return {
        "collapse/teacher_mean_entropy": mean,
        "collapse/teacher_sample_entropy": sample,
        "collapse/student_std": std,
        "collapse/teacher_std": std,
        "collapse/effective_rank": rank,
    }


def test_collapse_monitor_warns_once_per_kind_and_again_after_recovery():
    monitor = CollapseMonitor()
    assert monitor.check(_stats()) == []
    (dimensional,) = monitor.check(_stats(mean=0.05))
    assert "same few prototypes" in dimensional and "0.050" in dimensional
    assert monitor.check(_stats(mean=0.04)) == []  # still collapsed: said once
    assert monitor.check(_stats()) == []
    assert len(monitor.check(_stats(mean=0.05))) == 1  # collapsed again after recovering

    monitor = CollapseMonitor()
    (uniform,) = monitor.check(_stats(sample=0.99))
    assert "teacher.teacher_temp" in uniform
    (features,) = CollapseMonitor().check(_stats(rank=0.01))
    assert "same feature" in features
    assert len(CollapseMonitor().check(_stats(mean=0.01, sample=0.99, std=0.0))) == 3


# ----------------------------------------------------------------------------------------------- other sources
def test_training_reads_tar_shards_and_weighted_manifests(images, tmp_path):
    """The same loop on webdataset-style tar shards (a brace pattern) and on a manifest with sampling weights."""
    import tarfile

    from opendino.data.manifest import write_manifest
    from opendino.data.sources import list_images

    paths = list_images(images)
    for shard in range(2):
        with tarfile.open(tmp_path / f"train-{shard:03d}.tar", "w") as tar:
            for i, path in enumerate(paths[shard::2]):
                tar.add(path, arcname=f"{shard:03d}{i:05d}.png")
    shards_run = tmp_path / "shards_run"
    pattern = str(tmp_path / "train-{000..001}.tar")
    summary = loop.run_train(load_train_config("debug", [*_args(images, shards_run), f"data.source={pattern}"]))
    assert summary["steps"] == 4 and summary["bad_images"] == 0
    assert opendino.load_backbone(shards_run).embed_dim == 96

    manifest = tmp_path / "curated.csv"
    weights = [0.0 if i % 2 else 1.0 for i in range(len(paths))]
    write_manifest(manifest, paths, weights=weights)
    manifest_run = tmp_path / "manifest_run"
    loop.run_train(load_train_config("debug", [*_args(images, manifest_run), f"data.source={manifest}"]))
    assert len(_train_records(manifest_run)) == 4
    with pytest.raises(config.ConfigError, match=r"weights, which need data\.shuffle=true"):
        loop.run_train(
            load_train_config(
                "debug", [*_args(images, tmp_path / "x"), f"data.source={manifest}", "data.shuffle=false"]
            )
        )
