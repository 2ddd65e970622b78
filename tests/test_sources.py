"""Tests for opendino.data.sources: decoding odd and broken files, listing sources, the bad-image-tolerant loader."""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from opendino.data.augment import make_eval_transform
from opendino.data.sources import (
    DEFAULT_MAX_PIXELS,
    BadImageError,
    ImageDataset,
    Sample,
    collate_skip_bad,
    image_extensions,
    list_images,
    load_image,
)

RED, WHITE = (255, 0, 0), (255, 255, 255)


# ------------------------------------------------------------------------------------------------------ file builders
def _png_bytes(width: int, height: int, bit_depth: int, color_type: int, row: bytes) -> bytes:
    """A real PNG whose rows (filter byte 0 + ``row``) are all identical; compressed row by row (no big buffer)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    line = b"\x00" + row
    idat = b"".join(comp.compress(line) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _save_exif_rotated(path: Path) -> None:
    """40x20 (W x H) white image, red 8x8 block at the top-left, EXIF Orientation=6 (display rotated 90° clockwise)."""
    img = Image.new("RGB", (40, 20), WHITE)
    img.paste(RED, (0, 0, 8, 8))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, quality=95, exif=exif)


def _save_animated(path: Path, **kwargs: object) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)


def _save_truncated_jpeg(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _save_small_modes(root: Path) -> None:
    Image.new("RGB", (32, 24), (10, 200, 30)).save(root / "good_rgb.jpg", quality=95)
    Image.new("RGB", (8, 8), (0, 0, 255)).save(root / "UPPER.JPG", quality=95)
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)
    Image.fromarray(np.array([[0, 200, 257, 32768, 65535]], dtype=np.uint16)).save(root / "gray16.png")
    rgb16 = struct.pack(">6H", 0x8080, 0xFFFF, 0x0000, 0x0100, 0x7FFF, 0x00FF)
    (root / "rgb16.png").write_bytes(_png_bytes(2, 1, 16, 2, rgb16))
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, *RED])
    pal.putpixel((1, 0), 1)
    pal.save(root / "palette_transparent.png", transparency=0)
    rgba = Image.new("RGBA", (3, 1))
    for x, px in enumerate([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)]):
        rgba.putpixel((x, 0), px)
    rgba.save(root / "rgba.png")
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    la.save(root / "la.png")
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    bilevel.save(root / "bilevel.png")
    Image.new("L", (4, 4), 100).save(root / "gray.png")


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One of each odd file: decodable oddities, broken files, and files/folders that listing must skip."""
    root = tmp_path_factory.mktemp("odd")
    _save_small_modes(root)
    _save_exif_rotated(root / "exif_rotated.jpg")
    _save_animated(root / "animated.gif")
    _save_animated(root / "animated.webp", lossless=True)
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.new("RGB", (5, 7), (0, 128, 0)).save(root / "sub" / "deeper" / "nested.png")
    _save_truncated_jpeg(root / "truncated.jpg")
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not a PNG\n")
    (root / "bomb.png").write_bytes(_png_bytes(20000, 20000, 1, 0, bytes(2500)))  # 400 Mpx, ~50 kB on disk
    (root / "dir.jpg").mkdir()  # a folder with an image extension
    (root / ".hidden.jpg").write_bytes((root / "good_rgb.jpg").read_bytes())
    (root / ".cache").mkdir()
    Image.new("RGB", (4, 4)).save(root / ".cache" / "in_hidden_dir.png")
    for name in ("notes.txt", "doc.pdf", "clip.mpg", "data.h5"):
        (root / name).write_text("not listed\n")
    return root


GOOD_NAMES = [
    "UPPER.JPG", "animated.gif", "animated.webp", "bilevel.png", "cmyk.jpg", "exif_rotated.jpg", "good_rgb.jpg",
    "gray.png", "gray16.png", "la.png", "palette_transparent.png", "rgb16.png", "rgba.png", "sub/deeper/nested.png",
]  # fmt: skip
BAD_NAMES = {"truncated.jpg": "truncated", "empty.jpg": "empty", "text.png": "not a recognised", "bomb.png": "bomb"}


def _pixels(img: Image.Image) -> list[tuple[int, ...]]:
    return [img.getpixel((x, 0)) for x in range(img.width)]


# ------------------------------------------------------------------------------------------------------------ decoding
def test_exif_orientation_is_applied(odd_folder: Path) -> None:
    img = load_image(odd_folder / "exif_rotated.jpg")
    assert img.size == (20, 40)  # transposed
    # Rotating 90° clockwise moves the top-left landmark to the top-right corner.
    assert np.abs(np.subtract(img.getpixel((16, 3)), RED)).max() < 20
    assert np.abs(np.subtract(img.getpixel((3, 3)), WHITE)).max() < 20


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gray16.png", [(0,) * 3, (1,) * 3, (1,) * 3, (128,) * 3, (255,) * 3]),  # round(v * 255 / 65535), not clipped
        ("rgb16.png", [(128, 255, 0), (1, 127, 0)]),  # Pillow keeps the high byte of each 16-bit sample
        ("palette_transparent.png", [WHITE, RED]),  # transparent index composited onto white
        ("rgba.png", [WHITE, (0, 0, 255), (127, 127, 127)]),
        ("la.png", [WHITE, (0, 0, 0)]),
        ("bilevel.png", [(0, 0, 0), WHITE]),
        ("gray.png", [(100, 100, 100)] * 4),
    ],
)
def test_modes_decode_exactly(odd_folder: Path, name: str, expected: list[tuple[int, ...]]) -> None:
    img = load_image(odd_folder / name)
    assert img.mode == "RGB"
    assert _pixels(img) == expected


@pytest.mark.parametrize(
    ("name", "size", "color"),
    [
        ("good_rgb.jpg", (32, 24), (10, 200, 30)),
        ("UPPER.JPG", (8, 8), (0, 0, 255)),
        ("cmyk.jpg", (16, 16), RED),
        ("animated.gif", (16, 16), RED),  # first frame
        ("animated.webp", (16, 16), RED),
        ("sub/deeper/nested.png", (5, 7), (0, 128, 0)),
    ],
)
def test_lossy_and_animated_decode(odd_folder: Path, name: str, size: tuple[int, int], color: tuple) -> None:
    img = load_image(odd_folder / name)
    assert img.mode == "RGB" and img.size == size
    assert np.abs(np.asarray(img, dtype=int) - color).max() <= 8


def test_animated_files_really_are_animated(odd_folder: Path) -> None:
    for name in ("animated.gif", "animated.webp"):
        with Image.open(odd_folder / name) as img:
            assert getattr(img, "n_frames", 1) == 3


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # [0, 1] floats: * 255
        ("F", [-1.0, 0.0, 3.0], [0, 64, 255]),  # other floats: min-max
        ("I", [0, 257, 65535], [0, 1, 255]),  # 32-bit ints holding 16-bit data
        ("I", [-5, 0, 5], [0, 128, 255]),  # other ints: min-max
    ],
)
def test_float_and_int_tiff(tmp_path: Path, mode: str, values: list, expected: list[int]) -> None:
    dtype = np.float32 if mode == "F" else np.int32
    path = tmp_path / "img.tif"
    Image.fromarray(np.array([values], dtype=dtype), mode=mode).save(path)
    with Image.open(path) as raw:
        assert raw.mode == mode
    assert _pixels(load_image(path)) == [(v, v, v) for v in expected]


@pytest.mark.parametrize(("name", "reason"), sorted(BAD_NAMES.items()))
def test_bad_files_raise_bad_image_error(odd_folder: Path, name: str, reason: str) -> None:
    with pytest.raises(BadImageError, match=reason) as info:
        load_image(odd_folder / name)
    assert info.value.path == os.fspath(odd_folder / name) and reason in info.value.reason


def test_directory_and_missing_file(odd_folder: Path) -> None:
    with pytest.raises(BadImageError, match="is a directory"):
        load_image(odd_folder / "dir.jpg")
    with pytest.raises(BadImageError, match="no such file"):
        load_image(odd_folder / "missing.jpg")


def test_bad_image_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(BadImageError("/x.jpg", "truncated")))
    assert (err.path, err.reason, str(err)) == ("/x.jpg", "truncated", "/x.jpg: truncated")


def test_pillow_globals_untouched(odd_folder: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    for name in BAD_NAMES:
        with pytest.raises(BadImageError):
            load_image(odd_folder / name, max_pixels=1000)
    after = Image.MAX_IMAGE_PIXELS
    assert after == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ----------------------------------------------------------------------------------------------- decompression bombs
@pytest.fixture
def no_decode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any pixel decoding fail loudly and record it."""
    calls: list[str] = []

    def forbidden_load(self: ImageFile.ImageFile) -> None:
        calls.append(str(self.filename))
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden_load)
    return calls


def test_bomb_rejected_without_decoding(odd_folder: Path, no_decode: list[str]) -> None:
    assert DEFAULT_MAX_PIXELS == 2 * 89_478_485
    for max_pixels in (DEFAULT_MAX_PIXELS, None):  # None: our check off, Pillow's hard limit still applies
        with pytest.raises(BadImageError, match="decompression bomb"):
            load_image(odd_folder / "bomb.png", max_pixels=max_pixels)
    with pytest.raises(BadImageError, match="limit 100"):
        load_image(odd_folder / "good_rgb.jpg", max_pixels=100)  # 32 x 24 = 768 pixels
    assert no_decode == []


def test_bomb_warning_range_does_not_leak_warnings(tmp_path: Path, no_decode: list[str]) -> None:
    path = tmp_path / "big.png"  # 100 Mpx: above Pillow's warning threshold, below its error threshold
    path.write_bytes(_png_bytes(10000, 10000, 1, 0, bytes(1250)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BadImageError, match="limit 50000000"):
            load_image(path, max_pixels=50_000_000)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert no_decode == []


def test_max_pixels_validation(odd_folder: Path) -> None:
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="max_pixels"):
            load_image(odd_folder / "good_rgb.jpg", max_pixels=bad)


# ------------------------------------------------------------------------------------------------------------- listing
def test_list_folder_order_and_filtering(odd_folder: Path) -> None:
    paths = list_images(odd_folder)
    assert paths == [os.path.join(odd_folder, n) for n in sorted([*GOOD_NAMES, *BAD_NAMES])]
    assert list_images(str(odd_folder)) == paths  # str or Path, same answer
    assert list_images(odd_folder, extensions=["PNG"]) == [p for p in paths if p.endswith(".png")]


def test_folder_order_is_by_path_components(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for rel in ("a-b.png", "a/x.png", "B.png", "a.png"):
        Image.new("RGB", (2, 2)).save(tmp_path / rel)
    # "a/x.png" sorts before "a-b.png" although "-" < "/": folders are compared by name, component by component.
    assert [os.path.relpath(p, tmp_path) for p in list_images(tmp_path)] == ["B.png", "a/x.png", "a-b.png", "a.png"]


def test_image_extensions() -> None:
    exts = image_extensions()
    assert {".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp"} <= exts
    assert not {".pdf", ".h5", ".mpg", ".eps", ".txt"} & exts


def test_text_file_list(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    list_file = tmp_path / "lists" / "files.txt"
    list_file.write_text("# a comment\n\nimg1.jpg\n  sub/img2.png  \n../up.jpg\n/abs/path.jpg\n   # indented comment\n")
    assert list_images(list_file) == [
        str(tmp_path / "lists" / "img1.jpg"),
        str(tmp_path / "lists" / "sub" / "img2.png"),
        str(tmp_path / "up.jpg"),
        "/abs/path.jpg",
    ]


def test_csv_list(tmp_path: Path) -> None:
    csv_file = tmp_path / "meta.csv"
    csv_file.write_text('\ufefflabel,path\n3,a.jpg\n1,"b, with comma.png"\n\n7,/abs/c.png\n', encoding="utf-8")
    assert list_images(csv_file) == [str(tmp_path / "a.jpg"), str(tmp_path / "b, with comma.png"), "/abs/c.png"]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("nopath.csv", "file,label\na.jpg,1\n", "no 'path' column"),
        ("blank.csv", "path,label\n,1\n", "empty 'path' on line 2"),
        ("header_only.csv", "path\n", "no images found"),
        ("empty.csv", "", "no 'path' column"),
        ("comments.txt", "# nothing\n\n", "no images found"),
        ("list.json", '["a.jpg"]', "unsupported image source"),
    ],
)
def test_list_errors(tmp_path: Path, name: str, content: str, match: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        list_images(tmp_path / name)


def test_list_missing_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="no images found"):
        list_images(tmp_path)


# ------------------------------------------------------------------------------------------------- dataset and loader
def test_dataset_items(odd_folder: Path) -> None:
    paths = [odd_folder / "good_rgb.jpg", odd_folder / "truncated.jpg"]
    ds = ImageDataset(paths, make_eval_transform(resize_size=16, crop_size=16))
    x, i = ds[0]
    assert (x.shape, x.dtype, i) == ((3, 16, 16), torch.float32, 0)
    bad = ds[1]
    assert bad[0] is None and bad[1] == 1 and "truncated" in bad.reason
    assert list(ds.failures) == [1]
    restored = pickle.loads(pickle.dumps(bad))
    assert isinstance(restored, Sample) and tuple(restored) == (None, 1) and restored.reason == bad.reason
    with pytest.raises(IndexError):
        ds[2]
    raw, _ = ImageDataset(paths, None)[0]
    assert (raw.shape, raw.dtype) == ((3, 24, 32), torch.uint8)


def test_transform_errors_become_bad_samples(odd_folder: Path) -> None:
    def broken(img: Image.Image) -> torch.Tensor:
        raise RuntimeError("boom")

    sample = ImageDataset([odd_folder / "gray.png"], broken)[0]
    assert sample[0] is None and sample.reason == "transform failed: RuntimeError: boom"


def test_collate_skip_bad() -> None:
    batch = [Sample(torch.zeros(3, 2, 2), 4), Sample(None, 5, "truncated"), (torch.ones(3, 2, 2), 6), (None, 7)]
    images, good, bad = collate_skip_bad(batch)
    assert images.shape == (2, 3, 2, 2) and good.tolist() == [4, 6] and good.dtype == torch.long
    assert bad == [(5, "truncated"), (7, "unknown error")]
    images, good, bad = collate_skip_bad([Sample(None, 0, "empty")])
    assert images is None and good.numel() == 0 and bad == [(0, "empty")]
    with pytest.raises(ValueError, match="different shapes"):
        collate_skip_bad([Sample(torch.zeros(3, 2, 2), 0), Sample(torch.zeros(3, 4, 4), 1)])


def test_dataloader_with_workers_reports_bad_images(odd_folder: Path) -> None:
    paths = list_images(odd_folder)
    ds = ImageDataset(paths, make_eval_transform(resize_size=32, crop_size=32))
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_skip_bad, timeout=60)
    good: list[int] = []
    bad: dict[int, str] = {}
    for images, indices, failures in loader:
        if images is not None:
            assert images.shape == (len(indices), 3, 32, 32) and torch.isfinite(images).all()
        good += indices.tolist()
        bad.update(failures)
    assert ds.failures == {}  # worker-side records stay in the workers: the batch is what carries them
    assert sorted(good + list(bad)) == list(range(len(paths)))
    names = {i: os.path.relpath(paths[i], odd_folder) for i in range(len(paths))}
    assert sorted(names[i] for i in good) == sorted(GOOD_NAMES)
    assert {names[i]: reason for i, reason in bad.items()}.keys() == BAD_NAMES.keys()
    for i, reason in bad.items():
        assert BAD_NAMES[names[i]] in reason


def test_extreme_aspect_ratio_is_refused_before_decoding(tmp_path):
    from opendino.data.sources import MAX_ASPECT_RATIO

    strip = tmp_path / "strip.png"
    Image.new("RGB", (MAX_ASPECT_RATIO * 3 + 1, 3)).save(strip)
    with pytest.raises(BadImageError, match="extreme aspect ratio"):
        load_image(strip)
    ok = tmp_path / "panorama.png"
    Image.new("RGB", (MAX_ASPECT_RATIO * 3, 3)).save(ok)
    assert load_image(ok).size == (MAX_ASPECT_RATIO * 3, 3)
