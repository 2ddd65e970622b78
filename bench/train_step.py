"""Throughput and peak memory of one DINOv2 training step, per training preset (`opendino train <preset>`).

A step is exactly what the training loop runs (`opendino.train.loop.train_step`): teacher forward on the global
crops, student forward on [global (masked), local] crops, DINO + iBOT + KoLeo losses, backward, gradient clipping per
student part, AdamW step, EMA update of the teacher. The model, optimiser groups and schedules are built from the
preset as `run_train` builds them (`SSLModel`, `parallelize`, `build_optimizer_for`,
`build_schedules_for`, `apply_schedules`); one process, so no DDP / FSDP.

Data loading is left out: the crops are random normal tensors already at their size (2 global + n local per image,
the preset's crop sizes), collated by the real `make_collate(cfg)`, so the iBOT masks follow the official masking.
A few such batches are built up front and used in turn (the number of masked tokens varies between them, as in
training). Images/s counts source images (each with all its crops).

Timing: `time.perf_counter` around each step, after `torch.cuda.synchronize` on CUDA; `--warmup` untimed steps
first (the first one's time is reported: it includes compilation), then `--steps` timed ones. Peak memory: on CUDA
`torch.cuda.max_memory_allocated`, reset after the warm-up; on CPU the process's peak resident set size
(`ru_maxrss`), which cannot be reset: it is the peak since the process started (run one preset per command for a
clean figure).

    python bench/train_step.py                                      # GPU: vits14,vitb14,vitl14, bf16
    python bench/train_step.py --device cpu --presets debug --batch-size 16
    python bench/train_step.py --presets vitl14 --compile --activation-checkpointing --profile
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from opendino.cli import load_train_config
from opendino.config import ConfigError, TrainConfig
from opendino.data.collate import Batch, TrainSample
from opendino.data.pipeline import make_collate
from opendino.eval.features import pick_device
from opendino.train.loop import build_optimizer_for, build_schedules_for, train_step
from opendino.train.parallel import parallelize
from opendino.train.schedules import Schedules, apply_schedules
from opendino.train.ssl import SSLModel

PRESETS = ("debug", "vits14", "vitb14", "vitl14", "vitg14", "vitl16_short", "small_vits14")
GPU_PRESETS = ["vits14", "vitb14", "vitl14"]
CPU_PRESETS = ["debug"]
CPU_BATCH = 8
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
N_BATCHES = 4  # distinct synthetic batches, used in turn


# ----------------------------------------------------------------------------------------------------- arguments
def _presets(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in PRESETS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(PRESETS)}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", type=_presets, default=None, help="default: vits14,vitb14,vitl14 on CUDA, debug on CPU")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"images per step, >= 2 for KoLeo (default: the preset's data.batch_size_per_gpu on CUDA, {CPU_BATCH} "
        "on CPU)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on CUDA, 2 on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", choices=list(PRECISIONS), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (run.compile)")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute student blocks in backward (run.activation_checkpointing)",
    )
    p.add_argument("--local-size", type=int, default=None, help="override crops.local_crops_size (default: preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's)")
    p.add_argument("--profile", action="store_true", help="after timing, profile one step and print the top ops")
    p.add_argument("--profile-rows", type=int, default=25, help="ops listed by --profile (default 25)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "local_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    if args.warmup is not None and args.warmup < 1:
        p.error(f"--warmup {args.warmup}: expected at least 1 (the first step compiles and allocates)")
    return args


# ---------------------------------------------------------------------------------------------------- environment
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": f"{cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device"] = env["cpu"]
    return env


# ------------------------------------------------------------------------------------------------------ the setup
def preset_config(preset: str, args: argparse.Namespace, batch_size: int, precision: str) -> TrainConfig:
    overrides = [f"data.batch_size_per_gpu={batch_size}", f"run.precision={precision}"]
    overrides += [f"run.compile={str(args.compile).lower()}"]
    overrides += [f"run.activation_checkpointing={str(args.activation_checkpointing).lower()}"]
    if args.local_size is not None:
        overrides.append(f"crops.local_crops_size={args.local_size}")
    return load_train_config(preset, [*overrides, *args.set])


def synthetic_batches(cfg: TrainConfig, n: int, device: torch.device) -> list[Batch]:
    """`n` batches of random crops at the preset's sizes, collated (with iBOT masks) by `make_collate(cfg)`."""
    c = cfg.crops
    collate = make_collate(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for b in range(n):
        samples = []
        for i in range(cfg.data.batch_size_per_gpu):
            crops = {
                key: [torch.randn(3, size, size, generator=gen) for _ in range(number)]
                for key, size, number in (
                    ("global_crops", c.global_crops_size, c.global_crops_number),
                    ("local_crops", c.local_crops_size, c.local_crops_number),
                )
            }
            seed = b * cfg.data.batch_size_per_gpu + i
            samples.append(TrainSample(crops=crops, index=seed, seed=seed))
        batches.append(collate(samples).to(device))
    return batches


def build(
    cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None
) -> tuple[SSLModel, torch.optim.Optimizer, Schedules, torch.amp.GradScaler | None]:
    """Model, optimiser, schedules and grad scaler as `run_train` builds them (one process)."""
    torch.manual_seed(cfg.run.seed)
    model = SSLModel(cfg).to(device)
    parallelize(
        model,
        parallel=cfg.run.parallel,
        compile=cfg.run.compile,
        activation_checkpointing=cfg.run.activation_checkpointing,
        param_dtype=amp_dtype,
    )
    optimizer = build_optimizer_for(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    model.train()
    return model, optimizer, build_schedules_for(cfg, 1), scaler


# ------------------------------------------------------------------------------------------------------- the bench
def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(cfg: TrainConfig, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Build, warm up and time the steps of `cfg`; the measured fields of a row (all it built is freed on return)."""
    cuda = device.type == "cuda"
    amp_dtype = PRECISIONS[args.precision]
    batches = synthetic_batches(cfg, min(N_BATCHES, args.warmup + args.steps), device)
    model, optimizer, schedules, scaler = build(cfg, device, amp_dtype)
    out: dict[str, Any] = {
        "student_params_m": sum(p.numel() for p in model.student.parameters()) / 1e6,
        "backbone_params_m": sum(p.numel() for p in model.student.backbone.parameters()) / 1e6,
        "masked_tokens_mean": statistics.mean(int(b.n_masked_patches) for b in batches),
    }
    # Iterations past the frozen last layer, so that every parameter gets a non-zero learning rate.
    it0 = cfg.schedules.freeze_last_layer_epochs * cfg.schedules.epoch_length

    def step(i: int) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        values = schedules.at(it0 + i)
        apply_schedules(optimizer, values)
        _, finite, _, _ = train_step(
            model,
            batches[i % len(batches)],
            optimizer,
            values,
            amp_dtype=amp_dtype,
            scaler=scaler,
            clip_grad=cfg.optim.clip_grad,
        )
        if cuda:
            torch.cuda.synchronize(device)
        if not finite:
            raise RuntimeError(f"step {i}: non-finite loss, the update was skipped (the timing would be wrong)")
        return time.perf_counter() - t0

    out["first_step_s"] = step(0)
    for i in range(1, args.warmup):
        step(i)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = [step(args.warmup + i) for i in range(args.steps)]
    out["peak_mem_gib"] = peak_memory_gib(device)
    out["times_s"] = times
    out["mean_ms"] = 1e3 * statistics.mean(times)
    out["p50_ms"] = 1e3 * percentile(times, 50)
    out["p90_ms"] = 1e3 * percentile(times, 90)
    out["img_per_s"] = cfg.data.batch_size_per_gpu / statistics.mean(times)
    if args.profile:
        out["profile"] = profile_step(step, args.warmup + args.steps, cuda, args.profile_rows)
    return out


def bench_preset(preset: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One table row: the preset's settings and `measure`'s figures, or `error` (e.g. out of memory)."""
    cuda = device.type == "cuda"
    cfg = preset_config(preset, args, args.batch_size or (cfg_batch(preset) if cuda else CPU_BATCH), args.precision)
    c = cfg.crops
    row: dict[str, Any] = {
        "preset": preset,
        "arch": cfg.model.arch,
        "crops": f"{c.global_crops_number}x{c.global_crops_size} + {c.local_crops_number}x{c.local_crops_size}",
        "batch": cfg.data.batch_size_per_gpu,
        "precision": args.precision,
        "mode": ("compile" if args.compile else "eager") + ("+AC" if args.activation_checkpointing else ""),
    }
    try:
        row.update(measure(cfg, args, device))
    except torch.OutOfMemoryError:
        row["error"] = f"out of memory at batch {row['batch']}"
    except Exception as e:  # e.g. torch.compile without a working compiler: report, go on with the next preset
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    gc.collect()
    if args.compile:
        torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return row


def cfg_batch(preset: str) -> int:
    return load_train_config(preset, []).data.batch_size_per_gpu


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def profile_step(step: Callable[[int], float], i: int, cuda: bool, rows: int) -> str:
    """The op table of one more step under torch.profiler, sorted by self device time (CUDA) or self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step(i)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


# --------------------------------------------------------------------------------------------------------- output
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]], cuda: bool) -> str:
    mem = "peak mem GiB" if cuda else "peak RSS GiB"
    head = ["preset", "crops", "batch", "precision", "mode", "img/s", "step ms mean", "p50", "p90", "first step s"]
    head += [mem, "student params M"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["preset"], r["crops"], str(r["batch"]), r["precision"], r["mode"]]
        if "error" in r:
            cells += ["failed"] + ["-"] * (len(head) - len(cells) - 1)
        else:
            cells += [_fmt(r["img_per_s"], ".2f" if r["img_per_s"] < 10 else ".1f")]
            cells += [_fmt(r[k], ".1f") for k in ("mean_ms", "p50_ms", "p90_ms")]
            cells += [
                _fmt(r["first_step_s"], ".2f" if r["first_step_s"] < 10 else ".1f"),
                _fmt(r["peak_mem_gib"], ".2f"),
                _fmt(r["student_params_m"], ".1f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {r['preset']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines + (["", *errors] if errors else []))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise SystemExit(f"--device {args.device}: {e}") from None
    cuda = device.type == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    if not cuda and args.precision != "fp32":
        raise SystemExit(f"--precision {args.precision}: training runs fp32 on CPU (mixed precision needs a GPU)")
    args.presets = args.presets or (GPU_PRESETS if cuda else CPU_PRESETS)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.steps = args.steps if args.steps is not None else (20 if cuda else 5)
    if args.threads and not cuda:
        torch.set_num_threads(args.threads)
    if cuda and device.index is not None:
        torch.cuda.set_device(device)

    for preset in args.presets:  # reject a bad --set / --local-size before anything runs
        try:
            preset_config(preset, args, args.batch_size or CPU_BATCH, args.precision)
        except ConfigError as e:
            raise SystemExit(f"{preset}: {e}") from None

    env = environment(device)
    print(f"# opendino training-step benchmark, {env['date']}")
    print(f"command : {env['command']}")
    print(f"device  : {env['device']}")
    versions = f"python {env['python']}, torch {env['torch']}"
    print(f"versions: {versions}" + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if cuda else ""))
    notes = [
        "one step = opendino.train.loop.train_step: teacher fwd + student fwd + losses + backward + clip + AdamW + EMA",
        "synthetic crops (random normal, already at size), iBOT masks from make_collate(cfg) (official masking); "
        f"{N_BATCHES} batches used in turn; no data loading",
        f"{args.steps} timed steps after {args.warmup} warm-up steps; time.perf_counter per step"
        + (" after torch.cuda.synchronize" if cuda else "")
        + "; img/s = batch / mean step time (source images, each with all its crops)",
        "peak mem: torch.cuda.max_memory_allocated, reset after the warm-up"
        if cuda
        else "peak RSS: ru_maxrss of the process since it started (includes earlier presets of the same command)",
    ]
    print("notes   :\n" + "\n".join(f"  - {n}" for n in notes))

    rows = []
    for preset in args.presets:
        print(f"  {preset} ...", file=sys.stderr, flush=True)
        row = bench_preset(preset, args, device)
        if "error" in row:
            print(f"    failed: {row['error']}", file=sys.stderr, flush=True)
        elif "profile" in row:
            print(f"\n## Profile of one step, {preset}\n\n{row['profile']}")
        rows.append(row)
    print("\n## Training step\n")
    print(table(rows, cuda))
    for r in rows:
        if "error" not in r:
            print(
                f"- {r['preset']}: {r['arch']}, backbone {r['backbone_params_m']:.1f} M parameters, "
                f"mean masked tokens per batch {r['masked_tokens_mean']:.0f}"
            )

    if args.json:
        out = {"env": env, "args": {k: v for k, v in vars(args).items() if k != "json"}, "notes": notes, "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
