"""The `opendino` command: one subcommand per stage, each building a typed config and calling one `run_*`.

Flags are generated from the config dataclasses (one flag per field, help from the field's comment), so the CLI
and the schema cannot drift apart. `key=value` arguments and `--config FILE.yaml` are accepted too; all three
go through `config.load`, which rejects unknown keys and wrong types before any work starts. Stage modules are
imported only when their subcommand runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence

from opendino import config

__all__ = ["main"]


def _add_schema_flags(parser: argparse.ArgumentParser, schema: type, skip: Sequence[str] = ()) -> None:
    docs = config.field_docs(schema)
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name in skip:  # given as positional arguments instead
            continue
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default
        help_text = docs.get(f.name, "") + ("" if required else f" (default: {default})")
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            nargs = "+" if typing.get_origin(hints[f.name]) in (tuple, list) or "tuple" in str(hints[f.name]) else None
            parser.add_argument(flag, dest=f.name, nargs=nargs, default=None, metavar=f.name.upper(), help=help_text)


def _schema_overrides(args: argparse.Namespace, schema: type) -> list[str]:
    """The flags the user gave, as key=value strings (values parsed as YAML by config.load)."""
    items = []
    for f in dataclasses.fields(schema):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if isinstance(value, list):
            value = "[" + ", ".join(value) + "]"
        elif isinstance(value, bool):
            value = str(value).lower()
        items.append(f"{f.name}={value}")
    return items


def _load(schema: type, args: argparse.Namespace):
    return config.load(schema, args.config, [*_schema_overrides(args, schema), *args.overrides])


def _cmd_extract(args: argparse.Namespace) -> int:
    from opendino import dist
    from opendino.extract import run_extract

    summary = run_extract(_load(config.ExtractConfig, args))
    if dist.is_main():
        print(json.dumps({k: v for k, v in summary.items() if k != "fingerprint"}, indent=2))
    dist.cleanup()
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from opendino.models.hub import run_convert

    out = run_convert(args.src, args.dst, to=args.to)
    print(f"wrote {out} ({args.to} layout)")
    return 0


def load_train_config(source: str | None, overrides: Sequence[str]) -> config.TrainConfig:
    """A training config from a YAML file or a preset name (see `opendino.presets`), plus key=value overrides."""
    from pathlib import Path

    from opendino import presets

    if source is None:
        return config.load(config.TrainConfig, None, overrides)
    if Path(source).suffix in (".yaml", ".yml") or Path(source).exists():
        if not Path(source).is_file():
            raise config.ConfigError(f"{source}: no such config file (presets: {sorted(presets.PRESETS)})")
        return config.load(config.TrainConfig, source, overrides)
    return config.load(config.TrainConfig, None, overrides, base=presets.preset_overrides(source))


def _cmd_train(args: argparse.Namespace) -> int:
    source, overrides = args.config, list(args.overrides)
    if source is not None and "=" in source:  # no CONFIG given: the first argument is already an override
        source, overrides = None, [source, *overrides]
    cfg = load_train_config(source, overrides)
    if args.print_config:
        print(config.dump_yaml(cfg), end="")
        return 0
    from opendino.train.loop import run_train

    summary = run_train(cfg)
    from opendino import dist

    if dist.is_main():
        print(json.dumps(summary, indent=2))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from opendino.train.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


# evaluation name -> "module:function" taking its config (see config.EVAL_CONFIGS) and returning the record
_EVAL_RUNNERS = {
    "features": "opendino.eval.common:run_features",
    "knn": "opendino.eval.knn:run",
    "linear": "opendino.eval.linear:run",
    "logreg": "opendino.eval.logreg:run",
    "seg": "opendino.eval.seg:run",
    "depth": "opendino.eval.depth:run",
    "retrieval": "opendino.eval.retrieval:run",
    "copydetect": "opendino.eval.copydetect:run",
    "robustness": "opendino.eval.robustness:run",
}


def _cmd_eval(args: argparse.Namespace) -> int:
    import importlib

    cfg = _load(config.EVAL_CONFIGS[args.eval_name], args)
    module, function = _EVAL_RUNNERS[args.eval_name].split(":")
    record = getattr(importlib.import_module(module), function)(cfg)
    from opendino import dist

    if dist.is_main():
        out = cfg.out or f"runs/eval/{args.eval_name}"
        print(json.dumps(record["metrics"], indent=2))
        print(f"wrote {out}/results.json and {out}/results.md")
    dist.cleanup()
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:
    from opendino.viz.run import run_viz

    # image paths go in as given (not through YAML parsing, which commas or brackets in a name would break)
    flags = config.parse_overrides(_schema_overrides(args, config.VizConfig))
    cfg = config.load(config.VizConfig, args.config, {**flags, "kind": args.viz_kind, "images": args.viz_images})
    record = run_viz(cfg)
    print(f"wrote {len(record['files'])} files to {cfg.out} (listed in {cfg.out}/viz.json)")
    if record["skipped"]:
        print(f"skipped {len(record['skipped'])} unreadable images (listed in viz.json)")
    return 0


def _cmd_curate(args: argparse.Namespace) -> int:
    source, overrides = args.config, list(args.overrides)
    if source is not None and "=" in source:  # no CONFIG given: the first argument is already an override
        source, overrides = None, [source, *overrides]
    extra: dict = {}
    if args.curate_stages:
        extra["stages"] = sorted(set(args.curate_stages), key=config.CURATE_STAGES.index)
    if args.force:
        extra["force"] = True
    cfg = config.load(config.CurateConfig, source, config.parse_overrides(overrides) | extra)
    if args.print_config:
        print(config.dump_yaml(cfg), end="")
        return 0
    from opendino import dist
    from opendino.curate.pipeline import check_config, run_curate

    check_config(cfg)
    records = run_curate(cfg)
    if dist.is_main():
        print(json.dumps({stage: r.get("summary", {}) for stage, r in records.items()}, indent=2, default=str))
    dist.cleanup()
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from opendino.demo import serve

    serve(_load(config.DemoConfig, args))
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from opendino.quickstart import run_quickstart

    run_quickstart(_load(config.QuickstartConfig, args))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opendino", description="DINOv2: pretrain, evaluate and use ViT features.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def staged(name: str, schema: type, handler, help_text: str) -> None:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default=None, help="YAML file with the keys below (flags and key=value win)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="more settings, e.g. batch_size=32")
        _add_schema_flags(p, schema)
        p.set_defaults(handler=handler)

    staged(
        "quickstart",
        config.QuickstartConfig,
        _cmd_quickstart,
        "generate a small labelled image set, extract features with the debug backbone and report kNN accuracy "
        "(no downloads)",
    )
    staged("extract", config.ExtractConfig, _cmd_extract, "write backbone features of an image folder or list")
    evals = sub.add_parser(
        "eval",
        help="evaluate frozen backbone features (knn, linear, logreg, seg, depth, retrieval, copydetect, robustness)",
        description="Evaluate a frozen backbone: one subcommand per protocol, results in OUT/results.json and "
        "OUT/results.md. Features are cached (cache_dir) and shared by the evaluations; under torchrun the "
        "feature extraction is split over the processes.",
    )
    eval_sub = evals.add_subparsers(dest="eval_name", required=True, metavar="NAME")
    for name, schema in config.EVAL_CONFIGS.items():
        doc = " ".join((schema.__doc__ or "").split())
        p = eval_sub.add_parser(name, help=doc.split(": ", 1)[-1], description=doc)
        p.add_argument("--config", default=None, help="YAML file with the keys below (flags and key=value win)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="more settings, e.g. batch_size=32")
        _add_schema_flags(p, schema)
        p.set_defaults(handler=_cmd_eval)
    train = sub.add_parser(
        "train",
        help="self-supervised DINOv2 pretraining (also under torchrun)",
        description="Self-supervised DINOv2 pretraining. CONFIG is a YAML file (see configs/) or a preset name "
        "(debug, vits14, vitb14, vitl14, vitg14, vitl16_short, small_vits14); key=value arguments override "
        "its keys with dotted names, e.g. data.source=/images optim.base_lr=0.001. Restarting the same command "
        "resumes from the last checkpoint in run.output_dir.",
    )
    train.add_argument("config", nargs="?", default=None, metavar="CONFIG", help="YAML file or preset name")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. data.source=/images")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(handler=_cmd_train)
    plot = sub.add_parser("plot", help="draw the loss, schedule and monitor curves of a training run (PNG)")
    plot.add_argument("run_dir", help="the run.output_dir of a training run")
    plot.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/training.png)")
    plot.set_defaults(handler=_cmd_plot)
    conv = sub.add_parser("convert", help="convert backbone weights between the official, timm and HF layouts")
    conv.add_argument("src", help="any checkpoint load_backbone reads (file, HF folder, run directory)")
    conv.add_argument("dst", help="output: a .pth / .safetensors file (official, timm) or a folder (hf)")
    conv.add_argument("--to", required=True, choices=("official", "timm", "hf"), help="target layout")
    conv.set_defaults(handler=_cmd_convert)
    cur = sub.add_parser(
        "curate",
        help="build a pretraining set from a raw image pool: embed, dedup, retrieve, balance, manifest",
        description="Curate a pretraining set from a raw image pool (folders, lists, manifests, tar shards): embed "
        "it with a backbone, remove near-duplicates (within the pool and of evaluation sets), retrieve images "
        "around curated seed sets, balance with hierarchical k-means and write a manifest that `opendino train` "
        "reads, with a report. CONFIG is a YAML file; key=value arguments override its keys (dotted names, e.g. "
        "dedup.threshold=0.9, 'pool=[/data/a, /data/b]'). Rerunning skips the stages that are up to date.",
    )
    cur.add_argument("config", nargs="?", default=None, metavar="CONFIG", help="YAML file (see configs/curate_*)")
    cur.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. out=runs/curated")
    cur.add_argument("--stage", action="append", choices=config.CURATE_STAGES, dest="curate_stages",
                     help="run only this stage (repeatable; default: every stage that is not up to date)")  # fmt: skip
    cur.add_argument("--force", action="store_true", help="rerun the selected stages even when up to date")
    cur.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    cur.set_defaults(handler=_cmd_curate)
    viz = sub.add_parser(
        "viz",
        help="pictures of a backbone's features: pca, foreground, match, attention, depth, seg (PNG)",
        description="Pictures of a backbone's patch features (KIND: pca, foreground, match, attention) or of the "
        "linear heads trained by `opendino eval depth` / `opendino eval seg` (KIND: depth, seg, with --head). "
        "IMAGES are files or folders; unreadable ones are reported and skipped. Files and facts go to OUT "
        "(viz.json lists them).",
    )
    viz.add_argument("viz_kind", choices=config.VizConfig.KINDS, metavar="KIND", help="what to draw")
    viz.add_argument("viz_images", nargs="+", metavar="IMAGES", help="image files or folders (match: two images)")
    viz.add_argument("--config", default=None, help="YAML file with the keys below (flags win)")
    _add_schema_flags(viz, config.VizConfig, skip=("kind", "images"))
    viz.set_defaults(handler=_cmd_viz)
    staged(
        "demo",
        config.DemoConfig,
        _cmd_demo,
        "a local web page (http://127.0.0.1:7860/ by default) showing PCA, foreground, attention, patch similarity "
        "and matches of uploaded images, and depth / segmentation with heads from `opendino eval depth` / `eval seg` "
        "(needs pip install 'opendino[demo]')",
    )
    return parser


def _version() -> str:
    from opendino import __version__

    return f"opendino {__version__}"


def _command_name(args: argparse.Namespace) -> str:
    return f"{args.command} {args.eval_name}" if args.command == "eval" else args.command


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except (config.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"opendino {_command_name(args)}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not hasattr(e, "exit_code"):  # stages mark the errors a user should read as one line
            raise
        print(f"opendino {_command_name(args)}: error: {e}", file=sys.stderr)
        return int(e.exit_code)


if __name__ == "__main__":
    sys.exit(main())
