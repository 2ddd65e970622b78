"""Build the real-data curation experiment of docs/curation.md from ../shared/data (no downloads).

    python tools/make_curation_pool.py --data ../shared/data --out /tmp/curation-pool

writes under --out:
- ``pool_imagenette.txt``: Imagenette train images (the seed images below left out), one path per line;
- ``cifar/<class>/*.png``: CIFAR-10 train images (``--cifar-per-class`` per class) upsampled to 112 px (bicubic);
- CamVid train frames are used in place (``<data>/camvid/train/images``);
- ``planted/``: near-duplicates of random pool images in three strengths (``KINDS``: light keeps 95-100 % of the
  side, medium 88-95 %, strong 80-88 %; each resized back, brightness / contrast jittered, JPEG re-encoded), and
  ``planted_eval/``: such copies of Imagenette val images (the evaluation set), with ``planted.tsv`` (copy,
  original, kind) to score the deduplication;
- ``seeds_<class>.txt``: the first ``--seeds-per-class`` train images of each seed class;
- ``curate.yaml``: the `opendino curate` config of the experiment (backbone to be given on the command line).

Everything is drawn from ``numpy.random.default_rng(--seed)``: the same arguments give the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

SEED_CLASSES = {"n03445777": "golf_ball", "n03888257": "parachute", "n03028079": "church"}


# (smallest, largest) share of the side kept by the crop, and the JPEG quality range, per kind of planted copy
KINDS = {"light": ((0.95, 1.0), (60, 90)), "medium": ((0.88, 0.95), (55, 85)), "strong": ((0.80, 0.88), (50, 80))}


def _augmented_copy(src: str, dst: Path, kind: str, rng: np.random.Generator) -> None:
    """A near-duplicate: a crop (share of the side by kind) resized back, brightness / contrast +-10 % (+-15 % for
    "strong"), JPEG re-encoding."""
    (low, high), (q_low, q_high) = KINDS[kind]
    img = Image.open(src).convert("RGB")
    w, h = img.size
    scale = rng.uniform(low, high)
    cw, ch = int(w * scale), int(h * scale)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
    jitter = 0.15 if kind == "strong" else 0.10
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - jitter, 1 + jitter))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - jitter, 1 + jitter))
    img.save(dst, quality=int(rng.integers(q_low, q_high + 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data", help="the shared data folder")
    parser.add_argument("--out", required=True, help="where the pool files go")
    parser.add_argument("--cifar-per-class", type=int, default=200)
    parser.add_argument("--seeds-per-class", type=int, default=40)
    parser.add_argument("--planted", type=int, default=300, help="augmented copies of pool images")
    parser.add_argument("--planted-eval", type=int, default=50, help="augmented copies of evaluation images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    rng = np.random.default_rng(args.seed)
    out.mkdir(parents=True, exist_ok=True)

    train = sorted((data / "imagenette" / "train").glob("*/*.jpg"))
    seeds: dict[str, list[str]] = {}
    for wnid, name in SEED_CLASSES.items():
        seeds[name] = [str(p) for p in sorted((data / "imagenette" / "train" / wnid).glob("*.jpg"))]
        seeds[name] = seeds[name][: args.seeds_per_class]
        (out / f"seeds_{name}.txt").write_text("".join(p + "\n" for p in seeds[name]))
    held_out = {p for s in seeds.values() for p in s}
    imagenette = [str(p) for p in train if str(p) not in held_out]
    (out / "pool_imagenette.txt").write_text("".join(p + "\n" for p in imagenette))

    cifar = np.load(data / "cifar10" / "train.npz")
    classes = [str(c) for c in cifar["classes"]]
    cifar_paths = []
    for label, name in enumerate(classes):
        folder = out / "cifar" / name
        folder.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(np.flatnonzero(cifar["labels"] == label)[: args.cifar_per_class]):
            path = folder / f"{name}_{j:04d}.png"
            Image.fromarray(cifar["images"][i]).resize((112, 112), Image.BICUBIC).save(path)
            cifar_paths.append(str(path))
    camvid = data / "camvid" / "train" / "images"
    camvid_paths = [str(p) for p in sorted(camvid.glob("*"))]

    lines = []
    pool = imagenette + cifar_paths + camvid_paths
    (out / "planted").mkdir(exist_ok=True)
    kinds = list(KINDS)
    for j, i in enumerate(rng.choice(len(pool), args.planted, replace=False)):
        kind = kinds[j % len(kinds)]
        dst = out / "planted" / f"copy_{j:04d}_{kind}.jpg"
        _augmented_copy(pool[i], dst, kind, rng)
        lines.append(f"{dst}\t{pool[i]}\t{kind}\n")
    val = sorted((data / "imagenette" / "val").glob("*/*.jpg"))
    (out / "planted_eval").mkdir(exist_ok=True)
    for j, i in enumerate(rng.choice(len(val), args.planted_eval, replace=False)):
        kind = kinds[j % len(kinds)]
        dst = out / "planted_eval" / f"evalcopy_{j:04d}_{kind}.jpg"
        _augmented_copy(str(val[i]), dst, kind, rng)
        lines.append(f"{dst}\t{val[i]}\t{kind}\n")
    (out / "planted.tsv").write_text("".join(lines))

    seed_sets = "".join(f"  - {{name: {n}, data: {out / f'seeds_{n}.txt'}}}\n" for n in seeds)
    (out / "curate.yaml").write_text(
        "# the real-data curation experiment of docs/curation.md (tools/make_curation_pool.py)\n"
        f"pool:\n  - {out / 'pool_imagenette.txt'}\n  - {out / 'cifar'}\n  - {camvid}\n"
        f"  - {out / 'planted'}\n  - {out / 'planted_eval'}\n"
        f"seeds:\n{seed_sets}"
        f"dedup:\n  eval_sets: [{data / 'imagenette' / 'val'}]\n"
    )
    n_pool = len(pool) + args.planted + args.planted_eval
    print(f"pool: {n_pool} images ({len(imagenette)} imagenette, {len(cifar_paths)} cifar, {len(camvid_paths)} "
          f"camvid, {args.planted} + {args.planted_eval} planted copies); seeds: "
          f"{', '.join(f'{n} {len(s)}' for n, s in seeds.items())}; config {out / 'curate.yaml'}")  # fmt: skip


if __name__ == "__main__":
    main()
