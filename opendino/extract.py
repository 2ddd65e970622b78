"""`opendino extract`: features of an image collection written to disk in resumable shards.

Layout of the output folder:
    manifest.json                 what was extracted (backbone, data, transform, outputs) and, when done, the totals
    shard-00000.safetensors       tensors `index` (n,) int64 and `cls` / `mean` / `patch` as asked
      (or shard-00000.<name>.npy  one numpy file per tensor with format=npy)
    shard-00000.paths.txt         the n image paths, one per line, in row order
    shard-00000.bad.tsv           images of that shard that could not be read: path <TAB> reason
    bad_images.tsv                all of them, when the run is complete
Shard s covers images [s * shard_size, (s + 1) * shard_size) of the sorted list; bad images are left out of its rows.
Every file is written to a temporary name and renamed, and the paths file is renamed last, so a shard whose paths
file exists is complete: an interrupted run restarted with the same command continues with the first missing shard.
Under torchrun every process takes every world_size-th missing shard (each on its own GPU) and process 0 writes the
totals once all are done; one process or many write the same files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file
from tqdm import tqdm

from opendino import dist
from opendino.config import ConfigError, ExtractConfig, to_dict
from opendino.data.augment import make_eval_transform, make_resize_transform
from opendino.data.sources import list_images
from opendino.eval.features import FeatureBatch, iter_features, make_loader, pick_device
from opendino.models.hub import RUN_BACKBONE_FILE, is_preset, load_backbone

__all__ = ["ExtractionMismatch", "load_extracted", "run_extract"]

MANIFEST = "manifest.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExtractionMismatch(ConfigError):
    """The output folder holds (part of) an extraction with other settings or images; overwrite=true replaces it."""


def _backbone_identity(source: str) -> dict[str, Any]:
    if is_preset(source):
        return {"preset": source, "seed": 0}
    path = Path(source).expanduser()
    target = path / RUN_BACKBONE_FILE if (path / RUN_BACKBONE_FILE).exists() else path
    st = target.stat()
    return {"path": str(target.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _fingerprint(cfg: ExtractConfig, paths: list[str]) -> dict[str, Any]:
    """Everything that decides the contents of the shards: a resumed run must match it exactly."""
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    # change speed or place, not contents (the images themselves are in paths_sha256, whatever source listed them)
    ignored = {"num_workers", "overwrite", "compile", "out", "batch_size", "data"}
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ignored}
    return {"backbone": _backbone_identity(cfg.backbone), "n_images": len(paths), "paths_sha256": digest, **settings}


def _shard_path(out: Path, s: int, suffix: str) -> Path:
    return out / f"shard-{s:05d}{suffix}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_shard(out: Path, s: int, cfg: ExtractConfig, rows: dict[str, Any], paths: list[str]) -> None:
    tensors = {"index": torch.tensor(rows["index"], dtype=torch.int64)}
    for name, chunks in rows["features"].items():
        t = torch.cat(chunks) if chunks else torch.zeros((0, *rows["shapes"][name]))  # a shard of only bad images
        if cfg.normalize:
            t = F.normalize(t.float(), dim=-1)
        tensors[name] = t.to(_DTYPES[cfg.save_dtype]).contiguous()
    if cfg.format == "safetensors":
        tmp = _shard_path(out, s, ".safetensors.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, _shard_path(out, s, ".safetensors"))
    else:
        for name, t in tensors.items():
            final = _shard_path(out, s, f".{name}.npy")
            tmp = _shard_path(out, s, f".{name}.tmp.npy")
            np.save(tmp, t.numpy())
            os.replace(tmp, final)
    bad_lines = "".join(f"{paths[i]}\t{reason}\n" for i, reason in rows["bad"])
    _atomic_write_text(_shard_path(out, s, ".bad.tsv"), bad_lines)
    # last: the paths file marks the shard complete
    _atomic_write_text(_shard_path(out, s, ".paths.txt"), "".join(paths[i] + "\n" for i in rows["index"]))


def _prepare_out(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    if manifest.exists() and not overwrite:
        previous = json.loads(manifest.read_text())
        if previous.get("fingerprint") != fingerprint:
            changed = sorted(k for k in fingerprint if previous.get("fingerprint", {}).get(k) != fingerprint[k])
            raise ExtractionMismatch(
                f"{out} holds another extraction (differs in: {', '.join(changed)}); "
                "use another output folder or overwrite=true"
            )
        return
    for f in out.glob("shard-*"):
        f.unlink()
    (out / "bad_images.tsv").unlink(missing_ok=True)
    _atomic_write_text(manifest, json.dumps({"complete": False, "fingerprint": fingerprint}, indent=2))


def _pending_indices(out: Path, n_images: int, shard_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Image indices of the missing shards this process extracts: every world_size-th one, from its rank on."""
    n_shards = math.ceil(n_images / shard_size)
    todo = [s for s in range(n_shards) if not _shard_path(out, s, ".paths.txt").exists()][rank::world_size]
    return [i for s in todo for i in range(s * shard_size, min((s + 1) * shard_size, n_images))]


def _feature_shapes(cfg: ExtractConfig, patch_size: int, dim: int) -> dict[str, tuple[int, ...]]:
    """Per-image shape of each output; also checks that the input size fits the patch size."""
    h, w = cfg.full_image or (cfg.crop_size, cfg.crop_size)
    if h % patch_size or w % patch_size:
        key = "full_image" if cfg.full_image else "crop_size"
        raise ConfigError(f"{key}={getattr(cfg, key)}: must be a multiple of the backbone's patch size {patch_size}")
    return {"cls": (dim,), "mean": (dim,), "patch": ((h // patch_size) * (w // patch_size), dim)}


def _batches_by_shard(batches: Iterator[FeatureBatch], shard_size: int) -> Iterator[tuple[int, FeatureBatch]]:
    """Split batches at shard boundaries (indices arrive in increasing order)."""
    for fb in batches:
        shard_ids = torch.div(fb.indices, shard_size, rounding_mode="floor")
        bad_by_shard: dict[int, list] = {}
        for i, reason in fb.bad:
            bad_by_shard.setdefault(i // shard_size, []).append((i, reason))
        for s in sorted(set(shard_ids.tolist()) | set(bad_by_shard)):
            sel = shard_ids == s
            feats = {k: v[sel] for k, v in fb.features.items()}
            yield s, FeatureBatch(indices=fb.indices[sel], features=feats, bad=bad_by_shard.get(s, []))


def run_extract(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract, write and return the summary that also lands in manifest.json (under torchrun: on every process)."""
    device = pick_device(cfg.device)
    if dist.init_distributed(device) and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank())
    # ---- inputs and output folder
    paths = list_images(cfg.data)
    out = Path(cfg.out)
    fingerprint = _fingerprint(cfg, paths)
    if dist.is_main():
        _prepare_out(out, fingerprint, cfg.overwrite)
    dist.barrier()
    outputs = [k for k, on in (("cls", cfg.cls), ("mean", cfg.mean_pool), ("patch", cfg.patch_tokens)) if on]
    # ---- model
    torch.manual_seed(0)  # a preset name means random weights: make them the same on every (resumed) run
    model = load_backbone(cfg.backbone, device=device).eval()
    shapes = _feature_shapes(cfg, model.patch_size, model.embed_dim)
    if cfg.compile:
        # compile the method the loop calls: a compiled module's own .forward_features would bypass the compiler
        model.forward_features = torch.compile(model.forward_features)  # type: ignore[method-assign]
    transform = (
        make_resize_transform(cfg.full_image) if cfg.full_image else make_eval_transform(cfg.resize_size, cfg.crop_size)
    )
    # ---- loop over what is missing (every process lists it before any writes a shard)
    todo = _pending_indices(out, len(paths), cfg.shard_size, dist.rank(), dist.world_size())
    dist.barrier()
    loader = make_loader(
        paths,
        transform,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        sampler=todo,
        pin_memory=device.type == "cuda",
        max_pixels=cfg.max_image_pixels,
    )
    started, n_done, n_bad = time.perf_counter(), 0, 0
    current: int = -1
    rows: dict[str, Any] = {}
    bar = tqdm(total=len(todo), unit="img", desc="extract", initial=0, dynamic_ncols=True, disable=None)
    batches = iter_features(model, loader, outputs=outputs, device=device, amp=cfg.amp, channels_last=cfg.channels_last)
    for s, fb in _batches_by_shard(batches, cfg.shard_size):
        if s != current:
            if current >= 0:
                _write_shard(out, current, cfg, rows, paths)
            current, rows = s, {"index": [], "features": {k: [] for k in outputs}, "bad": [], "shapes": shapes}
        rows["index"] += fb.indices.tolist()
        rows["bad"] += fb.bad
        for k, v in fb.features.items():
            rows["features"][k].append(v)
        n_done += len(fb.indices) + len(fb.bad)
        n_bad += len(fb.bad)
        bar.update(len(fb.indices) + len(fb.bad))
        bar.set_postfix(bad=n_bad)
    if current >= 0:
        _write_shard(out, current, cfg, rows, paths)
    bar.close()
    n_done = int(dist.all_reduce(torch.tensor(n_done, dtype=torch.int64, device=device)).item())
    summary = (
        _finish(out, fingerprint, outputs, len(paths), n_done, time.perf_counter() - started)
        if dist.is_main()
        else None
    )
    return dist.broadcast_object(summary)  # type: ignore[return-value]


def _finish(out: Path, fingerprint: dict, outputs: list[str], n_images: int, n_new: int, seconds: float) -> dict:
    bad_lines = []
    for f in sorted(out.glob("shard-*.bad.tsv")):
        bad_lines += f.read_text().splitlines(keepends=True)
    _atomic_write_text(out / "bad_images.tsv", "".join(bad_lines))
    summary = {
        "complete": True,
        "fingerprint": fingerprint,
        "outputs": outputs,
        "n_images": n_images,
        "n_features": n_images - len(bad_lines),
        "n_bad": len(bad_lines),
        "n_shards": len(list(out.glob("shard-*.paths.txt"))),
        "processed_this_run": n_new,
        "seconds_this_run": round(seconds, 3),
        "images_per_second_this_run": round(n_new / seconds, 2) if seconds > 0 else None,
    }
    _atomic_write_text(out / MANIFEST, json.dumps(summary, indent=2))
    return summary


def load_extracted(out: str | Path) -> dict[str, Any]:
    """Read a finished extraction back: {"paths": [...], "index": (n,), "cls" / "mean" / "patch": arrays} in
    image order (numpy; bfloat16 shards are returned as float32)."""
    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text())
    if not manifest.get("complete"):
        raise ValueError(f"{out}: extraction not complete; rerun the same `opendino extract` command to finish it")
    parts: dict[str, list] = {}
    paths: list[str] = []
    for paths_file in sorted(out.glob("shard-*.paths.txt")):
        stem = paths_file.name[: -len(".paths.txt")]
        paths += paths_file.read_text().splitlines()
        if (out / f"{stem}.safetensors").exists():
            arrays = _load_safetensors(out / f"{stem}.safetensors")
        else:
            arrays = {f.name.split(".")[1]: np.load(f) for f in sorted(out.glob(f"{stem}.*.npy"))}
        for k, v in arrays.items():
            parts.setdefault(k, []).append(v)
    result: dict[str, Any] = {k: np.concatenate(v) for k, v in parts.items()}
    result["paths"] = paths
    return result


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_np(str(path))
    except (TypeError, ValueError):  # bfloat16 has no numpy dtype: go through torch
        from safetensors.torch import load_file

        return {k: v.float().numpy() for k, v in load_file(str(path)).items()}
