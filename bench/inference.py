"""Inference throughput of opendino's DINOv2 backbones against timm's implementation of the same models.

Part 1 (backbone): images/s of a forward pass that returns the CLS token after the final norm, for opendino
(`build_backbone("dinov2_vit?14", img_size=...)`, `model(x)`) and timm (`vit_*_patch14_dinov2`,
`num_classes=0`, `model(x)`, which is `forward_features` + taking token 0: the same work and the same output).
Both are built at the same `--img-size` with random weights (nothing is downloaded) and run in eval mode under
`torch.inference_mode()`. CUDA: CUDA-event timing, autocast in `--dtype`, channels-last input, peak memory. CPU:
`time.perf_counter`. Every row reports the median time over `--iters` timed iterations after `--warmup` untimed ones,
with two random input tensors used alternately.

Part 2 (`--extract-dir DIR`): end-to-end `opendino.extract.run_extract` on an image folder (decoding, resize, crop,
forward, writing shards), reporting the run's images/s.

    python bench/inference.py                                    # GPU defaults: S/B/L, batch 256, bf16, eager+compile
    python bench/inference.py --device cpu --models s --batch-size 16 --warmup 2 --iters 5
    python bench/inference.py --extract-only --extract-dir DIR --extract-limit 512
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from opendino.eval.features import pick_device

MODELS = {
    "s": ("dinov2_vits14", "vit_small_patch14_dinov2"),
    "b": ("dinov2_vitb14", "vit_base_patch14_dinov2"),
    "l": ("dinov2_vitl14", "vit_large_patch14_dinov2"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("opendino", "timm")
MODES = ("eager", "compile")


# ----------------------------------------------------------------------------------------------------- arguments
def _csv(choices: tuple[str, ...] | list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(choices)}")
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("backbone forward")
    g.add_argument("--models", type=_csv(list(MODELS)), default=list(MODELS), help="s,b,l (default: all)")
    g.add_argument("--impls", type=_csv(IMPLS), default=list(IMPLS), help="opendino,timm (default: both)")
    g.add_argument("--modes", type=_csv(MODES), default=list(MODES), help="eager,compile (default: both)")
    g.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune, ...)")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--img-size", type=int, default=224, help="input side, a multiple of 14 (default 224)")
    g.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--warmup", type=int, default=None, help="untimed iterations (default: 10 on CUDA, 2 on CPU)")
    g.add_argument("--iters", type=int, default=None, help="timed iterations (default: 30 on CUDA, 5 on CPU)")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's)")
    g.add_argument("--extract-only", action="store_true", help="skip the backbone rows")
    g = p.add_argument_group("end-to-end extraction")
    g.add_argument("--extract-dir", default=None, help="image folder (or list) for opendino.extract.run_extract")
    g.add_argument("--extract-backbone", default="dinov2_vits14")
    g.add_argument("--extract-batch-size", type=int, default=64)
    g.add_argument("--extract-workers", type=int, default=4)
    g.add_argument("--extract-limit", type=int, default=None, help="only the first N images of the folder")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.img_size % 14:
        p.error(f"--img-size {args.img_size}: must be a multiple of 14")
    if args.extract_only and not args.extract_dir:
        p.error("--extract-only needs --extract-dir")
    return args


# ---------------------------------------------------------------------------------------------------- environment
def resolve_device(name: str) -> torch.device:
    try:
        return pick_device(name)
    except ValueError as e:
        raise SystemExit(f"--device {name}: {e}") from None


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
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm_version,
        "device_type": device.type,
        "cpu": f"{cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device"] = env["cpu"]
    return env


# ------------------------------------------------------------------------------------------------------- backbone
def build(impl: str, size: str, img_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if impl == "opendino":
        from opendino.models.hub import build_backbone

        return build_backbone(MODELS[size][0], img_size=img_size)
    import timm

    return timm.create_model(MODELS[size][1], pretrained=False, img_size=img_size, num_classes=0)


def time_forward(
    model: torch.nn.Module,
    inputs: list[torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    iters: int,
) -> dict[str, Any]:
    """Median seconds per forward and, on CUDA, peak allocated memory; also the first call's time (compilation)."""
    cuda = device.type == "cuda"
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    with torch.inference_mode(), amp:
        t0 = time.perf_counter()
        model(inputs[0])
        if cuda:
            torch.cuda.synchronize(device)
        first_call = time.perf_counter() - t0
        for i in range(1, warmup):
            model(inputs[i % 2])
        if cuda:
            torch.cuda.synchronize(device)
            events = [tuple(torch.cuda.Event(enable_timing=True) for _ in "se") for _ in range(iters)]
            for i, (start, end) in enumerate(events):
                start.record()
                model(inputs[i % 2])
                end.record()
            torch.cuda.synchronize(device)
            times = [start.elapsed_time(end) / 1e3 for start, end in events]
        else:
            for i in range(iters):
                t0 = time.perf_counter()
                model(inputs[i % 2])
                times.append(time.perf_counter() - t0)
    result = {"median_s": statistics.median(times), "min_s": min(times), "first_call_s": first_call, "times_s": times}
    if cuda:
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_backbones(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    shape = (args.batch_size, 3, args.img_size, args.img_size)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=gen).to(device) for _ in range(2)]
    if device.type == "cuda":
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    rows = []
    for size in args.models:
        for mode in args.modes:
            for impl in args.impls:
                row: dict[str, Any] = {
                    "model": f"ViT-{size.upper()}/14",
                    "impl": impl,
                    "name": MODELS[size][0 if impl == "opendino" else 1],
                    "mode": mode,
                    "batch": args.batch_size,
                    "img_size": args.img_size,
                    "dtype": args.dtype,
                }
                print(f"  {row['name']} {mode} ...", file=sys.stderr, flush=True)
                try:
                    model = build(impl, size, args.img_size).to(device).eval()
                    if mode == "compile":
                        torch._dynamo.reset()
                        model = torch.compile(model, mode=args.compile_mode)
                    row.update(
                        time_forward(model, inputs, device=device, dtype=dtype, warmup=args.warmup, iters=args.iters)
                    )
                    row["img_per_s"] = args.batch_size / row["median_s"]
                except Exception as e:  # e.g. torch.compile without a working compiler: report, go on
                    row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                    print(f"    failed: {row['error']}", file=sys.stderr, flush=True)
                model = None
                free(device)
                rows.append(row)
    by_key = {(r["model"], r["mode"], r["impl"]): r for r in rows}
    for r in rows:
        other = by_key.get((r["model"], r["mode"], "timm"))
        if r.get("img_per_s") and other and other.get("img_per_s"):
            r["ratio_vs_timm"] = r["img_per_s"] / other["img_per_s"]
    return rows


# ----------------------------------------------------------------------------------------------------- extraction
def bench_extract(args: argparse.Namespace, device: torch.device, dtype_name: str) -> dict[str, Any]:
    from opendino.config import ExtractConfig
    from opendino.data.sources import list_images
    from opendino.extract import run_extract

    with tempfile.TemporaryDirectory(prefix="opendino-bench-") as tmp:
        data = args.extract_dir
        n_listed = len(list_images(data))
        if args.extract_limit is not None:
            paths = list_images(data)[: args.extract_limit]
            data = str(Path(tmp) / "images.txt")
            Path(data).write_text("".join(p + "\n" for p in paths))
        cfg = ExtractConfig(
            backbone=args.extract_backbone,
            data=data,
            out=str(Path(tmp) / "out"),
            batch_size=args.extract_batch_size,
            num_workers=args.extract_workers,
            device=str(device),
            amp={"bf16": "bf16", "fp16": "fp16", "fp32": "none"}[dtype_name],
            overwrite=True,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*randomly initialised weights")
            summary = run_extract(cfg)  # prints its own progress bar
    return {
        "backbone": args.extract_backbone,
        "data": args.extract_dir,
        "images_in_folder": n_listed,
        "images": summary["processed_this_run"],
        "n_bad": summary["n_bad"],
        "batch": args.extract_batch_size,
        "workers": args.extract_workers,
        "amp": cfg.amp if device.type == "cuda" else "none (CPU runs fp32)",
        "transform": f"resize {cfg.resize_size}, centre crop {cfg.crop_size}",
        "seconds": summary["seconds_this_run"],
        "img_per_s": summary["images_per_second_this_run"],
    }


# --------------------------------------------------------------------------------------------------------- output
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def backbone_table(rows: list[dict[str, Any]], cuda: bool) -> str:
    head = ["model", "impl", "mode", "batch", "dtype", "img/s", "median ms", "first call s"]
    head += ["peak mem GiB"] if cuda else []
    head += ["opendino/timm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["impl"], r["mode"], str(r["batch"]), r["dtype"]]
        if "error" in r:
            cells += ["failed", "-", "-"] + (["-"] if cuda else []) + ["-"]
        else:
            cells += [_fmt(r["img_per_s"], ".1f"), _fmt(r["median_s"] * 1e3, ".1f"), _fmt(r["first_call_s"], ".1f")]
            cells += [_fmt(r["peak_mem_gib"], ".2f")] if cuda else []
            cells += [_fmt(r.get("ratio_vs_timm"), ".3f") if r["impl"] == "opendino" else ""]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {r['name']} {r['mode']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines + (["", *errors] if errors else []))


def extract_table(e: dict[str, Any]) -> str:
    head = ["backbone", "images", "batch", "workers", "amp", "seconds", "img/s"]
    cells = [e["backbone"], str(e["images"]), str(e["batch"]), str(e["workers"]), e["amp"], f"{e['seconds']:.1f}"]
    cells.append(_fmt(e["img_per_s"], ".1f"))
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(cells) + " |"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.warmup = max(1, args.warmup if args.warmup is not None else (10 if cuda else 2))
    args.iters = max(1, args.iters if args.iters is not None else (30 if cuda else 5))
    if args.threads and not cuda:
        torch.set_num_threads(args.threads)
    if cuda:
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    env = environment(device)
    print(f"# opendino inference benchmark, {env['date']}")
    print(f"command : {env['command']}")
    print(f"device  : {env['device']}")
    versions = f"python {env['python']}, torch {env['torch']}, timm {env['timm']}"
    print(f"versions: {versions}" + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if cuda else ""))
    results: dict[str, Any] = {"env": env, "args": {k: v for k, v in vars(args).items() if k != "json"}}

    if not args.extract_only:
        notes = [
            f"input {args.batch_size}x3x{args.img_size}x{args.img_size} random normal (2 tensors used alternately)"
            + (", channels_last" if cuda else ""),
            f"opendino: build_backbone(name, img_size={args.img_size}), model(x) -> CLS token after the final norm",
            f"timm: create_model(name, img_size={args.img_size}, num_classes=0), model(x) = forward_features + token 0"
            " (the same output; forward_features alone would skip only the slicing)",
            "random weights, eval(), torch.inference_mode()"
            + (f", autocast {args.dtype}" if args.dtype != "fp32" else ", fp32 (no autocast)")
            + (f", torch.compile(mode={args.compile_mode!r})" if "compile" in args.modes else ""),
            f"median of {args.iters} timed iterations after {args.warmup} warmup "
            + ("(CUDA events)" if cuda else "(time.perf_counter)")
            + "; first call s = the first warmup call (includes compilation)",
        ]
        print("notes   :\n" + "\n".join(f"  - {n}" for n in notes))
        print("\nbackbone forward:", file=sys.stderr, flush=True)
        rows = bench_backbones(args, device, DTYPES[args.dtype])
        results["notes"] = notes
        results["backbone"] = rows
        print("\n## Backbone forward, images/s\n")
        print(backbone_table(rows, cuda))

    if args.extract_dir:
        print("\nend-to-end extraction:", file=sys.stderr, flush=True)
        e = bench_extract(args, device, args.dtype)
        results["extract"] = e
        print("\n## End-to-end extraction (opendino.extract.run_extract)\n")
        limit = f"first {e['images']} of {e['images_in_folder']} images" if args.extract_limit else "all images"
        print(f"data: {e['data']} ({limit}); transform: {e['transform']}; outputs: cls\n")
        print(extract_table(e))

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
