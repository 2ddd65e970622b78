"""`opendino extract` end to end: odd files, shards readable by numpy, exact resume, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from opendino.cli import main
from opendino.config import ConfigError, ExtractConfig
from opendino.extract import load_extracted, run_extract


def _odd_folder(root: Path) -> dict[str, bool]:
    """A folder of good and bad files; returns {name: expected to decode}."""
    rng = np.random.default_rng(0)
    root.mkdir()
    expected = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        img.save(root / name, **kw)
        expected[name] = True

    for i in range(7):
        save(f"good_{i}.jpg", Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)))
    save("cmyk.jpg", Image.new("CMYK", (30, 40), (10, 200, 30, 0)))
    save("gray16.png", Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)))
    pal = Image.new("P", (32, 32))
    pal.info["transparency"] = 0
    save("palette_alpha.png", pal)
    rot = Image.fromarray(rng.integers(0, 255, (20, 60, 3), dtype=np.uint8))
    exif = rot.getexif()
    exif[0x0112] = 6
    save("rotated.jpg", rot, exif=exif)
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    good = (root / "good_0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("1", (20000, 20000)).save(root / "bomb.png")  # 400 Mpx in a few kB
    expected.update({"zero.jpg": False, "text.png": False, "truncated.jpg": False, "bomb.png": False})
    return expected


def _cfg(data: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(backbone="debug", data=str(data), out=str(out), resize_size=32, crop_size=32, batch_size=3)
    return ExtractConfig(**{**dict(num_workers=0, shard_size=4, device="cpu"), **base, **kw})


@pytest.fixture
def odd(tmp_path):
    return tmp_path / "images", _odd_folder(tmp_path / "images")


def test_bad_files_are_skipped_counted_and_listed(odd, tmp_path):
    folder, expected = odd
    summary = run_extract(_cfg(folder, tmp_path / "out", num_workers=2, mean_pool=True, patch_tokens=True))
    n_good = sum(expected.values())
    assert summary["n_images"] == len(expected) and summary["n_features"] == n_good
    assert summary["n_bad"] == len(expected) - n_good
    bad = dict(line.split("\t") for line in (tmp_path / "out" / "bad_images.tsv").read_text().splitlines())
    assert {Path(p).name for p in bad} == {n for n, ok in expected.items() if not ok}
    assert "decompression bomb" in bad[str(folder / "bomb.png")]
    feats = load_extracted(tmp_path / "out")
    assert feats["cls"].shape == (n_good, 96) and feats["mean"].shape == (n_good, 96)
    assert feats["patch"].shape == (n_good, 16, 96)
    assert sorted(Path(p).name for p in feats["paths"]) == sorted(n for n, ok in expected.items() if ok)
    np.testing.assert_allclose(feats["mean"], feats["patch"].mean(1), atol=1e-6)


def test_shards_open_with_plain_numpy(odd, tmp_path):
    folder, _ = odd
    run_extract(_cfg(folder, tmp_path / "st"))
    shard = load_file(str(tmp_path / "st" / "shard-00000.safetensors"))
    paths = (tmp_path / "st" / "shard-00000.paths.txt").read_text().splitlines()
    assert shard["cls"].dtype == np.float32 and len(paths) == len(shard["index"]) == shard["cls"].shape[0]
    run_extract(_cfg(folder, tmp_path / "npy", format="npy", save_dtype="float16"))
    cls = np.load(tmp_path / "npy" / "shard-00000.cls.npy")
    assert cls.dtype == np.float16
    a, b = load_extracted(tmp_path / "st"), load_extracted(tmp_path / "npy")
    assert a["paths"] == b["paths"]
    np.testing.assert_allclose(a["cls"], b["cls"].astype(np.float32), atol=2e-3, rtol=1e-2)


def test_features_match_a_direct_forward(tmp_path):
    from opendino.data.augment import make_eval_transform
    from opendino.data.sources import load_image
    from opendino.models.hub import build_backbone

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    run_extract(_cfg(folder, tmp_path / "out", resize_size=40, crop_size=32))
    feats = load_extracted(tmp_path / "out")
    torch.manual_seed(0)
    model = build_backbone("debug").eval()
    x = torch.stack([make_eval_transform(40, 32)(load_image(p)) for p in feats["paths"]])
    with torch.no_grad():
        np.testing.assert_allclose(feats["cls"], model(x).numpy(), atol=1e-5)


def test_interrupted_run_resumes_where_it_stopped(odd, tmp_path, monkeypatch):
    folder, _ = odd
    clean = load_extracted(tmp_path / "clean") if run_extract(_cfg(folder, tmp_path / "clean")) else None
    import opendino.extract as ex

    real_write, calls = ex._write_shard, []

    def write_then_die(out, s, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the third shard is in flight
        calls.append(s)
        real_write(out, s, *args)

    monkeypatch.setattr(ex, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_extract(_cfg(folder, tmp_path / "out"))
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]
    first = tmp_path / "out" / "shard-00000.safetensors"
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(ex, "_write_shard", real_write)
    summary = run_extract(_cfg(folder, tmp_path / "out"))
    assert first.stat().st_mtime_ns == stamp  # finished shards are not redone
    assert summary["processed_this_run"] == summary["n_images"] - 2 * 4
    resumed = load_extracted(tmp_path / "out")
    assert resumed["paths"] == clean["paths"]
    np.testing.assert_array_equal(resumed["cls"], clean["cls"])
    assert not list((tmp_path / "out").glob("*.tmp*"))


def test_resume_refuses_a_different_extraction(odd, tmp_path):
    folder, _ = odd
    run_extract(_cfg(folder, tmp_path / "out"))
    with pytest.raises(ConfigError, match="crop_size"):
        run_extract(_cfg(folder, tmp_path / "out", crop_size=24, resize_size=24))
    run_extract(_cfg(folder, tmp_path / "out", crop_size=24, resize_size=24, overwrite=True))
    assert load_extracted(tmp_path / "out")["cls"].shape[1] == 96


def test_crop_must_fit_the_patch_size(odd, tmp_path):
    folder, _ = odd
    with pytest.raises(ConfigError, match="multiple of the backbone's patch size 8"):
        run_extract(_cfg(folder, tmp_path / "out", crop_size=30))


def test_cli_extract_and_errors(odd, tmp_path, capsys):
    folder, _ = odd
    out = tmp_path / "cli"
    argv = ["extract", "--backbone", "debug", "--data", str(folder), "--out", str(out), "--crop-size", "32"]
    assert main([*argv, "--resize-size", "32", "--num-workers", "0", "--mean-pool", "device=cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["complete"] and printed["outputs"] == ["cls", "mean"]
    assert main([*argv, "batchsize=3"]) == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err
    assert main([*argv, "--batch-size", "many"]) == 2
    assert "batch_size='many': expected int" in capsys.readouterr().err
    assert main(["extract", "--backbone", "debug", "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_full_image_mode(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (300, 100), (200, 10, 10)).save(folder / "wide.png")
    run_extract(_cfg(folder, tmp_path / "out", full_image=(32, 96), patch_tokens=True))
    assert load_extracted(tmp_path / "out")["patch"].shape == (1, 4 * 12, 96)
    assert os.path.exists(tmp_path / "out" / "manifest.json")


@pytest.mark.slow
def test_compile_option_really_compiles(tmp_path):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(folder / f"{i}.png")
    dynamo.reset()
    counters.clear()
    eager = load_extracted(tmp_path / "e") if run_extract(_cfg(folder, tmp_path / "e")) else None
    run_extract(_cfg(folder, tmp_path / "c", compile=True))
    assert counters["stats"]["unique_graphs"] >= 1  # the forward went through the compiler
    np.testing.assert_allclose(load_extracted(tmp_path / "c")["cls"], eager["cls"], atol=1e-4)


def test_normalized_float16_cls_from_tar_shards(tmp_path):
    """The curation embedding: L2-normalised fp16 CLS rows of webdataset shard images, paths as member refs."""
    import io
    import tarfile

    rng = np.random.default_rng(3)
    for s in range(2):
        with tarfile.open(tmp_path / f"pool-{s}.tar", "w") as tf:
            for j in range(3):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"img{s}{j}.png")
                info.size = buf.tell()
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    pattern = str(tmp_path / "pool-{0..1}.tar")
    run_extract(_cfg(pattern, tmp_path / "out", normalize=True, save_dtype="float16", format="npy"))
    got = load_extracted(tmp_path / "out")
    assert got["cls"].dtype == np.float16 and got["cls"].shape[0] == 6
    np.testing.assert_allclose(np.linalg.norm(got["cls"].astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert got["paths"][4] == f"{tmp_path}/pool-1.tar::img11.png"
    raw = run_extract(_cfg(pattern, tmp_path / "raw"))
    assert raw["n_features"] == 6
    ref = load_extracted(tmp_path / "raw")["cls"]
    np.testing.assert_allclose(got["cls"], ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=2e-3)


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_write_the_shards_of_one(odd, tmp_path):
    import subprocess
    import sys

    data, _ = odd
    args = ["extract", "--backbone", "debug", "--data", str(data), "--resize-size", "32", "--crop-size", "32",
            "--batch-size", "3", "--num-workers", "0", "--shard-size", "4", "--device", "cpu"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "opendino"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"complete": true') == 1  # the summary is printed once
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one, two = load_extracted(tmp_path / "one"), load_extracted(tmp_path / "two")
    assert one["paths"] == two["paths"]
    np.testing.assert_allclose(one["cls"], two["cls"], atol=1e-5)
    summary = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert summary["complete"] and summary["processed_this_run"] == summary["n_images"]
    assert (tmp_path / "two" / "bad_images.tsv").read_text() == (tmp_path / "one" / "bad_images.tsv").read_text()
