"""Batched feature extraction from a frozen backbone: the one forward loop behind `extract`, the evaluations,
visualisation and curation.

Features follow the official evaluation code: the CLS token after the final norm (`x_norm_clstoken`), the
patch tokens after the final norm, their mean ("avgpool" in the linear protocol) and the CLS tokens of the last 4
blocks, each through the final norm (`get_intermediate_layers(4, return_class_token=True)`, the linear protocol's
n_last_blocks=4 input; its last row is `cls`). On GPU the forward runs under bf16 (or fp16) autocast with
channels-last inputs; outputs always come back as float32 on the CPU.

`cached_features` is the entry point of the evaluations: it computes features once per (backbone weights, images,
transform, outputs, precision) and keeps them in a cache folder, so a second evaluation on the same data reuses them;
under torchrun every process computes a shard and the shards are gathered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from opendino import dist
from opendino.data.augment import make_eval_transform
from opendino.data.sources import ImageDataset, collate_skip_bad, list_images

__all__ = [
    "FeatureBatch",
    "FeatureSet",
    "autocast_for",
    "backbone_identity",
    "cached_features",
    "default_cache_dir",
    "extract_features",
    "iter_features",
    "pick_device",
]

OUTPUTS = ("cls", "mean", "patch", "cls_blocks")
CLS_BLOCKS = 4  # blocks whose CLS tokens `cls_blocks` holds (the linear protocol's largest n_last_blocks)
CACHE_VERSION = 1  # bump when the meaning of cached features changes
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """ "auto" -> the first CUDA device if there is one, else the CPU; anything else as torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} asked for, but no CUDA device is available")
    return device


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast context on CUDA for amp in {"bf16", "fp16"}; a no-op on CPU or with amp="none"."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=_AMP[amp])


@dataclass
class FeatureBatch:
    """Features of the good images of one batch; `bad` lists the (index, reason) of images that failed."""

    indices: Tensor  # (n,) dataset indices
    features: dict[str, Tensor]  # name -> (n, D) or (n, h*w, D), float32, CPU
    bad: list[tuple[int, str]] = field(default_factory=list)


@torch.inference_mode()
def iter_features(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    outputs: Sequence[str] = ("cls",),
    device: torch.device | None = None,
    amp: str = "bf16",
    channels_last: bool = True,
) -> Iterator[FeatureBatch]:
    """Run `model` over batches `(images | None, indices, bad)` (as `collate_skip_bad` makes them)."""
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}: expected some of {OUTPUTS}")
    device = device or next(model.parameters()).device
    for images, indices, bad in loader:
        if images is None:
            yield FeatureBatch(indices=indices, features={}, bad=list(bad))
            continue
        images = images.to(device, non_blocking=True)
        if channels_last and device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp):
            if "cls_blocks" in outputs:  # one pass gives the last blocks' tokens; the last one is forward_features'
                layers = model.get_intermediate_layers(images, CLS_BLOCKS, return_class_token=True)  # type: ignore[operator]
                patch, cls = layers[-1]
                cls_blocks = torch.stack([c for _, c in layers], dim=1)  # (B, 4, D)
            else:
                out = model.forward_features(images)  # type: ignore[operator]
                patch, cls = out["x_norm_patchtokens"], out["x_norm_clstoken"]
        feats: dict[str, Tensor] = {}
        if "cls" in outputs:
            feats["cls"] = cls.float().cpu()
        if "cls_blocks" in outputs:
            feats["cls_blocks"] = cls_blocks.float().cpu()
        if "mean" in outputs:
            feats["mean"] = patch.float().mean(dim=1).cpu()
        if "patch" in outputs:
            feats["patch"] = patch.float().cpu()
        yield FeatureBatch(indices=indices, features=feats, bad=list(bad))


@dataclass
class FeatureSet:
    """In-memory features of a list of images; rows align with `paths` (bad images are left out)."""

    paths: list[str]
    features: dict[str, np.ndarray]
    bad: list[tuple[str, str]]  # (path, reason)
    from_cache: bool = False  # read from the feature cache rather than computed now


def make_loader(
    paths: Sequence[str],
    transform,
    *,
    batch_size: int,
    num_workers: int,
    sampler: Sequence[int] | None = None,
    pin_memory: bool = False,
    max_pixels: int | None = None,
) -> DataLoader:
    """A DataLoader over `paths` (optionally only the indices of `sampler`, in that order) that skips bad images."""
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    dataset = ImageDataset(paths, transform, **kwargs)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def extract_features(
    backbone: torch.nn.Module | str | os.PathLike,
    data: str | os.PathLike | Sequence[str],
    *,
    outputs: Sequence[str] = ("cls",),
    transform=None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    amp: str = "bf16",
) -> FeatureSet:
    """Features of every image of a folder, list file or list of paths, in memory (see `opendino extract` to
    write large collections to disk). `transform` defaults to the official eval transform (256 -> 224 crop)."""
    from opendino.models.hub import load_backbone

    dev = pick_device(device)
    model = backbone if isinstance(backbone, torch.nn.Module) else load_backbone(os.fspath(backbone), device=dev)
    model = model.to(dev).eval()
    paths = list(data) if isinstance(data, list | tuple) else list_images(os.fspath(data))  # type: ignore[arg-type]
    loader = make_loader(paths, transform or make_eval_transform(), batch_size=batch_size, num_workers=num_workers)
    chunks: dict[str, list[Tensor]] = {k: [] for k in outputs}
    kept: list[int] = []
    bad: list[tuple[str, str]] = []
    for fb in iter_features(model, loader, outputs=outputs, device=dev, amp=amp):
        kept += fb.indices.tolist()
        bad += [(paths[i], reason) for i, reason in fb.bad]
        for k, v in fb.features.items():
            chunks[k].append(v)
    feats = {k: torch.cat(v).numpy() if v else np.zeros((0,), np.float32) for k, v in chunks.items()}
    return FeatureSet(paths=[paths[i] for i in kept], features=feats, bad=bad)


# ---------------------------------------------------------------------------------------------- the feature cache
def default_cache_dir() -> Path:
    """$OPENDINO_CACHE if set, else ~/.cache/opendino/features."""
    env = os.environ.get("OPENDINO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "opendino" / "features"


def backbone_identity(source: str | os.PathLike[str], seed: int = 0) -> dict[str, Any]:
    """What identifies a backbone's weights without reading them all: a preset name with its init seed, or the
    resolved file with its size, modification time and a hash of its first and last MiB."""
    from opendino.models.hub import RUN_BACKBONE_FILE, is_preset

    if is_preset(str(source)):
        return {"preset": str(source), "seed": seed}
    path = Path(source).expanduser()
    if (path / RUN_BACKBONE_FILE).exists():
        path = path / RUN_BACKBONE_FILE
    if path.is_dir():  # a Hugging Face folder: its weight files
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    else:
        files = [path]
    ident = []
    for f in files:
        st = f.stat()
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if st.st_size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
        ident.append(
            {"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_ends": h.hexdigest()}
        )
    return {"files": ident}


def _images_digest(paths: Sequence[str]) -> str:
    """Hash of the image list and of each file's size and modification time (an edited image changes the key)."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def _cache_spec(identity: dict[str, Any], paths: Sequence[str], transform, outputs: Sequence[str], amp: str) -> dict:
    """Everything that decides a cache entry's contents; its hash names the entry and it is kept as key.json."""
    return {
        "version": CACHE_VERSION,
        "backbone": identity,
        "images": _images_digest(paths),
        "n_images": len(paths),
        "transform": repr(transform),
        "outputs": sorted(outputs),
        "amp": amp,
    }


def _cache_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def _covering_entry(root: Path, spec: dict[str, Any]) -> Path | None:
    """A complete entry for the same weights, images, transform and precision whose outputs include the asked ones
    (`cls` is the last row of `cls_blocks`), e.g. the linear probe's features serving kNN."""
    want = set(spec["outputs"])
    same = {k: v for k, v in spec.items() if k != "outputs"}
    for key_file in sorted(root.glob("*/key.json")):
        try:
            other = json.loads(key_file.read_text())
        except (OSError, ValueError):
            continue
        if {k: v for k, v in other.items() if k != "outputs"} != same:
            continue
        have = set(other.get("outputs", []))
        if "cls_blocks" in have:
            have.add("cls")
        if want <= have and (key_file.parent / "features.json").exists():
            return key_file.parent
    return None


def _compute(
    model: torch.nn.Module,
    paths: Sequence[str],
    indices: Sequence[int],
    transform,
    *,
    outputs: Sequence[str],
    device: torch.device,
    amp: str,
    batch_size: int,
    num_workers: int,
    desc: str,
) -> tuple[list[int], dict[str, np.ndarray], list[tuple[int, str]]]:
    loader = make_loader(
        paths, transform, batch_size=batch_size, num_workers=num_workers, sampler=list(indices),
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    kept: list[int] = []
    bad: list[tuple[int, str]] = []
    chunks: dict[str, list[Tensor]] = {k: [] for k in outputs}
    bar = tqdm(total=len(indices), unit="img", desc=desc, dynamic_ncols=True, disable=None if dist.is_main() else True)
    for fb in iter_features(model, loader, outputs=outputs, device=device, amp=amp):
        kept += fb.indices.tolist()
        bad += fb.bad
        for k, v in fb.features.items():
            chunks[k].append(v)
        bar.update(len(fb.indices) + len(fb.bad))
        if bad:
            bar.set_postfix(bad=len(bad))
    bar.close()
    feats = {k: torch.cat(v).numpy() if v else np.zeros((0,), np.float32) for k, v in chunks.items()}
    return kept, feats, bad


def _write_part(folder: Path, name: str, kept: list[int], feats: dict[str, np.ndarray], bad: list) -> None:
    """Tensors first, then the JSON that marks them complete; both through a temporary name."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
    save_file({"index": np.asarray(kept, dtype=np.int64), **feats}, str(tmp))
    os.replace(tmp, folder / f"{name}.safetensors")
    meta_tmp = folder / f".{name}.json.{uuid.uuid4().hex}.tmp"
    meta_tmp.write_text(json.dumps({"bad": bad}))
    os.replace(meta_tmp, folder / f"{name}.json")


def _read_part(folder: Path, name: str) -> tuple[list[int], dict[str, np.ndarray], list[tuple[int, str]]]:
    arrays = load_file(str(folder / f"{name}.safetensors"))
    kept = arrays.pop("index").tolist()
    bad = [tuple(b) for b in json.loads((folder / f"{name}.json").read_text())["bad"]]
    return kept, arrays, bad  # type: ignore[return-value]


def _merge(parts: list[tuple[list[int], dict[str, np.ndarray], list]]) -> tuple[list[int], dict[str, np.ndarray], list]:
    """Rows of all parts in dataset order (the parts hold interleaved index shards)."""
    kept = [i for p in parts for i in p[0]]
    order = np.argsort(np.asarray(kept, dtype=np.int64), kind="stable")
    feats = {}
    for k in sorted({k for p in parts for k in p[1]}):
        rows = [p[1][k] for p in parts if p[0]]  # a part of only bad images has no rows (and no feature shape)
        feats[k] = np.concatenate(rows)[order] if rows else np.zeros((0,), np.float32)
    bad = sorted((b for p in parts for b in p[2]), key=lambda b: b[0])
    return [kept[i] for i in order], feats, bad


def cached_features(
    model: torch.nn.Module,
    paths: Sequence[str],
    transform,
    *,
    identity: dict[str, Any],
    outputs: Sequence[str] = ("cls",),
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | None = None,
    amp: str = "bf16",
    batch_size: int = 64,
    num_workers: int = 0,
    desc: str = "features",
) -> FeatureSet:
    """Features of `paths` through a deterministic `transform`, computed once and cached.

    The cache entry is named by a hash of `identity` (see `backbone_identity`), the image list with file sizes and
    modification times, `repr(transform)`, `outputs` and `amp`; `cache_dir=None` computes without caching. Under
    torchrun each process computes images rank::world_size; the parts are merged through the cache folder (which
    must then be shared by the processes) or, without a cache, gathered in memory. Every process returns the full set.
    """
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}: expected some of {OUTPUTS}")
    paths = [os.fspath(p) for p in paths]
    device = device or next(model.parameters()).device
    amp = amp if device.type == "cuda" else "none"  # CPU runs fp32: one cache entry whatever amp says
    rank, world = dist.rank(), dist.world_size()
    mine = range(rank, len(paths), world)
    compute = dict(outputs=outputs, device=device, amp=amp, batch_size=batch_size, num_workers=num_workers, desc=desc)
    hit = False
    if cache_dir is None:
        part = _compute(model, paths, mine, transform, **compute)  # type: ignore[arg-type]
        parts = dist.all_gather_object(part) if world > 1 else [part]
        kept, feats, bad = _merge(parts)
    else:
        root = Path(cache_dir).expanduser()
        spec = _cache_spec(identity, paths, transform, outputs, amp)
        folder = root / _cache_key(spec)
        hit = (folder / "features.json").exists()
        covering = None if hit or not root.is_dir() else _covering_entry(root, spec)
        if covering is not None:
            folder, hit = covering, True
        if not hit:
            part_name = f"part-{rank:05d}-of-{world:05d}"
            _write_part(folder, part_name, *_compute(model, paths, mine, transform, **compute))  # type: ignore[arg-type]
            dist.barrier()
            if dist.is_main():
                names = [f"part-{r:05d}-of-{world:05d}" for r in range(world)]
                _write_part(folder, "features", *_merge([_read_part(folder, n) for n in names]))
                for n in names:
                    (folder / f"{n}.safetensors").unlink(missing_ok=True)
                    (folder / f"{n}.json").unlink(missing_ok=True)
                (folder / "key.json").write_text(json.dumps(spec, indent=2))
            dist.barrier()
        kept, stored, bad = _read_part(folder, "features")
        feats = {k: stored[k] if k in stored else stored["cls_blocks"][:, -1] for k in outputs}
    fs = FeatureSet(paths=[paths[i] for i in kept], features=feats, bad=[(paths[i], r) for i, r in bad])
    fs.from_cache = cache_dir is not None and hit
    return fs
