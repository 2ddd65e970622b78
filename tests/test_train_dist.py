"""`opendino train` on several processes (gloo on CPU): DDP and FSDP2 follow the one-process run, checkpoints reshard.

Real runs, as a user starts them: `torchrun --standalone --nproc_per_node=2 -m opendino train debug ...` against
`python -m opendino train debug ...` on one process with the same global batch (2 x B against 1 x 2B), the same seed
and the same images at every step (the sampler defines a step's images by the global batch alone). Stochastic depth
is off in every run: each process draws its drop-path subsets from its own random stream (seeded with the rank), so
two processes cannot drop the same samples as one process does, and no comparison would be possible.

What is compared: the per-step `loss/*` records of `metrics.jsonl` (`run.log_every=1`; with several processes each is
the mean over processes of the per-process losses), the exported teacher backbone, the checkpoints. The learning rate
is 0 at step 0 (warm-up), so steps 1 and 2 see the initial weights and later steps show the trajectory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opendino.data.synthetic import make_shapes_dataset
from opendino.log import read_metrics
from opendino.models.hub import RUN_BACKBONE_FILE, load_backbone
from opendino.train.checkpoint import list_checkpoints

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
SAVED_AT = 4  # the checkpoint the resharding tests resume from (run.checkpoint_every)
B = 4  # images per process with 2 processes; the one-process runs take 2 * B
TIMEOUT_S = 300  # one run takes 5-20 s on 2 busy cores; a hung collective must not hang the suite

COMMON = (
    f"run.max_steps={STEPS}",
    f"run.checkpoint_every={SAVED_AT}",
    "run.log_every=1",
    "run.progress=none",
    "run.tensorboard=false",
    "model.drop_path_rate=0",  # per-process random streams: see the module docstring
    "schedules.epoch_length=4",  # warm-up (1 epoch) over by step 4
    "schedules.freeze_last_layer_epochs=0",  # the heads' last layer trains from the start
    "optim.lr=0.002",  # ~6x the scaled base_lr: within 8 steps a wrong gradient shows clearly in the losses
)
TIGHT = ("ibot.loss_weight=0", "koleo.loss_weight=0")
SINKHORN = ("teacher.centering=sinkhorn_knopp",)
FSDP = ("run.parallel=fsdp",)
AC = ("run.activation_checkpointing=true",)

# name: (processes, overrides). Runs are made once per module, when a test first asks for them.
RUNS: dict[str, tuple[int, tuple[str, ...]]] = {
    "ddp": (2, TIGHT),
    "one": (1, TIGHT),
    "fsdp": (2, TIGHT + FSDP + AC),
    "fsdp-all": (2, SINKHORN + FSDP + ("model.block_chunks=2",)),  # chunks: the key layout of the ViT-L/g presets
    "ddp-sinkhorn": (2, TIGHT + SINKHORN),
    "one-sinkhorn": (1, TIGHT + SINKHORN),
    "ddp-all": (2, ()),
    "one-all": (1, ()),
    "ddp-all-sinkhorn": (2, SINKHORN),
    "one-all-sinkhorn": (1, SINKHORN),
}

# DDP / FSDP2 on 2 processes against 1 process with every loss term identical in definition: the only difference is
# float summation order (two half-batch gradients averaged by the all-reduce against one full-batch gradient; the
# centre and Sinkhorn-Knopp sums all-reduced over halves). Measured: at most 6e-7 relative over 8 steps, for every
# run compared here (DDP, FSDP2, resharded resumes). DDP without its gradient all-reduce: 1.5e-4.
TIGHT_RTOL = 1e-5
LOSS_KEYS = ("loss/total", "loss/dino_global", "loss/dino_local")

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------- helpers
def _train(run_dir: Path, processes: int, overrides: tuple[str, ...], images: Path) -> str:
    """Run `opendino train debug` (through torchrun when `processes` > 1) to the end; returns its output."""
    launcher = ["-m", "opendino"]
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *launcher]
    batch = 2 * B // processes
    args = ["train", "debug", f"data.source={images}", f"run.output_dir={run_dir}", f"data.batch_size_per_gpu={batch}"]
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, *launcher, *args, *COMMON, *overrides]
    proc = subprocess.Popen(
        cmd,
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # torchrun and its workers in one group, killed together on a timeout
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {TIMEOUT_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


def _losses(run_dir: Path, key: str) -> list[float]:
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r[key] for r in records]


def _max_rel_diff(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(((ta - tb).abs() / tb.abs().clamp(min=1e-12)).max())


def _assert_same_trajectory(run: Path, reference: Path, keys: tuple[str, ...] = LOSS_KEYS) -> None:
    for key in keys:
        got, want = _losses(run, key), _losses(reference, key)
        assert _max_rel_diff(got, want) < TIGHT_RTOL, f"{key}: {got} != {want}"


def _summaries(output: str) -> list[dict]:
    """The run summaries printed as JSON by `opendino train` (one per run, from the main process only)."""
    return [json.loads(m) for m in re.findall(r"^\{\n.*?^\}$", output, flags=re.M | re.S)]


def _checkpoint(run_dir: Path, scratch: Path, step: int = STEPS) -> dict:
    """{"model": ..., "optim": ...} of the DCP checkpoint of `step`, read back in this (single, group-less) process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = scratch / f"{run_dir.name}-{step}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step_{step:08d}", flat)
    state = torch.load(flat, weights_only=True)
    # blocks.<chunk>.<i>.* (model.block_chunks > 0) -> blocks.<i>.*, to compare with an unchunked run
    state["model"] = {_unchunk(k): v for k, v in state["model"].items()}
    state["optim"]["state"] = {_unchunk(k): v for k, v in state["optim"]["state"].items()}
    return state


def _unchunk(key: str) -> str:
    return re.sub(r"\.blocks\.\d+\.(\d+)\.", r".blocks.\1.", key)


def _assert_same_state(run: Path, reference: Path, scratch: Path, *, atol: float = 1e-5) -> None:
    """The final checkpoints hold the same model (student, teacher, centres) and AdamW moments, up to float noise.

    Measured: weights within 7e-7 in the runs without iBOT and KoLeo (DDP, FSDP2, resharded resumes), within 2.2e-5
    with every loss on. Most of that is AdamW amplifying noise: the attention key bias gets no gradient (softmax
    ignores a shift of the logits that is the same for every key), so its gradient is float noise (~1e-11) that
    AdamW, dividing by its square root, turns into steps of up to the learning rate. For comparison, DDP without its
    gradient all-reduce leaves the weights 3e-3 off after 8 steps. AdamW moments (first, and the root of the second)
    agree within 4e-5 of each tensor's largest value; fresh moments at a resume are 100% off.
    """
    got, want = _checkpoint(run, scratch), _checkpoint(reference, scratch)
    assert got["model"].keys() == want["model"].keys()
    for k, v in want["model"].items():
        torch.testing.assert_close(got["model"][k], v, rtol=0, atol=atol, msg=k)
    assert got["optim"]["state"].keys() == want["optim"]["state"].keys()
    for name, moments in want["optim"]["state"].items():
        ours = got["optim"]["state"][name]
        for x, y in ((ours["exp_avg"], moments["exp_avg"]), (ours["exp_avg_sq"].sqrt(), moments["exp_avg_sq"].sqrt())):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-3 * float(y.abs().max()) + 1e-9, msg=name)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_shapes_dataset(root, n_per_class=8, size=32, seed=0)  # 80 images; 8 steps x 8 images need 64
    return root


class _Runs:
    """`runs(name)`: the folder of the finished run `RUNS[name]`, trained on first use; `runs.output(folder)`: what it
    printed."""

    def __init__(self, root: Path, images: Path) -> None:
        self.root, self.images = root, images
        self._outputs: dict[Path, str] = {}

    def __call__(self, name: str) -> Path:
        folder = self.root / name
        if folder not in self._outputs:
            processes, overrides = RUNS[name]
            self._outputs[folder] = _train(folder, processes, overrides, self.images)
        return folder

    def output(self, folder: Path) -> str:
        return self._outputs[folder]


@pytest.fixture(scope="module")
def run(tmp_path_factory, images) -> _Runs:
    return _Runs(tmp_path_factory.mktemp("runs"), images)


# ----------------------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("centering", ["", "-sinkhorn"], ids=["centering", "sinkhorn_knopp"])
def test_ddp_follows_the_one_process_run(run, centering, tmp_path):
    """2 processes x B (DDP) and 1 process x 2B: the same loss at every step, up to float summation order.

    iBOT and KoLeo are off here: both depend on how the global batch is split (see the next test), DINO does not. The
    per-process DINO losses are means over each half-batch, DDP averages the two half-batch gradients, the softmax
    centre (or the Sinkhorn-Knopp normalisation) is all-reduced over the halves: the definition of every term is
    that of the full batch, only the order of float sums differs.
    """
    ddp, one = run(f"ddp{centering}"), run(f"one{centering}")
    _assert_same_trajectory(ddp, one)
    _assert_same_state(ddp, one, tmp_path)
    before, after = (_checkpoint(one, tmp_path, step)["model"] for step in (SAVED_AT, STEPS))
    moved = max(float((after[k] - before[k]).abs().max()) for k in after if k.startswith("student."))
    assert moved > 100 * 1e-5  # steps 5-8 move the weights far beyond the tolerance (measured: 7.7e-3)
    assert len(_summaries(run.output(ddp))) == 1  # printed by the main process only
    assert json.loads((ddp / "checkpoints" / f"step_{STEPS:08d}" / "state.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("centering", ["", "-sinkhorn"], ids=["centering", "sinkhorn_knopp"])
def test_ddp_with_every_loss_stays_close_to_the_one_process_run(run, centering):
    """Every loss on (iBOT with masks, KoLeo): the same images, but terms that depend on how the batch is split.

    Not equal by design, as in the official code: each process's collate draws the iBOT masks of its own half-batch
    (from its first sample's seed), so the masked crops and patches differ from the one-process masks; KoLeo takes
    each feature's nearest neighbour within the process's batch (4 images instead of 8: farther neighbours); the
    iBOT centre is the mean over processes of each process's masked-token mean. The student's global crops are
    masked, so the DINO terms drift apart slowly too. Measured over the 8 steps, largest per-step relative
    difference: DINO terms 2.6% (centering) and 0.2% (Sinkhorn-Knopp), total 7%, iBOT 15%, KoLeo 12%; of the means
    over the steps: iBOT 2.5%, KoLeo 5.3%. The tolerances are about twice those (means for iBOT and KoLeo).
    """
    ddp, one = run(f"ddp-all{centering}"), run(f"one-all{centering}")
    for key in ("loss/dino_global", "loss/dino_local"):
        assert _max_rel_diff(_losses(ddp, key), _losses(one, key)) < 0.06, key
    assert _max_rel_diff(_losses(ddp, "loss/total"), _losses(one, "loss/total")) < 0.15
    for key in ("loss/ibot", "loss/koleo"):
        got, want = torch.tensor(_losses(ddp, key)), torch.tensor(_losses(one, key))
        assert torch.isfinite(got).all() and got.min() > 0, key
        assert abs(got.mean() - want.mean()) < 0.12 * want.mean(), f"{key}: {got} vs {want}"


# ----------------------------------------------------------------------------------------------- FSDP2
def test_fsdp2_on_gloo_follows_ddp_and_exports_the_teacher(run, tmp_path):
    """FSDP2 (`fully_shard` of every block and part, student and teacher) with activation checkpointing on 2 CPU
    processes: the DDP losses, the one-process weights, a checkpoint with one shard per process, and a teacher
    backbone that `load_backbone(run_dir)` reads back as the checkpoint's teacher. The teacher runs no backward:
    its parts must reshard after forward, or the EMA update pairs full teacher tensors with student shards (the
    bug this test found)."""
    fsdp, ddp = run("fsdp"), run("ddp")
    for key in LOSS_KEYS:
        assert all(torch.isfinite(torch.tensor(_losses(fsdp, key))))
    _assert_same_trajectory(fsdp, ddp)
    _assert_same_state(fsdp, run("one"), tmp_path)
    assert [s for s, _ in list_checkpoints(fsdp)] == [SAVED_AT, STEPS]
    last = fsdp / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard each
    assert sorted(p.name for p in (last / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]

    model = _checkpoint(fsdp, tmp_path)["model"]
    prefix = "teacher.backbone."
    teacher = {k.removeprefix(prefix): v for k, v in model.items() if k.startswith(prefix)}
    exported = load_backbone(fsdp).state_dict()
    assert exported.keys() == teacher.keys()
    for k, v in exported.items():
        assert torch.equal(v, teacher[k]), k  # the export is the checkpoint's teacher, unsharded, bit for bit
    student = {k.removeprefix("student.backbone."): v for k, v in model.items() if k.startswith("student.backbone.")}
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)  # EMA: the teacher lags the student

    ddp_teacher = load_file(ddp / RUN_BACKBONE_FILE)
    for k, v in load_file(fsdp / RUN_BACKBONE_FILE).items():
        torch.testing.assert_close(v, ddp_teacher[k], rtol=1e-4, atol=1e-6, msg=k)  # measured: 7.5e-9


def test_fsdp2_with_every_loss_and_chunked_blocks_equals_ddp(run, tmp_path):
    """FSDP2 against DDP, both on 2 processes, with every loss on and Sinkhorn-Knopp: the same per-process batches
    and masks, so every term (iBOT and KoLeo included) must agree up to float summation order. Blocks in chunks
    (`model.block_chunks=2`): FSDP2 shards the blocks inside the chunks."""
    fsdp, ddp = run("fsdp-all"), run("ddp-all-sinkhorn")
    _assert_same_trajectory(fsdp, ddp, (*LOSS_KEYS, "loss/ibot", "loss/koleo"))
    _assert_same_state(fsdp, ddp, tmp_path, atol=1e-4)
    ours, theirs = load_file(fsdp / RUN_BACKBONE_FILE), load_file(ddp / RUN_BACKBONE_FILE)
    assert ours.keys() == theirs.keys()  # exported in the official layout whatever the chunking
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------------------------- resharding
@pytest.mark.parametrize(
    ("source", "processes", "overrides"),
    [("ddp", 1, TIGHT), ("one", 2, TIGHT), ("fsdp", 1, RUNS["fsdp"][1]), ("one", 2, TIGHT + FSDP)],
    ids=["ddp-2-to-1", "ddp-1-to-2", "fsdp-2-to-1", "fsdp-1-to-2"],
)
def test_resume_on_another_number_of_processes(run, images, tmp_path, source, processes, overrides):
    """A checkpoint saved at step 4 by N processes resumes on M != N (same global batch) and continues as the
    uninterrupted run: step 5's loss checks model, teacher and centres; steps 6-8 the optimiser moments too (with
    fresh AdamW moments the first update alone puts step 6 12% off). DCP reshards by fully qualified names; a process
    count other than at save time reseeds the random streams (none is drawn from here: no stochastic depth)."""
    reference = run(source)
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:08d}")  # as if the run had stopped after step 4

    output = _train(resumed, processes, overrides, images)
    m = re.search(r"resumed from \S*step_(\d+) at step (\d+)", output)
    assert m and int(m.group(1)) == int(m.group(2)) == SAVED_AT, output[-3000:]
    saved_with = RUNS[source][0]
    assert f"resuming a run saved with {saved_with} processes on {processes}" in output
    assert [s["steps"] for s in _summaries(output)] == [STEPS]

    _assert_same_trajectory(resumed, reference)  # steps 1-4 kept from before the stop, 5-8 trained now
    _assert_same_state(resumed, reference, tmp_path)
    state = json.loads((resumed / "checkpoints" / f"step_{STEPS:08d}" / "state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == processes
    assert len(list((resumed / "checkpoints" / f"step_{STEPS:08d}").glob("*.distcp"))) == processes
    ours, theirs = load_file(resumed / RUN_BACKBONE_FILE), load_file(reference / RUN_BACKBONE_FILE)
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], rtol=1e-4, atol=1e-6, msg=k)
