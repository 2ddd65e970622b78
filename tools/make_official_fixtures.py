#!/usr/bin/env python
"""Generate parity fixtures from the OFFICIAL facebookresearch/dinov2 code.

This script is ours; it is the only place in opendino that imports the official
DINOv2 code, and it is never imported by the library or by the tests.  The tests
only read the NUMBERS it writes (JSON + safetensors) and compare our own
implementation against them.

Requirements
------------
* A checkout of https://github.com/facebookresearch/dinov2 given with
  ``--official PATH`` (the fixtures in the repository were made from commit
  b8931f7bf91576930313be2c6d6af376033b35f0).  It is put on ``sys.path`` and
  ``dinov2.models.vision_transformer``, ``dinov2.layers`` (DINOHead,
  MemEffAttention, NestedTensorBlock) and ``dinov2.hub.backbones`` are
  imported from it.  Nothing from that checkout is copied into opendino.
* torch, numpy and safetensors (all already opendino dependencies).  The
  official modules imported here need nothing else: xFormers is optional
  there, and we switch it off.
* ``XFORMERS_DISABLED=1`` is set before anything from ``dinov2`` is
  imported, so the official code takes its pure-PyTorch paths (SDPA
  attention, the plain ``SwiGLUFFN`` base class for ``SwiGLUFFNFused``).

Usage
-----
    python tools/make_official_fixtures.py --official /path/to/dinov2 --out tests/fixtures/official

Outputs (in ``--out``; described in tests/fixtures/official/README.md)
----------------------------------------------------------------------
* ``hub_keys.json``: for the 8 hub backbones (built on the meta device with
  ``pretrained=False``) and the ViT-L/14 training layout (block_chunks=4):
  the exact ``DinoVisionTransformer`` constructor kwargs and the state-dict
  keys with shapes, in state-dict order.
* ``tiny_<case>.safetensors`` + ``tiny_cases.json``: tiny random-weight
  backbones (every parameter overwritten with seeded random values) with
  their full state dict (``state.*``), inputs (``in.*``) and float32 CPU
  outputs (``out.*``).  Weights and inputs are drawn at random and then
  rounded to float16-representable values, so they are stored in float16
  (half the bytes) with no loss: ``.float()`` gives back exactly the float32
  tensors the official model was run with.  ``--storage-dtype float32``
  stores them as float32 instead (same numbers, twice the size).
* ``dino_head.safetensors`` / ``dino_head_1layer.safetensors``: the
  official DINOHead with random weights, an input and its output.

The output is deterministic: running the script twice with the same torch
version gives byte-identical files (checked with ``--check-against DIR``).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import warnings
import zlib
from functools import partial
from pathlib import Path

HUB_MODELS = [
    "dinov2_vits14",
    "dinov2_vitb14",
    "dinov2_vitl14",
    "dinov2_vitg14",
    "dinov2_vits14_reg",
    "dinov2_vitb14_reg",
    "dinov2_vitl14_reg",
    "dinov2_vitg14_reg",
]

# The backbone of dinov2/configs/train/vitl14.yaml on top of ssl_default_config.yaml, passed the way
# dinov2.models.build_model passes it to the student (img_size = crops.global_crops_size = 224).
TRAIN_VITL14_KWARGS = dict(
    patch_size=14,
    img_size=224,
    init_values=1e-5,
    ffn_layer="swiglufused",
    block_chunks=4,
    qkv_bias=True,
    proj_bias=True,
    ffn_bias=True,
    num_register_tokens=0,
    interpolate_offset=0.1,
    interpolate_antialias=False,
    drop_path_rate=0.4,
    drop_path_uniform=True,
)

TINY_BASE = dict(
    img_size=56,
    patch_size=14,
    in_chans=3,
    embed_dim=48,
    depth=3,
    num_heads=4,
    mlp_ratio=4,
    qkv_bias=True,
    proj_bias=True,
    ffn_bias=True,
    ffn_layer="mlp",
    init_values=1.0,
    block_chunks=0,
    num_register_tokens=0,
    interpolate_antialias=False,
    interpolate_offset=0.1,
)

TINY_CASES: dict[str, dict] = {
    "mlp": dict(TINY_BASE),
    "swiglu": {**TINY_BASE, "ffn_layer": "swiglufused"},
    "reg4": {**TINY_BASE, "num_register_tokens": 4, "interpolate_antialias": True, "interpolate_offset": 0.0},
    "swiglu_reg2_nobias": {
        **TINY_BASE,
        "ffn_layer": "swiglufused",
        "num_register_tokens": 2,
        "qkv_bias": False,
        "proj_bias": False,
        "ffn_bias": False,
    },
    "chunked": {**TINY_BASE, "depth": 4, "block_chunks": 2, "init_values": 1e-5},
    "nols": {**TINY_BASE, "init_values": None},
}

TINY_BLOCK_FN = "partial(NestedTensorBlock, attn_class=MemEffAttention)"

DINO_HEAD_CASES = {
    "dino_head": dict(in_dim=48, out_dim=100, nlayers=3, hidden_dim=32, bottleneck_dim=16),
    "dino_head_1layer": dict(in_dim=48, out_dim=100, nlayers=1, hidden_dim=32, bottleneck_dim=16),
}

INPUT_SEED = 20240601
FF_KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")

NAMING = (
    "Each tiny_<case>.safetensors holds three groups of tensors. 'state.*' and 'in.*' are stored as float16 "
    "(in.masks as bool) but hold values that float16 represents exactly: cast them to float32 (.float()) to get "
    "the exact tensors the float32 official model used; every 'out.*' is float32. "
    "'state.<key>' is the full official state dict of the random-weight model, with the official key names "
    "(their state-dict order is in tiny_cases.json[case]['state_dict_keys'], since safetensors sorts names). "
    "'in.<name>' are the inputs: in.x_square (2,3,56,56), in.x_rect (2,3,42,70), in.x_big (1,3,98,84) and "
    "in.masks (2,16) bool. 'out.<name>' are the outputs of the official model in eval mode, float32, CPU: "
    "out.ff_{square,rect,big,masked}.{x_norm_clstoken,x_norm_regtokens,x_norm_patchtokens,x_prenorm} are the "
    "dict entries of forward_features(in.x_square / in.x_rect / in.x_big / in.x_square with masks=in.masks) "
    "(x_norm_regtokens has shape (B,0,D) without registers); out.forward_square = forward(in.x_square); "
    "out.gil_n2.{0,1} = get_intermediate_layers(in.x_rect, n=2); "
    "out.gil_idx_reshape_cls.{0,1}.{patch,cls} = get_intermediate_layers(in.x_rect, n=[0, 2], reshape=True, "
    "return_class_token=True, norm=True), index i being the i-th returned pair (blocks 0 and 2); "
    "out.gil_nonorm.0 = get_intermediate_layers(in.x_rect, n=1, norm=False); out.pos_rect / out.pos_big = "
    "interpolate_pos_encoding(tokens, x.shape[2], x.shape[3]) with tokens = cls token prepended to the patch "
    "tokens of in.x_rect / in.x_big, exactly as prepare_tokens_with_masks calls it (shape (1, 1+N, D)). "
    "dino_head*.safetensors hold (same dtype convention) 'state.<key>' (official DINOHead state dict, including "
    "last_layer.weight_g / last_layer.weight_v from the old torch.nn.utils.weight_norm), 'in.x' (5,48), "
    "'out.bottleneck' (the MLP output before L2 normalisation) and 'out.y' (the head output)."
)


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _describe(value):
    """A JSON-able description of a constructor argument (classes and partials become strings)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [_describe(v) for v in value]
    if isinstance(value, partial):
        args = [_describe(a) for a in value.args]
        kws = [f"{k}={_describe(v)}" for k, v in value.keywords.items()]
        return f"partial({', '.join([_describe(value.func), *map(str, args), *kws])})"
    if inspect.isclass(value) or inspect.isfunction(value):
        return value.__name__
    return repr(value)


def _git_info(path: Path) -> dict:
    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True).stdout

    try:
        return {
            "commit": git("rev-parse", "HEAD").strip(),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip()),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def _compact_json(obj) -> str:
    """json.dumps with indent, but lists of numbers kept on one line."""
    text = json.dumps(obj, indent=1)
    return (
        re.sub(
            r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)?\s*\]",
            lambda m: "[" + ", ".join(s.strip() for s in (m.group(1) or "").split(",") if s.strip()) + "]",
            text,
        )
        + "\n"
    )


INIT_VIT_KWARGS = dict(img_size=56, patch_size=14, embed_dim=48, depth=2, num_heads=4, block_chunks=0)


def _init_stats(sd) -> dict:
    """{key: [sum, sum of squares, first 4 values]} in float64, rounded to 10 significant digits."""
    out = {}
    for k, v in sd.items():
        v = v.detach().double().flatten()
        out[k] = [float(f"{v.sum().item():.10g}"), float(f"{v.square().sum().item():.10g}")] + [
            float(f"{x:.10g}") for x in v[:4].tolist()
        ]
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, type=Path, help="checkout of facebookresearch/dinov2")
    parser.add_argument("--out", default=Path("tests/fixtures/official"), type=Path, help="output folder")
    parser.add_argument(
        "--storage-dtype",
        choices=("float16", "float32"),
        default="float16",
        help="dtype in which weights ('state.*') and inputs ('in.*') are stored; their values are exactly "
        "float16-representable either way, so this changes file sizes, never numbers (outputs are always float32)",
    )
    parser.add_argument(
        "--check-against",
        type=Path,
        default=None,
        help="after writing, compare every file with the same name in this folder (byte equality)",
    )
    args = parser.parse_args(argv)

    official = args.official.resolve()
    if not (official / "dinov2" / "models" / "vision_transformer.py").is_file():
        parser.error(f"{official} does not look like a facebookresearch/dinov2 checkout")

    # Must happen before anything from dinov2 is imported: the official modules read it at import time.
    os.environ["XFORMERS_DISABLED"] = "1"
    sys.path.insert(0, str(official))

    import torch
    from safetensors.torch import save_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the official modules warn about xFormers being disabled
        import dinov2
        import dinov2.layers.attention as off_attention
        import dinov2.layers.block as off_block
        import dinov2.layers.swiglu_ffn as off_swiglu
        from dinov2.hub import backbones
        from dinov2.layers import DINOHead, MemEffAttention, NestedTensorBlock
        from dinov2.models import vision_transformer as vits

    if not Path(dinov2.__file__).resolve().is_relative_to(official):
        raise SystemExit(f"imported dinov2 from {dinov2.__file__}, not from {official}")
    for mod in (off_attention, off_block, off_swiglu):
        if mod.XFORMERS_AVAILABLE:
            raise SystemExit(f"{mod.__name__}: xFormers is in use although XFORMERS_DISABLED=1")

    torch.set_num_threads(1)  # bit-for-bit reproducible CPU reductions
    torch.use_deterministic_algorithms(True)
    git = _git_info(official)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    DVT = vits.DinoVisionTransformer
    signature = inspect.signature(DVT.__init__)

    # ---- record the exact constructor kwargs, by wrapping DinoVisionTransformer.__init__ for a moment ----------------
    recorded: list[dict] = []
    original_init = DVT.__init__

    def recording_init(self, *a, **kw):
        if a:
            raise AssertionError("positional constructor args are not expected")
        recorded.append(dict(kw))
        original_init(self, **kw)

    def build_recorded(fn, *a, **kw):
        recorded.clear()
        DVT.__init__ = recording_init
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = fn(*a, **kw)
        finally:
            DVT.__init__ = original_init
        assert len(recorded) == 1, recorded
        passed = recorded[0]
        bound = signature.bind(None, **passed)
        bound.apply_defaults()
        resolved = {k: _describe(v) for k, v in bound.arguments.items() if k != "self"}
        return model, {k: _describe(v) for k, v in passed.items()}, resolved

    # ---- a. hub_keys.json --------------------------------------------------------------------------------------------
    hub: dict = {
        "_meta": {
            "official_commit": git["commit"],
            "official_dirty": git["dirty"],
            "torch": torch.__version__,
            "description": (
                "For each model: 'builder' is the official call, 'kwargs' the keyword arguments it passed to "
                "dinov2.models.vision_transformer.DinoVisionTransformer (classes/partials as strings), "
                "'resolved_kwargs' the same with the constructor defaults filled in, 'num_params' the parameter "
                "count, and 'state_dict' maps every state-dict key, in state-dict order, to its shape. Models "
                "were built on the meta device with pretrained=False."
            ),
        }
    }
    builders = [
        (name, f"dinov2.hub.backbones.{name}(pretrained=False)", getattr(backbones, name), {"pretrained": False})
        for name in HUB_MODELS
    ]
    train_call = ", ".join(f"{k}={v!r}" for k, v in TRAIN_VITL14_KWARGS.items())
    builders.append(
        (
            "vitl14_train_chunked",
            f"dinov2.models.vision_transformer.vit_large({train_call})",
            vits.vit_large,
            TRAIN_VITL14_KWARGS,
        )
    )
    for name, call, fn, kw in builders:
        model, passed, resolved = build_recorded(fn, **kw)
        sd = model.state_dict()
        hub[name] = {
            "builder": call,
            "kwargs": passed,
            "resolved_kwargs": resolved,
            "num_params": sum(p.numel() for p in model.parameters()),
            "state_dict": {k: list(v.shape) for k, v in sd.items()},
        }
        del model, sd
    path = out_dir / "hub_keys.json"
    path.write_text(_compact_json(hub))
    written.append(path)

    # ---- b. tiny random-weight backbones -----------------------------------------------------------------------------
    def fp16_exact(t: torch.Tensor) -> torch.Tensor:
        # Round random values to ones that float16 represents exactly: the models still run in float32, but the
        # files can store weights and inputs in 2 bytes (--storage-dtype float16) without changing any number.
        return t.to(torch.float16).to(torch.float32)

    storage_dtype = {"float16": torch.float16, "float32": torch.float32}[args.storage_dtype]

    def stored(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone().contiguous()
        if t.is_floating_point():
            assert torch.equal(t.to(storage_dtype).to(t.dtype), t), "value not exactly representable"
            t = t.to(storage_dtype)
        return t

    gen = torch.Generator().manual_seed(INPUT_SEED)
    inputs = {
        "x_square": fp16_exact(torch.randn(2, 3, 56, 56, generator=gen)),
        "x_rect": fp16_exact(torch.randn(2, 3, 42, 70, generator=gen)),
        "x_big": fp16_exact(torch.randn(1, 3, 98, 84, generator=gen)),
        "masks": torch.rand(2, 16, generator=gen) < 0.4,
    }
    m = inputs["masks"]
    assert m.any(dim=1).all() and (~m).any(dim=1).all(), "every sample should have masked and unmasked patches"

    def randomize(module: torch.nn.Module, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        layer_norm_weights = {
            f"{mname}.weight" if mname else "weight"
            for mname, mod in module.named_modules()
            if isinstance(mod, torch.nn.LayerNorm) and mod.weight is not None
        }
        with torch.no_grad():
            for pname, p in module.named_parameters():
                r = torch.randn(p.shape, generator=g, dtype=p.dtype)
                leaf = pname.rsplit(".", 1)[-1]
                if pname in ("cls_token", "pos_embed", "mask_token", "register_tokens"):
                    v = r * 0.5
                elif leaf == "gamma":  # LayerScale
                    v = 0.5 + 0.1 * r
                elif pname in layer_norm_weights or leaf == "weight_g":
                    v = 1.0 + 0.1 * r
                else:
                    v = r * 0.1
                p.copy_(fp16_exact(v))

    def file_metadata(**fields) -> dict[str, str]:
        # One key only: safetensors writes the metadata map in hash order, which would make the bytes of a file
        # with several keys change from run to run.
        return {"opendino_fixture": json.dumps(fields, sort_keys=True)}

    def contiguous_copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().contiguous()

    tiny_json: dict = {
        "_meta": {
            "official_commit": git["commit"],
            "official_dirty": git["dirty"],
            "torch": torch.__version__,
            "input_seed": INPUT_SEED,
            "storage_dtype": args.storage_dtype,
            "description": NAMING if args.storage_dtype == "float16" else NAMING.replace("float16", "float32"),
            "note": (
                "Keys starting with '_' are not backbone cases. Each case: 'kwargs' are the "
                "DinoVisionTransformer constructor kwargs (plus block_fn=" + TINY_BLOCK_FN + ", as the official "
                "vit_* builders pass), 'weight_seed' seeds the randomisation of every parameter "
                "(cls_token/pos_embed/mask_token/register_tokens: 0.5*randn; LayerNorm weights: 1+0.1*randn; "
                "LayerScale gammas: 0.5+0.1*randn; everything else: 0.1*randn; drawn in named_parameters order "
                "from one torch.Generator)."
            ),
        }
    }

    for case, kw in TINY_CASES.items():
        seed = zlib.crc32(case.encode())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = DVT(**kw, block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention))
        randomize(model, seed)
        model.eval()
        tensors: dict[str, torch.Tensor] = {}
        sd = model.state_dict()
        for k, v in sd.items():
            tensors[f"state.{k}"] = stored(v)
        for k, v in inputs.items():
            tensors[f"in.{k}"] = stored(v)

        with torch.no_grad():
            for tag, x, masks in (
                ("square", inputs["x_square"], None),
                ("rect", inputs["x_rect"], None),
                ("big", inputs["x_big"], None),
                ("masked", inputs["x_square"], inputs["masks"]),
            ):
                ff = model.forward_features(x, masks=masks)
                for key in FF_KEYS:
                    tensors[f"out.ff_{tag}.{key}"] = contiguous_copy(ff[key])
            tensors["out.forward_square"] = contiguous_copy(model(inputs["x_square"]))

            x = inputs["x_rect"]
            for i, t in enumerate(model.get_intermediate_layers(x, n=2)):
                tensors[f"out.gil_n2.{i}"] = contiguous_copy(t)
            pairs = model.get_intermediate_layers(x, n=[0, 2], reshape=True, return_class_token=True, norm=True)
            assert len(pairs) == 2
            for i, (patch, cls) in enumerate(pairs):
                tensors[f"out.gil_idx_reshape_cls.{i}.patch"] = contiguous_copy(patch)
                tensors[f"out.gil_idx_reshape_cls.{i}.cls"] = contiguous_copy(cls)
            (t,) = model.get_intermediate_layers(x, n=1, norm=False)
            tensors["out.gil_nonorm.0"] = contiguous_copy(t)

            for tag in ("rect", "big"):
                x = inputs[f"x_{tag}"]
                # exactly what prepare_tokens_with_masks does: `B, nc, w, h = x.shape` (so its "w" is the height)
                _, _, w, h = x.shape
                tokens = model.patch_embed(x)
                tokens = torch.cat((model.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
                pos = model.interpolate_pos_encoding(tokens, w, h)
                # self-check against the official prepare_tokens_with_masks (registers are inserted after adding pos)
                prepared = model.prepare_tokens_with_masks(x)
                nreg = model.num_register_tokens
                prepared = torch.cat((prepared[:, :1], prepared[:, 1 + nreg :]), dim=1)
                torch.testing.assert_close(prepared, tokens + pos, rtol=0, atol=0)
                tensors[f"out.pos_{tag}"] = contiguous_copy(pos)

        # sanity: the non-interpolated square path really is the stored pos_embed, and forward == cls token
        assert torch.equal(tensors["out.forward_square"], tensors["out.ff_square.x_norm_clstoken"])

        kwargs_json = {k: _describe(v) for k, v in kw.items()}
        path = out_dir / f"tiny_{case}.safetensors"
        save_file(
            tensors,
            str(path),
            metadata=file_metadata(
                case=case,
                official_commit=git["commit"],
                kwargs=kwargs_json,
                block_fn=TINY_BLOCK_FN,
                weight_seed=seed,
                storage_dtype=args.storage_dtype,
                state_dict_keys=list(sd.keys()),
            ),
        )
        written.append(path)
        tiny_json[case] = {
            "kwargs": kwargs_json,
            "block_fn": TINY_BLOCK_FN,
            "weight_seed": seed,
            "file": path.name,
            "state_dict_keys": list(sd.keys()),
        }

    # ---- c. DINOHead -------------------------------------------------------------------------------------------------
    tiny_json["_dino_head"] = {}
    for name, kw in DINO_HEAD_CASES.items():
        seed = zlib.crc32(name.encode())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
            head = DINOHead(**kw)
        randomize(head, seed)
        head.eval()
        g = torch.Generator().manual_seed(seed + 1)
        x = fp16_exact(torch.randn(5, kw["in_dim"], generator=g))
        with torch.no_grad():
            bottleneck = head.mlp(x)
            y = head(x)
        sd = head.state_dict()
        tensors = {f"state.{k}": stored(v) for k, v in sd.items()}
        tensors["in.x"] = stored(x)
        tensors["out.bottleneck"] = contiguous_copy(bottleneck)
        tensors["out.y"] = contiguous_copy(y)
        path = out_dir / f"{name}.safetensors"
        save_file(
            tensors,
            str(path),
            metadata=file_metadata(
                case=name,
                official_commit=git["commit"],
                kwargs=kw,
                weight_seed=seed,
                input_seed=seed + 1,
                storage_dtype=args.storage_dtype,
                state_dict_keys=list(sd.keys()),
            ),
        )
        written.append(path)
        tiny_json["_dino_head"][name] = {
            "kwargs": kw,
            "weight_seed": seed,
            "input_seed": seed + 1,
            "file": path.name,
            "state_dict_keys": list(sd.keys()),
        }

    path = out_dir / "tiny_cases.json"
    path.write_text(_compact_json(tiny_json))
    written.append(path)

    # ---- d. init_seed0.json: the official initialisation under torch.manual_seed(0) ---------------------------------
    # Per-tensor statistics (sum, sum of squares, first values) of freshly built models, so a re-implementation can
    # check that the same seed draws the same initial weights, in the same order.
    init_cases = {
        "vit_reg2_ls": dict(INIT_VIT_KWARGS, num_register_tokens=2, init_values=1e-5),
        "vit_swiglu_nols": dict(INIT_VIT_KWARGS, ffn_layer="swiglufused", init_values=None),
    }
    init_json: dict = {"_meta": {"official_commit": git["commit"], "torch": torch.__version__, "seed": 0}}
    for name, kw in init_cases.items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = DVT(block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention), **kw)
        init_json[name] = {"kwargs": kw, "tensors": _init_stats(model.state_dict())}
    torch.manual_seed(0)
    head = DINOHead(in_dim=48, out_dim=100, nlayers=3, hidden_dim=32, bottleneck_dim=16)
    init_json["dino_head"] = {
        "kwargs": dict(in_dim=48, out_dim=100, nlayers=3, hidden_dim=32, bottleneck_dim=16),
        "tensors": _init_stats(head.state_dict()),
    }
    path = out_dir / "init_seed0.json"
    path.write_text(_compact_json(init_json))
    written.append(path)

    total = 0
    for p in written:
        size = p.stat().st_size
        total += size
        print(f"{size:>9}  {_sha256(p)[:16]}  {p}")
    print(f"{total:>9}  total")

    if args.check_against is not None:
        bad = [p.name for p in written if _sha256(p) != _sha256(args.check_against / p.name)]
        if bad:
            print(f"DIFFERENT from {args.check_against}: {bad}")
            return 1
        print(f"byte-identical to {args.check_against}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
