"""`opendino train`: build -> resume -> step loop -> checkpoint, the same code on one CPU, one GPU and `torchrun`.

    run_train(cfg)
      check the data source (before any work)          -> ConfigError naming the key
      process group from torchrun's environment (or none), device, precision
      SSLModel (student, EMA teacher), parallelize (AC -> compile -> FSDP2 / DDP), AdamW groups, schedules
      resume from RUN_DIR/checkpoints (model, optimiser, step, counters, random states; data position = step)
      loop: batch -> schedules -> teacher targets -> student outputs -> losses -> skip if non-finite
            -> backward -> clip -> step -> EMA -> log / collapse monitors / kNN -> checkpoint + backbone export

The loop is written so that a run killed at any point and restarted with the same command continues exactly as the
uninterrupted run would have (tests/test_train_resume.py kills one with SIGKILL).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from opendino import dist
from opendino.config import ConfigError, TrainConfig, dump_yaml, global_batch_size, run_iterations, total_iterations
from opendino.log import MetricLogger
from opendino.train.checkpoint import find_latest, load_checkpoint, save_checkpoint
from opendino.train.monitor import CollapseMonitor, collapse_stats
from opendino.train.parallel import parallelize
from opendino.train.schedules import apply_schedules, build_optimizer, build_schedules, param_groups
from opendino.train.ssl import SSLModel

__all__ = ["NonFiniteLossError", "TrainState", "run_train", "train_step"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN or infinite loss: the run stops (its last checkpoint is intact)."""

    exit_code = 3  # `opendino train` prints the message and exits with this code


class TrainState:
    """Counters that live in the checkpoint beside the tensors."""

    def __init__(self) -> None:
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.bad_images = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "nonfinite_total": self.nonfinite_total,
            "bad_images": self.bad_images,
        }

    def load(self, extras: dict[str, Any]) -> None:
        self.step = int(extras["step"])
        self.nonfinite_in_a_row = int(extras.get("nonfinite_in_a_row", 0))
        self.nonfinite_total = int(extras.get("nonfinite_total", 0))
        self.bad_images = int(extras.get("bad_images", 0))


# --------------------------------------------------------------------------------------------------- setup
def _precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype (None: fp32). CPU always runs fp32: autocast there is slow and changes numerics."""
    p = cfg.run.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    if device.type != "cuda" and p != "fp32":
        raise ConfigError(f"run.precision={cfg.run.precision}: mixed precision needs a GPU; use fp32 (or auto) on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[p]


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device={name!r}: no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", dist.local_rank())
    return device


def _check_source(cfg: TrainConfig) -> None:
    from opendino.data.pipeline import check_source

    if not cfg.data.source:
        raise ConfigError("data.source is empty: give an image folder, a list / manifest file or a tar shards glob")
    try:
        check_source(cfg.data)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.source={cfg.data.source!r}: {e}") from None


def _load_pretrained(model: SSLModel, source: str) -> None:
    """Student and teacher backbones from a checkpoint (continued pretraining); the heads stay as initialised."""
    from opendino.models.hub import load_backbone_state

    state, _ = load_backbone_state(source)  # official layout, flat `blocks.<i>.*`
    for side in (model.student, model.teacher):
        target = side.backbone
        if target.chunked_blocks:  # blocks.<i>.* -> blocks.<chunk>.<i>.*
            size = target.n_blocks // len(target.blocks)
            state = {_chunk_key(k, size): v for k, v in state.items()}
        missing, unexpected = target.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"model.pretrained_weights={source!r} does not fit model.* (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})"
            )


def _chunk_key(key: str, size: int) -> str:
    parts = key.split(".")
    if parts[0] == "blocks" and parts[1].isdigit() and not (len(parts) > 2 and parts[2].isdigit()):
        return ".".join(["blocks", str(int(parts[1]) // size), *parts[1:]])
    return key


# --------------------------------------------------------------------------------------------------- one step
def train_step(
    model: SSLModel,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    values: dict[str, float],
    *,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    clip_grad: float,
) -> tuple[dict[str, torch.Tensor], bool, Any, Any]:
    """One optimisation step; returns (losses, finite, targets, student outputs). A non-finite loss (on any process)
    skips the update: no gradient step, no EMA, the softmax centres restored."""
    device_type = batch.global_crops.device.type
    autocast = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    centres = (model.dino_center.center.clone(), model.ibot_center.center.clone())
    with autocast:
        targets = model.teacher_targets(batch, values["teacher_temp"])
        student = model.student_outputs(batch)
        losses = model.compute_losses(student, targets, batch)
    total = losses["total"]
    flag = torch.isfinite(total.detach()).float()
    finite = bool(dist.all_reduce(flag, op="min").item())
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        model.dino_center.center.copy_(centres[0])
        model.ibot_center.center.copy_(centres[1])
        return losses, False, targets, student
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if clip_grad > 0:
        for part in model.student_parts().values():  # official: clipped per student submodule
            torch.nn.utils.clip_grad_norm_(part.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_teacher(values["momentum"])
    return losses, True, targets, student


# --------------------------------------------------------------------------------------------------- the run
def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) the run of `cfg`; returns a summary (steps, losses, throughput, output paths)."""
    _check_source(cfg)
    if not cfg.run.resume and find_latest(cfg.run.output_dir) is not None:
        raise ConfigError(
            f"run.resume=false, but run.output_dir={cfg.run.output_dir!r} holds the checkpoints of an earlier run: "
            "delete them or choose another output_dir"
        )
    device = _pick_device(cfg.run.device)
    amp_dtype = _precision(cfg, device)
    dist.init_distributed(device)
    # On an error the process group is left to the launcher: tearing it down while peers are still in a collective
    # can deadlock them. After a normal end, every process waits for the others, then destroys it.
    summary = _run(cfg, device, amp_dtype)
    dist.cleanup()
    return summary


def _run(cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, Any]:
    from opendino.data.pipeline import build_train_loader, source_kind

    rank, world = dist.rank(), dist.world_size()
    run_dir = Path(cfg.run.output_dir)
    # Same seed on every process for the initial weights, then a per-process stream for stochastic depth.
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    model = SSLModel(cfg)
    if cfg.model.pretrained_weights:
        _load_pretrained(model, cfg.model.pretrained_weights)
    model.to(device)
    parallelize(
        model,
        parallel=cfg.run.parallel,
        compile=cfg.run.compile,
        activation_checkpointing=cfg.run.activation_checkpointing,
        param_dtype=amp_dtype,
    )
    optimizer = build_optimizer_for(model, cfg)
    schedules = build_schedules_for(cfg, world)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    state = TrainState()
    latest = find_latest(run_dir) if cfg.run.resume else None
    if latest is not None:
        extras = load_checkpoint(latest, model, optimizer, seed=cfg.run.seed)
        state.load(extras)
        if scaler is not None and "scaler" in extras:
            scaler.load_state_dict(extras["scaler"])
        if extras.get("world_size") != world:
            dist.print0(f"resuming a run saved with {extras.get('world_size')} processes on {world}")
        saved_workers = extras.get("num_workers", cfg.data.num_workers)
        if source_kind(cfg.data) == "shards" and (
            extras.get("world_size") != world or saved_workers != cfg.data.num_workers
        ):
            dist.print0(
                f"warning: tar shards are split by process and DataLoader worker; the run was saved with "
                f"{extras.get('world_size')} x {saved_workers} readers and resumes with {world} x "
                f"{cfg.data.num_workers}, so the images from here on differ from an uninterrupted run"
            )
    else:
        torch.manual_seed(cfg.run.seed + 1 + rank)
        random.seed(cfg.run.seed + 1 + rank)

    # Written once the checkpoint loaded: a restart with settings that do not fit keeps the run's config.yaml.
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        header = f"Resolved configuration of this run (opendino train); world size {world}.\n{' '.join(sys.argv)}"
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(dump_yaml(cfg, header))
        tmp.replace(run_dir / "config.yaml")
    dist.barrier()

    end = run_iterations(cfg)
    logger = MetricLogger(
        run_dir, total_steps=end, start_step=state.step, tensorboard=cfg.run.tensorboard, progress=cfg.run.progress
    )
    if latest is not None:
        logger.message(f"resumed from {latest} at step {state.step}")
    if state.step >= end:
        logger.message(f"nothing to do: the run is at step {state.step} of {end}")
        logger.close()
        # The process may have died after its last checkpoint, before the backbone export or the plot.
        _export_backbone(run_dir, model)
        if dist.is_main():
            from opendino.train.plot import plot_run

            plot_run(run_dir)
        return _summary(cfg, state, run_dir, {}, 0.0)

    loader = build_train_loader(
        cfg,
        start_step=state.step,
        rank=rank,
        world_size=world,
        pin_memory=cfg.data.pin_memory and device.type == "cuda",
    )
    monitor = CollapseMonitor()
    gbatch = global_batch_size(cfg, world)
    window: dict[str, float] = {}
    n_window = 0
    t_data = t_window = 0.0
    t_last = time.perf_counter()
    last_losses: dict[str, float] = {}
    images_per_s = 0.0
    it: Iterator = iter(loader)
    model.train()
    try:
        for step in range(state.step, end):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            state.bad_images += len(batch.bad_images)
            for where, reason in batch.bad_images:
                logger.message(f"skipped unreadable image {where}: {reason}")
            batch = batch.to(device, non_blocking=True)
            values = schedules.at(step)
            apply_schedules(optimizer, values)
            losses, finite, targets, student = train_step(
                model, batch, optimizer, values, amp_dtype=amp_dtype, scaler=scaler, clip_grad=cfg.optim.clip_grad
            )
            if not finite:
                state.nonfinite_in_a_row += 1
                state.nonfinite_total += 1
                logger.message(
                    f"step {step}: non-finite loss ({_fmt_losses(losses)}); update skipped "
                    f"({state.nonfinite_in_a_row} in a row, at most {cfg.run.max_nonfinite_steps})"
                )
                if state.nonfinite_in_a_row >= cfg.run.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{state.nonfinite_in_a_row} consecutive steps with a non-finite loss (last at step {step}). "
                        "The last checkpoint is intact. Try a lower learning rate (optim.base_lr), stronger "
                        "clipping (optim.clip_grad), run.precision=bf16 instead of fp16, or check the images."
                    )
            else:
                state.nonfinite_in_a_row = 0
            state.step = step + 1
            t2 = time.perf_counter()
            t_data += t1 - t0
            t_window += t2 - t0
            n_window += 1
            for k, v in losses.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            if state.step % cfg.run.log_every == 0 or state.step == end:
                means = {f"loss/{k}": v / n_window for k, v in window.items()}
                reduced = _reduce_means(means, device)
                elapsed = time.perf_counter() - t_last
                images_per_s = n_window * gbatch / max(elapsed, 1e-9)
                record: dict[str, Any] = {
                    **reduced,
                    "epoch": state.step / cfg.schedules.epoch_length,
                    "lr": values["lr"],
                    "wd": values["wd"],
                    "momentum": values["momentum"],
                    "teacher_temp": values["teacher_temp"],
                    "last_layer_lr": values["last_layer_lr"],
                    "images_per_s": images_per_s,
                    "data_wait": t_data / max(t_window, 1e-9),
                    "nonfinite_total": state.nonfinite_total,
                    "bad_images": state.bad_images,
                }
                if finite:
                    teacher_cls = _teacher_cls(model, batch)
                    stats = collapse_stats(targets.dino, student.global_cls.detach(), teacher_cls)
                    record.update(stats)
                    # Warnings only after the learning-rate warm-up: at initialisation (LayerScale 1e-5) every image
                    # has nearly the same feature and the targets are flat, which is the start, not a collapse.
                    if state.step >= cfg.schedules.warmup_epochs * cfg.schedules.epoch_length:
                        for warning in monitor.check(stats):
                            logger.message(f"step {state.step}: {warning}")
                if device.type == "cuda":
                    record["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                logger.log(state.step, record)
                last_losses = {k.removeprefix("loss/"): v for k, v in reduced.items()}
                logger.progress(
                    state.step, _progress_line(state.step, cfg, last_losses, values, images_per_s, record["data_wait"])
                )
                window, n_window, t_data, t_window = {}, 0, 0.0, 0.0
                t_last = time.perf_counter()
            knn_due = cfg.run.knn_train and (
                (cfg.run.knn_every and state.step % cfg.run.knn_every == 0) or state.step == end
            )
            if knn_due:
                acc = _knn(cfg, model, device)
                logger.log(state.step, {f"knn/top1_k{k}": v for k, v in acc.items()})
                logger.message(f"step {state.step}: kNN top-1 " + ", ".join(f"k={k}: {v:.4f}" for k, v in acc.items()))
            if state.step % cfg.run.checkpoint_every == 0 or state.step == end:
                _checkpoint(cfg, run_dir, model, optimizer, state, scaler)
    finally:
        logger.close()
        del it
    if dist.is_main():
        from opendino.train.plot import plot_run

        plot_run(run_dir)
    return _summary(cfg, state, run_dir, last_losses, images_per_s)


def build_optimizer_for(model: SSLModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the student parts with the official parameter groups of `cfg.optim`."""
    groups = param_groups(
        model.student_parts(),
        layerwise_decay=cfg.optim.layerwise_decay,
        patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
    )
    return build_optimizer(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))


def build_schedules_for(cfg: TrainConfig, world_size: int):
    """The five official schedules of `cfg` (learning rate scaled for the global batch)."""
    from opendino.config import scaled_lr

    s = cfg.schedules
    return build_schedules(
        lr=scaled_lr(cfg, world_size),
        min_lr=cfg.optim.min_lr,
        epochs=s.epochs,
        warmup_epochs=s.warmup_epochs,
        weight_decay=cfg.optim.weight_decay,
        weight_decay_end=cfg.optim.weight_decay_end,
        momentum_teacher=cfg.teacher.momentum_teacher,
        final_momentum_teacher=cfg.teacher.final_momentum_teacher,
        warmup_teacher_temp=cfg.teacher.warmup_teacher_temp,
        teacher_temp=cfg.teacher.teacher_temp,
        warmup_teacher_temp_epochs=s.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=s.freeze_last_layer_epochs,
        epoch_length=s.epoch_length,
    )


@torch.no_grad()
def _teacher_cls(model: SSLModel, batch: Any) -> torch.Tensor:
    return model.teacher.backbone(batch.global_crops, is_training=True)["x_norm_clstoken"]


def _reduce_means(means: dict[str, float], device: torch.device) -> dict[str, float]:
    if dist.world_size() == 1:
        return means
    keys = sorted(means)
    t = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op="mean")
    return dict(zip(keys, t.tolist(), strict=True))


def _fmt_losses(losses: dict[str, Any]) -> str:
    return ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in losses.items())


def _progress_line(
    step: int,
    cfg: TrainConfig,
    losses: dict[str, float],
    values: dict[str, float],
    images_per_s: float,
    data_wait: float,
) -> str:
    epoch = step / cfg.schedules.epoch_length
    parts = [f"ep {epoch:.2f}", f"loss {losses.get('total', math.nan):.4f}"]
    parts += [f"{k} {losses[k]:.3f}" for k in ("dino_global", "dino_local", "ibot", "koleo") if k in losses]
    parts += [f"lr {values['lr']:.2e}", f"{images_per_s:.1f} img/s", f"data {100 * data_wait:.0f}%"]
    return " | ".join(parts)


def _checkpoint(cfg: TrainConfig, run_dir: Path, model: SSLModel, optimizer, state: TrainState, scaler) -> None:
    extras: dict[str, Any] = {**state.to_dict(), "num_workers": cfg.data.num_workers}
    if scaler is not None:
        extras["scaler"] = scaler.state_dict()
    save_checkpoint(run_dir, state.step, model, optimizer, extras, keep_last=cfg.run.keep_last)
    _export_backbone(run_dir, model)


def _export_backbone(run_dir: Path, model: SSLModel) -> None:
    """The teacher backbone in the official layout, for every downstream command (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model.teacher.backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.is_main():
        from opendino.models.hub import RUN_BACKBONE_FILE, save_backbone_state

        save_backbone_state(full, model.teacher.backbone.arch, run_dir / RUN_BACKBONE_FILE)  # type: ignore[arg-type]
    dist.barrier()


def _knn(cfg: TrainConfig, model: SSLModel, device: torch.device) -> dict[int, float]:
    from opendino.eval.knn import knn_eval_folders

    backbone = model.teacher.backbone
    was_training = backbone.training
    backbone.eval()
    try:
        return knn_eval_folders(
            backbone,
            cfg.run.knn_train,
            cfg.run.knn_val,
            size=cfg.run.knn_size,
            device=device,
            num_workers=min(cfg.data.num_workers, 4),
        )
    finally:
        backbone.train(was_training)


def _summary(cfg: TrainConfig, state: TrainState, run_dir: Path, losses: dict[str, float], ips: float) -> dict:
    return {
        "run_dir": str(run_dir),
        "steps": state.step,
        "schedule_steps": total_iterations(cfg),
        "losses": losses,
        "images_per_s": ips,
        "nonfinite_total": state.nonfinite_total,
        "bad_images": state.bad_images,
        "backbone": str(run_dir / "teacher_backbone.safetensors"),
    }
