"""A killed `opendino train` restarted with the same command continues exactly as if it had never stopped.

The real thing: `python -m opendino train debug ...` runs as a subprocess in its own session, is killed with SIGKILL
(the whole process group, DataLoader workers included) once a randomly chosen step is in `metrics.jsonl`, or from
inside, half-way through writing a checkpoint; the same command then resumes from the last finished checkpoint. The
per-step metrics, the final checkpoint (model, optimiser, random states, counters) and the exported teacher backbone
must equal those of an uninterrupted run bit for bit, and the run folder must be clean: no `.tmp-` checkpoint,
`run.keep_last` checkpoints, one metrics record per step. Unit tests pin the checkpoint folder rules the resume
relies on.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from opendino.data.synthetic import make_shapes_dataset
from opendino.log import MetricLogger, read_metrics
from opendino.models.hub import RUN_BACKBONE_FILE
from opendino.train.checkpoint import (
    NonFiniteStateError,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
STEPS = 14  # not a multiple of CHECKPOINT_EVERY: the end-of-run checkpoint is one of its own
CHECKPOINT_EVERY = 3
KEEP_LAST = 2
TIMING_KEYS = ("images_per_s", "data_wait")  # the only metrics allowed to differ between two runs

# A child that kills itself with SIGKILL inside the checkpoint write of step KILL_AT_CHECKPOINT: the model and
# optimiser files are in `.tmp-step_...`, the folder is never renamed into place.
KILL_AT_CHECKPOINT = 9
_KILL_IN_CHECKPOINT = f"""
import os, signal, sys
import opendino.train.checkpoint as ckpt

_save = ckpt.dcp.save

def save(state_dict, *, checkpoint_id, **kwargs):
    _save(state_dict, checkpoint_id=checkpoint_id, **kwargs)
    if str(checkpoint_id).endswith("step_{KILL_AT_CHECKPOINT:08d}"):
        os.kill(os.getpid(), signal.SIGKILL)

ckpt.dcp.save = save
from opendino.cli import main
sys.exit(main(sys.argv[1:]))
"""


# ----------------------------------------------------------------------------------------------- helpers
def _train_args(images: Path, out: Path, *, workers: int) -> list[str]:
    return [
        "train",
        "debug",
        f"data.source={images}",
        f"data.num_workers={workers}",
        f"run.output_dir={out}",
        f"run.max_steps={STEPS}",
        "run.log_every=1",
        f"run.checkpoint_every={CHECKPOINT_EVERY}",
        f"run.keep_last={KEEP_LAST}",
        "run.progress=none",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _start(args: list[str], log: Path, *, script: str | None = None) -> subprocess.Popen:
    """`python -m opendino ARGS` (or `python -c SCRIPT ARGS`) in a new session, output to `log`."""
    cmd = [sys.executable, *(["-c", script] if script else ["-m", "opendino"]), *args]
    with log.open("w") as f:
        return subprocess.Popen(
            cmd, cwd=log.parent, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        _kill_group(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the session of `proc` (the trainer and its DataLoader workers); wait until none is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path)] if path.exists() else []


def _kill_when_logged(proc: subprocess.Popen, run: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if step in _logged_steps(run):
            _kill_group(proc)
            assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill:\n{log.read_text()[-3000:]}"
            return
        assert proc.poll() is None, f"the run ended before step {step} was logged:\n{log.read_text()[-3000:]}"
        time.sleep(0.01)
    pytest.fail(f"step {step} never logged")


def _resumed_from(output: str) -> int:
    m = re.search(r"resumed from \S*step_(\d+) at step (\d+)", output)
    assert m, output[-3000:]
    assert int(m.group(1)) == int(m.group(2))
    return int(m.group(2))


def _checkpoint_tensors(folder: Path, scratch: Path) -> dict[str, object]:
    """Everything a checkpoint holds: model and optimiser (read back from DCP), random states, JSON extras."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = scratch / f"{folder.parent.parent.name}-{folder.name}.pt"
    dcp_to_torch_save(folder, flat)
    return {
        "dcp": torch.load(flat, weights_only=False),
        "rng": torch.load(folder / "rng" / "rank_0.pt", weights_only=False),
        # the DataLoader worker count is recorded (tar shards depend on it) but folders / lists do not: left out
        "state": {k: v for k, v in json.loads((folder / "state.json").read_text()).items() if k != "num_workers"},
    }


def _assert_equal(a: object, b: object, where: str = "") -> None:
    """Exact equality of nested dicts / lists / tensors (tensors: same dtype, shape and bits)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _tensorboard(run: Path, tag: str = "loss/total") -> list[tuple[int, float]]:
    """The (step, value) events of `tag` as TensorBoard shows them (events purged by a restart left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _assert_same_run(resumed: Path, reference: Path, scratch: Path) -> None:
    """`resumed` is the uninterrupted `reference` run bit for bit, and its folder is clean."""
    records = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # one record per step, nothing from the kill
    expected = read_metrics(reference / "metrics.jsonl")
    for got, want in zip(records, expected, strict=True):
        got, want = ({k: v for k, v in r.items() if k not in TIMING_KEYS} for r in (got, want))
        assert got == want, f"step {got['step']}"  # every loss term, schedule value and monitor, exactly
    assert _tensorboard(resumed) == _tensorboard(reference)
    assert [step for step, _ in _tensorboard(resumed)] == list(range(1, STEPS + 1))
    ours, theirs = load_file(resumed / RUN_BACKBONE_FILE), load_file(reference / RUN_BACKBONE_FILE)
    _assert_equal(ours, theirs, RUN_BACKBONE_FILE)
    steps = [s for s, _ in list_checkpoints(resumed)]
    assert steps == [s for s, _ in list_checkpoints(reference)] == [12, 14]  # keep_last=2
    _assert_equal(
        _checkpoint_tensors(find_latest(resumed), scratch), _checkpoint_tensors(find_latest(reference), scratch)
    )
    assert not list((resumed / "checkpoints").glob(".tmp-*"))
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert not list(resumed.glob("*.tmp*"))


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """In-process runs with one intra-op thread, as the subprocesses (OMP_NUM_THREADS=1): much faster on 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_shapes_dataset(root, n_per_class=4, size=32, seed=0)  # 40 images
    return root


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """The uninterrupted run, started in the background at once (it overlaps with the runs the tests kill)."""
    root = tmp_path_factory.mktemp("reference")
    out, log = root / "run", root / "train.log"
    proc = _start(_train_args(images, out, workers=2), log)

    def finished() -> Path:
        _finish(proc, log)
        return out

    yield finished
    _kill_group(proc)


# ----------------------------------------------------------------------------------------------- real kills
@pytest.mark.slow
def test_sigkill_at_a_random_step_then_restart_is_bit_identical(images, reference, tmp_path):
    kill_at = random.Random(20240607).randint(4, STEPS - 4)
    out, log = tmp_path / "run", tmp_path / "killed.log"
    args = _train_args(images, out, workers=2)
    _kill_when_logged(_start(args, log), out, kill_at, log)

    last = find_latest(out)
    assert last is not None
    finished_step = int(last.name.removeprefix("step_"))
    assert finished_step >= CHECKPOINT_EVERY and max(_logged_steps(out)) >= kill_at

    output = _finish(_start(args, tmp_path / "resumed.log"), tmp_path / "resumed.log")
    assert _resumed_from(output) == finished_step
    _assert_same_run(out, reference(), tmp_path)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_then_restart_is_bit_identical(images, reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "killed.log"
    args = _train_args(images, out, workers=0)
    proc = _start(args, log, script=_KILL_IN_CHECKPOINT)
    proc.wait(timeout=300)
    _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]

    ckpts = out / "checkpoints"
    torn = ckpts / f".tmp-step_{KILL_AT_CHECKPOINT:08d}"
    assert (torn / ".metadata").is_file() and not (torn / "state.json").exists()  # written, never renamed
    assert [s for s, _ in list_checkpoints(out)] == [3, 6]
    assert find_latest(out) == ckpts / "step_00000006"

    output = _finish(_start(args, tmp_path / "resumed.log"), tmp_path / "resumed.log")
    assert _resumed_from(output) == 6
    _assert_same_run(out, reference(), tmp_path)


# ----------------------------------------------------------------------------------------------- crash before export
def test_crash_between_final_checkpoint_and_backbone_export(images, tmp_path, monkeypatch, capsys):
    """The last checkpoint is written but the process dies before the backbone export: the restart has no step
    left to run and must still leave the finished run's backbone (and curves) behind."""
    import opendino
    from opendino.cli import load_train_config
    from opendino.models import hub
    from opendino.train.loop import build_optimizer_for, run_train
    from opendino.train.ssl import SSLModel

    out = tmp_path / "run"
    cfg = load_train_config("debug", [*_train_args(images, out, workers=0)[2:], "run.max_steps=2"])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "save_backbone_state", crash)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(out)] == [2] and not (out / RUN_BACKBONE_FILE).exists()

    summary = run_train(cfg)
    assert summary["steps"] == 2 and "nothing to do" in capsys.readouterr().out
    model = SSLModel(cfg)
    load_checkpoint(find_latest(out), model, build_optimizer_for(model, cfg))
    _assert_equal(opendino.load_backbone(out).state_dict(), model.teacher.backbone.state_dict())
    assert (out / "training.png").is_file()


# ----------------------------------------------------------------------------------------------- logger on restart
def test_restarted_logger_keeps_one_trajectory(tmp_path, monkeypatch):
    """What a killed run logged after its checkpoint disappears from metrics.jsonl and TensorBoard; so does all
    of it when it died before its first checkpoint."""
    from tensorboard.summary.writer import event_file_writer

    # TensorBoard orders event files by name: <seconds>.<host>.<pid>.<per-process counter>. A restart is a new process
    # in real use; here all writers share this one, and the counter must not pass 9 (".10" sorts before ".9").
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))
    first = MetricLogger(tmp_path, total_steps=6, progress="none")
    for step in range(1, 6):
        first.log(step, {"loss/total": float(step)})
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss/to')  # torn by the kill

    resumed = MetricLogger(tmp_path, total_steps=6, start_step=3, progress="none")
    for step in range(4, 7):
        resumed.log(step, {"loss/total": 10.0 * step})
    resumed.close()
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert [(r["step"], r["loss/total"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == expected
    assert _tensorboard(tmp_path) == expected

    fresh = MetricLogger(tmp_path, total_steps=6, start_step=0, progress="none")
    fresh.log(1, {"loss/total": 100.0})
    fresh.close()
    assert [(r["step"], r["loss/total"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 100.0)]
    assert _tensorboard(tmp_path) == [(1, 100.0)]


# ----------------------------------------------------------------------------------------------- checkpoint rules
def _tiny(by: str = "kind", lr_multipliers: tuple[float, float] = (1.0, 1.0)):
    """A small model and its AdamW after one step, with two parameter groups: weights / biases (`by="kind"`) or
    Linear / LayerNorm (`by="layer"`)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    named = list(model.named_parameters())
    first = [p for n, p in named if (n.endswith("weight") if by == "kind" else n.startswith("0."))]
    second = [p for n, p in named if not any(p is q for q in first)]
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr_multiplier": m} for ps, m in zip((first, second), lr_multipliers, strict=True)], lr=0.1
    )
    model(torch.randn(2, 4)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def test_checkpoint_round_trip_restores_model_optimiser_and_random_state(tmp_path):
    model, optimizer = _tiny()
    folder = save_checkpoint(tmp_path, 5, model, optimizer, {"bad_images": 2})
    expected_next = (torch.rand(3), random.random())
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_optim = {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()}

    other, other_optim = _tiny()  # different weights and moments
    extras = load_checkpoint(folder, other, other_optim)
    assert extras == {"bad_images": 2, "step": 5, "world_size": 1}
    _assert_equal(other.state_dict(), saved_model)
    _assert_equal(other_optim.state_dict()["state"], saved_optim)
    _assert_equal((torch.rand(3), random.random()), expected_next)


def test_resume_takes_moments_from_the_checkpoint_and_group_settings_from_the_config(tmp_path):
    model, optimizer = _tiny()
    folder = save_checkpoint(tmp_path, 1, model, optimizer, {})
    moments = {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()}

    other, regrouped = _tiny(by="layer")  # e.g. another optim.layerwise_decay: the groups hold other parameters
    with pytest.raises(ValueError, match=r"parameter groups differ.*config\.yaml"):
        load_checkpoint(folder, other, regrouped)

    other, same_groups = _tiny(lr_multipliers=(0.5, 2.0))  # e.g. another optim.patch_embed_lr_mult
    load_checkpoint(folder, other, same_groups)
    _assert_equal(same_groups.state_dict()["state"], moments)
    assert [g["lr_multiplier"] for g in same_groups.param_groups] == [0.5, 2.0]


def test_resume_with_another_model_is_a_clear_error(tmp_path):
    model, optimizer = _tiny()
    folder = save_checkpoint(tmp_path, 1, model, optimizer, {})
    wider = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5))
    with pytest.raises(ValueError, match=r"cannot resume from .*step_00000001: .*0\.weight.*config\.yaml") as e:
        load_checkpoint(folder, wider, torch.optim.AdamW(wider.parameters()))
    assert "Traceback" not in str(e.value)


def test_unfinished_checkpoints_are_ignored_and_cleaned_by_the_next_save(tmp_path):
    model, optimizer = _tiny()
    save_checkpoint(tmp_path, 3, model, optimizer, {})
    root = tmp_path / "checkpoints"
    # a write killed before the rename, and a folder without its state.json (written last): neither counts
    torn = root / ".tmp-step_00000006"
    save_checkpoint(tmp_path, 6, model, optimizer, {}).rename(torn)
    (torn / "state.json").unlink()
    no_state = save_checkpoint(tmp_path, 9, model, optimizer, {})
    (no_state / "state.json").unlink()
    assert find_latest(tmp_path) == root / "step_00000003"

    save_checkpoint(tmp_path, 12, model, optimizer, {}, keep_last=3)
    assert not torn.exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 12]
    assert find_latest(tmp_path) == root / "step_00000012"


def test_keep_last_and_saving_the_same_step_again(tmp_path):
    model, optimizer = _tiny()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, optimizer, {"n": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    folder = save_checkpoint(tmp_path, 4, model, optimizer, {"n": 40}, keep_last=2)  # a rerun of the last step
    assert json.loads((folder / "state.json").read_text())["n"] == 40
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]


def test_no_checkpoint_of_a_non_finite_model(tmp_path):
    model, optimizer = _tiny()
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"0\.weight"):
        save_checkpoint(tmp_path, 1, model, optimizer, {})
    assert not (tmp_path / "checkpoints").exists()
    assert find_latest(tmp_path) is None
