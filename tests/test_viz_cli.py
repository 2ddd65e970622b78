"""`opendino viz KIND` end to end through `opendino.cli.main` on the debug preset (64 px, patch 8): the files each
command writes and their sizes, bad images skipped and reported, bad input refused with one line (exit 2), the depth
and segmentation heads saved by the evaluations read back, a constructed backbone loaded from a file, and the
official-weights path (random ViT-S/14 weights converted to the Hugging Face layout)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from _util import content_vit, train_tiny_depth_head, write_halves_seg_dataset
from PIL import Image

from opendino import cli
from opendino.cli import main
from opendino.config import SegEvalConfig
from opendino.models.hub import build_backbone, run_convert, save_backbone
from opendino.viz import load_head
from opendino.viz.heads import same_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _one_parser(monkeypatch):
    """Building the command-line parser reads the source of every config class (about 1 s): build it once."""
    monkeypatch.setattr(cli, "_parser", _cached_parser)


_cached_parser = functools.cache(cli._parser)


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two small images of different shapes and one broken file."""
    root = tmp_path_factory.mktemp("photos")
    Image.fromarray(_texture(48, 72, 0)).save(root / "wide.png")
    Image.fromarray(_texture(80, 40, 1)).save(root / "tall.jpg")
    (root / "broken.png").write_bytes(b"not an image")
    return root


def _viz(tmp_path, kind: str, *args: str) -> tuple[int, dict]:
    out = tmp_path / kind
    code = main(["viz", kind, "--backbone", "debug", "--image-size", "64", "--out", str(out), *args])
    record = json.loads((out / "viz.json").read_text()) if (out / "viz.json").exists() else {}
    return code, record


def _size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_pca_writes_a_figure_per_image_and_a_grid_and_skips_bad_files(photos, tmp_path, capsys):
    code, record = _viz(tmp_path, "pca", str(photos / "wide.png"), str(photos / "tall.jpg"), str(photos / "broken.png"))
    assert code == 0
    assert "skipped" in capsys.readouterr().err and record["skipped"][0][0].endswith("broken.png")
    assert record["files"] == ["wide_pca.png", "tall_pca.png", "pca_grid.png"]
    assert [i["grid"] for i in record["images"]] == [[8, 12], [16, 8]]  # 64 px shorter side, aspect kept
    w, h = _size(tmp_path / "pca" / "wide_pca.png")
    assert w > 2.5 * h  # three panels side by side
    w, h = _size(tmp_path / "pca" / "pca_grid.png")
    assert 1.2 < w / h < 2.2  # a row per image, three columns
    # deterministic: the same command writes the same bytes
    first = (tmp_path / "pca" / "wide_pca.png").read_bytes()
    _viz(tmp_path, "pca", str(photos / "wide.png"), str(photos / "tall.jpg"))
    assert (tmp_path / "pca" / "wide_pca.png").read_bytes() == first


def test_foreground_writes_mask_png_npy_and_threshold(photos, tmp_path):
    code, record = _viz(tmp_path, "foreground", str(photos), "--threshold", "0.5", "--per-image")  # a folder
    assert code == 0 and len(record["images"]) == 2 and len(record["skipped"]) == 1
    out = tmp_path / "foreground"
    mask = np.load(out / "wide_foreground.npy")
    assert mask.dtype == bool and mask.shape == (8, 12)
    assert _size(out / "wide_foreground.png") == (72, 48)  # the mask at the image's own size
    png = np.asarray(Image.open(out / "wide_foreground.png"))
    assert set(np.unique(png)) <= {0, 255} and np.isclose((png > 0).mean(), mask.mean())
    facts = json.loads((out / "wide_foreground.json").read_text())
    assert facts["threshold"] == 0.5 and facts["grid"] == [8, 12] and facts["fitted_with"] == [facts["image"]]


def test_match_draws_two_images_and_lists_the_matches(photos, tmp_path, capsys):
    code, record = _viz(tmp_path, "match", str(photos / "wide.png"), str(photos / "wide.png"), "--matches", "5")
    assert code == 0
    assert record["files"] == ["match_wide_wide-2.png", "match_wide_wide-2.json"]
    listed = json.loads((tmp_path / "match" / "match_wide_wide-2.json").read_text())["matches"]
    # an image against itself: each foreground patch is its own mutual nearest neighbour
    assert 0 < len(listed) <= 5 and all(r[:2] == r[2:4] and r[4] > 0.999 for r in listed)
    w, h = _size(tmp_path / "match" / "match_wide_wide-2.png")
    assert w > 1.5 * h
    code, _ = _viz(tmp_path / "x", "match", str(photos / "wide.png"))
    assert code == 2 and "exactly two images" in capsys.readouterr().err


def test_attention_figure(photos, tmp_path):
    code, record = _viz(tmp_path, "attention", str(photos / "tall.jpg"), "--block", "-2")
    assert code == 0 and record["files"] == ["tall_attention.png"] and record["images"][0]["block"] == 2
    w, h = _size(tmp_path / "attention" / "tall_attention.png")
    assert w > h  # image, mean and 3 heads in one row


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pca", "--image-size", "60"], "multiple of the backbone's patch size 8 (try 64)"),
        (["depth"], "needs head"),
        (["seg", "--head", "/nonexistent"], "no head.safetensors"),
        (["pca", "--threshold", "nan"], "threshold"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(photos, tmp_path, capsys, args, message):
    kind, *flags = args
    code = main(["viz", kind, str(photos / "wide.png"), "--backbone", "debug", "--out", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_all_images_unreadable(photos, tmp_path, capsys):
    assert main(["viz", "pca", str(photos / "broken.png"), "--backbone", "debug", "--out", str(tmp_path)]) == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err


def test_constructed_backbone_from_a_file_finds_the_object(tmp_path):
    """Patch tokens = LayerNorm(patch embedding) (no position embedding, residual branches zero): a textured square
    on a flat background is the foreground, whatever the PCA sign."""
    weights = save_backbone(content_vit(), tmp_path / "content.safetensors")
    pixels = np.full((64, 64, 3), 128, np.uint8)
    pixels[8:56, 8:56] = _texture(48, 48, 2)
    Image.fromarray(pixels).save(tmp_path / "object.png")
    out = tmp_path / "fg"
    args = ["viz", "foreground", str(tmp_path / "object.png"), "--backbone", str(weights), "--image-size", "64"]
    assert main([*args, "--out", str(out)]) == 0
    expected = np.zeros((8, 8), bool)
    expected[1:7, 1:7] = True
    np.testing.assert_array_equal(np.load(out / "object_foreground.npy"), expected)


# ------------------------------------------------------------------------------------------------ heads
@pytest.fixture(scope="module")
def seg_head(tmp_path_factory):
    from opendino.eval.seg import run

    root = write_halves_seg_dataset(tmp_path_factory.mktemp("seg"), 3)
    cfg = SegEvalConfig(backbone="debug", train=str(root), val=str(root), out=str(root / "out"), cache_dir="",
                        num_workers=0, mode="fast", iterations=30, warmup_iterations=2, resize_size=64, lr=0.05,
                        class_names=("red", "blue"))  # fmt: skip
    run(cfg)
    return root


@pytest.fixture(scope="module")
def depth_head(tmp_path_factory):
    images = [_texture(48, 64, 10 + i) for i in range(2)]
    return train_tiny_depth_head(tmp_path_factory.mktemp("depth"), images)


def test_seg_head_is_saved_self_describing_and_drawn(seg_head, photos, tmp_path):
    head = load_head(seg_head / "out")
    assert head.task == "seg" and head.blocks == [3] and head.meta["class_names"] == ["red", "blue"]
    assert len(head.meta["palette"]) == 2 and head.meta["resize_size"] == 64
    assert same_backbone(head, {"preset": "debug", "seed": 0}) and not same_backbone(
        head, {"preset": "debug", "seed": 1}
    )
    red_blue = np.full((40, 60, 3), (220, 30, 30), np.uint8)
    red_blue[:, 30:] = (30, 30, 220)
    Image.fromarray(red_blue).save(tmp_path / "rb.png")
    code, record = _viz(tmp_path, "seg", str(tmp_path / "rb.png"), "--head", str(seg_head / "out"), "--image-size", "0")
    assert code == 0 and record["files"] == ["rb_seg.png", "rb_seg.npy"]
    labels = np.load(tmp_path / "seg" / "rb_seg.npy")
    assert labels.shape == (40, 60) and (labels[:, :20] == 0).mean() > 0.9 and (labels[:, 40:] == 1).mean() > 0.9


def test_depth_head_is_saved_self_describing_and_drawn(depth_head, photos, tmp_path, capsys):
    head = load_head(depth_head / "out" / "head.safetensors")
    assert head.task == "depth" and head.blocks == [3] and head.meta["image_size"] == 40
    assert head.meta["min_depth"] == 0.001 and head.meta["max_depth"] == 10.0
    code, record = _viz(tmp_path, "depth", str(photos / "wide.png"), "--head", str(depth_head / "out"), "--image-size",
                        "0")  # fmt: skip
    assert code == 0 and record["files"] == ["wide_depth.png", "wide_depth.npy"]
    depth = np.load(tmp_path / "depth" / "wide_depth.npy")
    assert depth.shape == (40, 60) and depth.min() >= 0.001 and depth.max() <= 10.0  # shorter side: the head's 40
    # a seg head is not a depth head; another seed is other weights (a warning, still drawn)
    out = ["--out", str(tmp_path / "other")]
    assert (
        main(["viz", "seg", str(photos / "wide.png"), "--backbone", "debug", "--head", str(depth_head / "out"), *out])
        == 2
    )
    assert "is a depth head, not a seg head" in capsys.readouterr().err
    assert main(["viz", "depth", str(photos / "wide.png"), "--backbone", "debug", "--seed", "1", "--head",
                 str(depth_head / "out"), *out]) == 0  # fmt: skip
    assert "warning: the head" in capsys.readouterr().err


def test_head_without_description_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(2, 4, 1, 1)}, str(tmp_path / "head.safetensors"))
    with pytest.raises(ValueError, match="re-run `opendino eval depth`"):
        load_head(tmp_path)


# ------------------------------------------------------------------------------------------------ official weights
def test_official_layout_weights_converted_to_hugging_face(photos, tmp_path):
    """Random dinov2_vits14 weights saved as an official .pth, converted to a Hugging Face folder, drawn at 112 px."""
    torch.manual_seed(0)
    official = save_backbone(build_backbone("dinov2_vits14"), tmp_path / "dinov2_vits14_pretrain.pth")
    hf = run_convert(official, tmp_path / "hf", to="hf")
    out = tmp_path / "out"
    args = ["viz", "pca", str(photos / "wide.png"), "--backbone", str(hf), "--image-size", "112", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "viz.json").read_text())
    assert record["images"][0]["grid"] == [8, 12] and (out / "wide_pca.png").stat().st_size > 0
