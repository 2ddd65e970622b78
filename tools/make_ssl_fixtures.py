#!/usr/bin/env python
"""Generate the training-step parity fixture (tests/fixtures/official/ssl_step.safetensors) from the OFFICIAL code.

This script is ours and is never imported by opendino or its tests; they only read the numbers it writes.

It builds the official `SSLMetaArch` (`dinov2/train/ssl_meta_arch.py`) from `dinov2/configs/ssl_default_config.yaml`
plus the small overrides of `OVERRIDES`, gives it seeded random weights, collates one batch of B = 3 random images
with the official `collate_data_and_cast` and `MaskingGenerator`, and runs one `forward_backward(batch,
teacher_temp=TEACHER_TEMP)` per case of `CASES` (iBOT head shared with the DINO head or separate, x softmax centring or
Sinkhorn-Knopp). CPU, float32, one thread, a one-process gloo group (the official iBOT Sinkhorn-Knopp all-reduces
without checking for one). What it has to stand in for, none of which changes a number:

- `XFORMERS_DISABLED=1`, and a stub `xformers.ops` module holding only `fmha.BlockDiagonalMask` (concatenate a list
  of (1, n_i, D) tensors along dim 1, split back): `ssl_meta_arch` refuses to import without it and uses it for its
  one student-head call; the stub has no `cross_entropy`, so the iBOT loss takes its pure-PyTorch path;
- a stub `fvcore.common.checkpoint.Checkpointer` (imported by `dinov2.fsdp`, unused here), and the package
  `dinov2.train` registered without running its `__init__` (which imports the training script and its
  dependencies); the config is the YAML file read with PyYAML into a dict read by attribute (no OmegaConf);
- the student backbone runs on the list [global crops, local crops]; the official nested-tensor block needs xFormers
  for lists, so each block here runs the plain block on each list element (what xFormers' block-diagonal attention
  computes; exact with drop_path_rate = 0);
- `torch.Tensor.cuda` returns the tensor itself and the FSDP stream synchronisation is skipped (CPU);
- the architecture `vit_parity_tiny` (`TINY_ARCH`, like the official `vit_small` builder) is registered in
  `dinov2.models.vision_transformer`, so that `build_model_from_cfg` can build a model small enough for a fixture;
- the teacher is loaded from the student, as `prepare_for_distributed_training` does before training.

Stored (every crop-stacked tensor crop-major; teacher targets in the natural crop order, i.e. with the official
reversal of the teacher's two global crops undone):

- `state.<key>`: the student's state dict (`backbone.*`, `dino_head.*`, `ibot_head.*`; the shared-head cases ignore
  `ibot_head.*`), float16 storage of values float16 represents exactly (use `.float()`); the teacher starts equal;
- `center.dino` (1, K), `center.ibot_shared` (1, 1, K), `center.ibot_separate` (1, 1, K_ibot): the centres before
  the step (random, so that centring matters), float16 storage, exact;
- `batch.global_crops` (2B, 3, 32, 32), `batch.local_crops` (2B, 3, 16, 16) (float16 storage, exact),
  `batch.masks` (2B, 16) bool, `batch.mask_indices`, `batch.masks_weight`, `batch.n_masked_patches` (1,),
  `batch.upperbound` (): the official collate output;
- per case `<case>.`: `loss.<name>` the returned loss dict (`dino_local_crops_loss`, `dino_global_crops_loss`,
  `koleo_loss` = koleo_loss_weight * KoLeo / 2, `ibot_loss` = iBOT / 2) and `loss.total` (the backpropagated
  `loss_accumulator`); `teacher.dino` (2B, K) and `teacher.ibot` (M, K_ibot), the teacher targets;
  `center_after.dino`, `center_after.ibot` (the official centre update is deferred: it is applied here with
  `apply_center_update()`); `grad.<param>` the gradients of `GRAD_PARAMS`; `grad_norm.<param>` the L2 norm of the
  gradient of every student parameter.

The metadata entry `meta` (JSON) holds the sizes, overrides, cases, student key order, official commit and torch
version. Usage (from the repository root; deterministic: a rerun writes a byte-identical file):

    python tools/make_ssl_fixtures.py --official /path/to/dinov2 --out tests/fixtures/official/ssl_step.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import types
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

B, N_LOCAL, GLOBAL_SIZE, LOCAL_SIZE, PATCH = 3, 2, 32, 16, 8
TEACHER_TEMP = 0.05
TINY_ARCH = {"embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 4}
OVERRIDES: dict[str, Any] = {
    "compute_precision": {"grad_scaler": False},
    "student": {
        "arch": "vit_parity_tiny",
        "patch_size": PATCH,
        "drop_path_rate": 0.0,
        "layerscale": 0.1,
        "block_chunks": 0,
        "ffn_layer": "mlp",
    },
    "crops": {"global_crops_size": GLOBAL_SIZE, "local_crops_size": LOCAL_SIZE, "local_crops_number": N_LOCAL},
    "dino": {"head_n_prototypes": 64, "head_bottleneck_dim": 16, "head_hidden_dim": 32, "head_nlayers": 3},
    "ibot": {"head_n_prototypes": 48, "head_bottleneck_dim": 16, "head_hidden_dim": 32, "head_nlayers": 3},
}
CASES = {  # name: (ibot.separate_head, train.centering)
    "shared_centering": (False, "centering"),
    "shared_sinkhorn": (False, "sinkhorn_knopp"),
    "separate_centering": (True, "centering"),
    "separate_sinkhorn": (True, "sinkhorn_knopp"),
}
GRAD_PARAMS = (
    "backbone.cls_token",
    "backbone.mask_token",
    "backbone.patch_embed.proj.weight",
    "backbone.blocks.0.attn.qkv.weight",
    "backbone.blocks.1.ls2.gamma",
    "backbone.norm.weight",
    "dino_head.mlp.0.weight",
    "dino_head.last_layer.weight_g",
    "dino_head.last_layer.weight_v",
    "ibot_head.mlp.0.weight",
    "ibot_head.last_layer.weight_v",
)
MASK_SEED = 3  # python `random` seed of the collate: crops 1, 4, 5 of 6 masked (4 + 2 + 7 = 13 tokens)


class _AttrDict(dict):
    """A nested dict read and written by attribute, enough of OmegaConf for `SSLMetaArch` and `build_model`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    @classmethod
    def wrap(cls, value: Any) -> Any:
        return cls({k: cls.wrap(v) for k, v in value.items()}) if isinstance(value, dict) else value


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for k, v in overrides.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) else v
    return out


class _BlockDiagonalMask:
    """Stand-in for xFormers' `fmha.BlockDiagonalMask` as the official step uses it: one head call on a list."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    @classmethod
    def from_tensor_list(cls, tensors: list[torch.Tensor]) -> tuple[_BlockDiagonalMask, torch.Tensor]:
        assert all(t.shape[0] == 1 for t in tensors)
        return cls([t.shape[1] for t in tensors]), torch.cat(tensors, dim=1)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.split(self.sizes, dim=1))


def _official(path: Path) -> types.SimpleNamespace:
    os.environ["XFORMERS_DISABLED"] = "1"
    ops = types.ModuleType("xformers.ops")
    ops.fmha = types.SimpleNamespace(BlockDiagonalMask=_BlockDiagonalMask)  # type: ignore[attr-defined]
    xformers = types.ModuleType("xformers")
    xformers.ops = ops  # type: ignore[attr-defined]
    checkpoint = types.ModuleType("fvcore.common.checkpoint")
    checkpoint.Checkpointer = object  # type: ignore[attr-defined]
    sys.modules.update(
        {
            "xformers": xformers,
            "xformers.ops": ops,
            "fvcore": types.ModuleType("fvcore"),
            "fvcore.common": types.ModuleType("fvcore.common"),
            "fvcore.common.checkpoint": checkpoint,
        }
    )
    sys.path.insert(0, str(path))
    # `dinov2.train` without its __init__, which imports the whole training script (fvcore, omegaconf, datasets)
    train_pkg = types.ModuleType("dinov2.train")
    train_pkg.__path__ = [str(path / "dinov2" / "train")]
    sys.modules["dinov2.train"] = train_pkg
    import dinov2.models.vision_transformer as vits
    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.masking import MaskingGenerator
    from dinov2.layers.block import Block, NestedTensorBlock
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    nested_forward = NestedTensorBlock.forward

    def forward(self, x_or_x_list):  # type: ignore[no-untyped-def]
        if isinstance(x_or_x_list, list):
            assert not (self.training and self.sample_drop_ratio > 0)
            return [Block.forward(self, x) for x in x_or_x_list]
        return nested_forward(self, x_or_x_list)

    NestedTensorBlock.forward = forward

    def vit_parity_tiny(patch_size: int = 16, num_register_tokens: int = 0, **kwargs: Any) -> Any:
        return vits.DinoVisionTransformer(
            patch_size=patch_size,
            **TINY_ARCH,
            block_fn=partial(vits.Block, attn_class=vits.MemEffAttention),
            num_register_tokens=num_register_tokens,
            **kwargs,
        )

    vits.vit_parity_tiny = vit_parity_tiny
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    default = yaml.safe_load((path / "dinov2/configs/ssl_default_config.yaml").read_text())
    return types.SimpleNamespace(
        SSLMetaArch=SSLMetaArch,
        collate=collate_data_and_cast,
        MaskingGenerator=MaskingGenerator,
        default_cfg=default,
    )


def _commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _exact_half(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to float16 (stored as such; the model computes in float32 with the same values)."""
    return x.half()


def _random_state(state: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded values for every entry, in state-dict order, scaled so that no part is negligible."""
    out = {}
    for name, v in state.items():
        r = torch.randn(v.shape, generator=g)
        if name.endswith(("cls_token", "pos_embed", "mask_token")):
            r = 0.5 * r
        elif ".norm" in name and name.endswith(".weight"):
            r = 1 + 0.1 * r
        elif name.endswith(".gamma"):
            r = 0.5 + 0.1 * r
        elif name.endswith("weight_g"):
            r = 1 + 0.1 * r
        else:
            r = 0.1 * r
        out[name] = _exact_half(r)
    return out


def _swap_crops(x: torch.Tensor) -> torch.Tensor:
    """[crop 0; crop 1] <-> [crop 1; crop 0] along rows: undoes the teacher's crop reversal (its own inverse)."""
    first, second = x.chunk(2)
    return torch.cat((second, first))


def _batch(off: types.SimpleNamespace, g: torch.Generator) -> dict[str, Any]:
    samples = [
        (
            {
                "global_crops": [
                    _exact_half(torch.randn(3, GLOBAL_SIZE, GLOBAL_SIZE, generator=g)).float() for _ in range(2)
                ],
                "local_crops": [
                    _exact_half(torch.randn(3, LOCAL_SIZE, LOCAL_SIZE, generator=g)).float() for _ in range(N_LOCAL)
                ],
            },
            None,
        )
        for _ in range(B)
    ]
    grid = GLOBAL_SIZE // PATCH
    generator = off.MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)  # train.py L170
    ibot = off.default_cfg["ibot"]
    random.seed(MASK_SEED)
    return off.collate(
        samples,
        mask_ratio_tuple=tuple(ibot["mask_ratio_min_max"]),
        mask_probability=ibot["mask_sample_probability"],
        dtype=torch.float32,
        n_tokens=grid * grid,
        mask_generator=generator,
    )


def _run_case(
    off: types.SimpleNamespace,
    cfg: _AttrDict,
    state: dict[str, torch.Tensor],
    centers: dict[str, torch.Tensor],
    batch: dict[str, Any],
) -> dict[str, torch.Tensor]:
    model = off.SSLMetaArch(cfg)
    student_state = {k: v.float() for k, v in state.items() if k in model.student.state_dict()}
    model.student.load_state_dict(student_state, strict=True)
    model.teacher.load_state_dict(student_state, strict=True)
    model.dino_loss.center = centers["dino"].float().clone()
    model.ibot_patch_loss.center = centers["ibot"].float().clone()
    model.need_to_synchronize_fsdp_streams = False  # torch.cuda.synchronize() on CPU

    rec: dict[str, torch.Tensor] = {}

    def record(obj: Any, method: str, key: str, post: Any) -> None:
        fn = getattr(obj, method)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            rec[key] = post(out).clone()
            return out

        setattr(obj, method, wrapper)

    record(model.dino_loss, "softmax_center_teacher", "teacher.dino", _swap_crops)
    record(model.dino_loss, "sinkhorn_knopp_teacher", "teacher.dino", _swap_crops)
    record(model.ibot_patch_loss, "softmax_center_teacher", "teacher.ibot", lambda t: t.squeeze(0))
    record(model.ibot_patch_loss, "sinkhorn_knopp_teacher", "teacher.ibot", lambda t: t)

    def backprop(loss: torch.Tensor) -> None:
        rec["loss.total"] = loss.detach().clone()
        loss.backward()

    model.backprop_loss = backprop
    batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}  # all_reduce in place
    losses = model.forward_backward(batch, teacher_temp=TEACHER_TEMP)
    for name, value in losses.items():
        rec[f"loss.{name}"] = value.detach().clone()
    model.dino_loss.apply_center_update()
    model.ibot_patch_loss.apply_center_update()
    rec["center_after.dino"] = model.dino_loss.center.clone()
    rec["center_after.ibot"] = model.ibot_patch_loss.center.clone()
    params = dict(model.student.named_parameters())
    for name in GRAD_PARAMS:
        if name in params:
            rec[f"grad.{name}"] = params[name].grad.clone()
    for name, p in params.items():
        rec[f"grad_norm.{name}"] = p.grad.norm()
    return rec


def make(official: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    off = _official(official)
    g = torch.Generator().manual_seed(0)
    cfgs = {
        case: _AttrDict.wrap(
            _merge(
                off.default_cfg,
                {**OVERRIDES, "ibot": {**OVERRIDES["ibot"], "separate_head": sep}, "train": {"centering": centering}},
            )
        )
        for case, (sep, centering) in CASES.items()
    }
    full = off.SSLMetaArch(cfgs["separate_centering"])  # has every student key
    state = _random_state(full.student.state_dict(), g)
    k_dino, k_ibot = OVERRIDES["dino"]["head_n_prototypes"], OVERRIDES["ibot"]["head_n_prototypes"]
    centers = {
        "dino": _exact_half(0.1 * torch.randn(1, k_dino, generator=g)),
        "ibot_shared": _exact_half(0.1 * torch.randn(1, 1, k_dino, generator=g)),
        "ibot_separate": _exact_half(0.1 * torch.randn(1, 1, k_ibot, generator=g)),
    }
    batch = _batch(off, g)

    t: dict[str, torch.Tensor] = {f"state.{k}": v for k, v in state.items()}
    t.update({f"center.{k}": v for k, v in centers.items()})
    t["batch.global_crops"] = _exact_half(batch["collated_global_crops"])
    t["batch.local_crops"] = _exact_half(batch["collated_local_crops"])
    t["batch.masks"] = batch["collated_masks"]
    t["batch.mask_indices"] = batch["mask_indices_list"]
    t["batch.masks_weight"] = batch["masks_weight"]
    t["batch.n_masked_patches"] = batch["n_masked_patches"]
    t["batch.upperbound"] = torch.tensor(batch["upperbound"], dtype=torch.long)
    for case, (sep, _) in CASES.items():
        case_centers = {"dino": centers["dino"], "ibot": centers["ibot_separate" if sep else "ibot_shared"]}
        rec = _run_case(off, cfgs[case], state, case_centers, batch)
        t.update({f"{case}.{k}": v for k, v in rec.items()})

    t = {k: v.detach().contiguous() for k, v in t.items()}
    meta = {
        "B": B,
        "n_local_crops": N_LOCAL,
        "global_crops_size": GLOBAL_SIZE,
        "local_crops_size": LOCAL_SIZE,
        "patch_size": PATCH,
        "teacher_temp": TEACHER_TEMP,
        "tiny_arch": TINY_ARCH,
        "defaults": {  # the values of ssl_default_config.yaml that the step uses and OVERRIDES leaves alone
            "dino.loss_weight": off.default_cfg["dino"]["loss_weight"],
            "dino.koleo_loss_weight": off.default_cfg["dino"]["koleo_loss_weight"],
            "ibot.loss_weight": off.default_cfg["ibot"]["loss_weight"],
            "ibot.mask_sample_probability": off.default_cfg["ibot"]["mask_sample_probability"],
            "ibot.mask_ratio_min_max": off.default_cfg["ibot"]["mask_ratio_min_max"],
        },
        "overrides": OVERRIDES,
        "cases": {case: {"separate_head": sep, "centering": c} for case, (sep, c) in CASES.items()},
        "mask_seed": MASK_SEED,
        "n_masked_patches": int(batch["mask_indices_list"].shape[0]),
        "student_state_keys": list(state),
        "official_commit": _commit(official),
        "torch": torch.__version__,
    }
    # one metadata entry: safetensors writes several in no fixed order, and reruns must be byte-identical
    return t, {"meta": json.dumps(meta)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, type=Path, help="checkout of facebookresearch/dinov2")
    parser.add_argument("--out", default=Path("tests/fixtures/official/ssl_step.safetensors"), type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "`torch.cuda.amp.autocast", FutureWarning)  # KoLeoLoss.forward
    warnings.filterwarnings("ignore", "xFormers is (not available|disabled)", UserWarning)
    warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm`", FutureWarning)  # DINOHead
    with tempfile.TemporaryDirectory() as tmp:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        try:
            tensors, meta = make(args.official)
        finally:
            torch.distributed.destroy_process_group()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=meta)
    print(f"wrote {len(tensors)} tensors to {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
