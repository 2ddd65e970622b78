"""Checkpoints that hold the whole training state, written atomically, readable with any number of processes.

Layout of `RUN_DIR/checkpoints/`:

    step_00001250/            one finished checkpoint (a torch.distributed.checkpoint folder)
        .metadata, *.distcp   model (student, teacher, heads, centres) and optimiser state, sharded or not
        rng/rank_<r>.pt       every random state of process r (torch CPU / CUDA, Python `random`)
        state.json            step, counters, grad-scaler state, world size, ... (written last)
    .tmp-step_00002500/       a checkpoint being written: ignored, removed by the next save

A checkpoint is written into a `.tmp-` folder and renamed into place by the main process once every process has
finished, so a reader (or a resumed run) never sees a half-written one; the oldest finished ones beyond `keep_last`
are deleted afterwards. Model and optimiser go through `torch.distributed.checkpoint` with fully qualified names
(`get_state_dict` / `set_state_dict`), so a run saved with 2 processes (DDP or FSDP2) resumes with 1 and vice versa.
Random states are per process: a resume with the same number of processes is bit-exact; with another number,
processes without a saved state are reseeded from the run seed and the step (documented, not exact).
A checkpoint is never written with non-finite parameters. It resumes only into the same model and optimiser parameter
groups (anything else is a ValueError saying what differs); the groups' settings (learning-rate and
weight-decay multipliers, betas) come from the resuming configuration, the moments from the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from opendino import dist

__all__ = [
    "CHECKPOINT_DIR",
    "NonFiniteStateError",
    "find_latest",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_STATE_FILE = "state.json"


class NonFiniteStateError(RuntimeError):
    """The model holds NaN or infinite values: the state is not worth saving."""


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Finished checkpoints of a run as (step, folder), oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / _STATE_FILE).is_file() and (p / ".metadata").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest finished checkpoint folder of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ------------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Every random state this process draws from: torch CPU, the current CUDA device, Python `random`."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------------- save
@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group (every save and load of a one-process run)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _first_non_finite(model: nn.Module) -> str | None:
    """The name of the first tensor of `model` (this process's shard) holding NaN or infinity, or None."""
    for name, tensor in model.state_dict().items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if torch.is_floating_point(local) and not bool(torch.isfinite(local).all()):
            return name
    return None


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    *,
    keep_last: int = 3,
) -> Path:
    """Write the checkpoint of `step` (collective: every process calls it); returns its folder.

    `state` holds JSON-able extras (counters, grad-scaler state, ...) and is written by the main process.
    """
    bad = _first_non_finite(model)
    device = next(model.parameters()).device  # NCCL reduces CUDA tensors only
    if dist.all_reduce(torch.tensor(float(bad is None), device=device), op="min").item() == 0:
        where = f" ({bad} on this process)" if bad else " (on another process)"
        raise NonFiniteStateError(f"step {step}: the model holds NaN or infinite values{where}; no checkpoint written")
    root = Path(run_dir) / CHECKPOINT_DIR
    final = _step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if dist.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / "rng" / f"rank_{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        extras = {**state, "step": step, "world_size": dist.world_size()}
        (tmp / _STATE_FILE).write_text(json.dumps(extras, indent=1))
        _fsync_tree(tmp)  # on disk before it becomes visible: safe against power loss, not only against kills
        if final.exists():  # the same step saved again (e.g. a rerun that resumed from it): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------------------- load
def _reason(e: BaseException) -> str:
    """The message of `e`, or of the first failing process's exception inside a DCP CheckpointException."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return str(e).strip().rstrip(".")


def _does_not_fit(folder: Path, reason: str) -> ValueError:
    return ValueError(
        f"cannot resume from {folder}: {reason}. A run resumes only with the model and optimiser settings it was "
        f"written with ({folder.parent.parent / 'config.yaml'}); for other settings use a new run.output_dir"
    )


def load_checkpoint(
    folder: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Load model, optimiser and random states in place (collective); returns the JSON extras (with `step`)."""
    folder = Path(folder)
    extras = json.loads((folder / _STATE_FILE).read_text())
    # Materialise the optimiser state so that every key exists to be loaded into (get_state_dict does it).
    model_sd, optim_sd = get_state_dict(model, optimizer)
    groups = copy.deepcopy(cast(list[dict[str, Any]], optim_sd["param_groups"]))
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(folder))
    except (ValueError, RuntimeError, KeyError, CheckpointException) as e:
        raise _does_not_fit(folder, _reason(e)) from e
    if [g["params"] for g in state["optim"]["param_groups"]] != [g["params"] for g in groups]:
        raise _does_not_fit(folder, "the optimiser's parameter groups differ")
    # Moments and step counts come from the checkpoint; group settings (learning-rate and weight-decay multipliers,
    # betas) from this configuration, as written in config.yaml.
    state["optim"]["param_groups"] = groups
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=True),
    )
    rng_file = folder / "rng" / f"rank_{dist.rank()}.pt"
    if rng_file.is_file() and extras.get("world_size") == dist.world_size():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        # Another process count than at save time: no saved state is this process's own. Reseed deterministically.
        torch.manual_seed(seed + 1_000_003 * int(extras["step"]) + dist.rank())
        random.seed(seed + 1_000_003 * int(extras["step"]) + dist.rank())
    return extras
