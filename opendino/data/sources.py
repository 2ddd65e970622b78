"""Image sources: robust decoding, listing of image collections and a bad-image-tolerant Dataset.

``load_image`` turns any file Pillow can decode into an 8-bit RGB ``PIL.Image`` (EXIF orientation applied,
alpha composited onto white, 16-bit and float data rescaled) and raises one exception type,
``BadImageError``, for everything else: truncated, empty, non-image or oversized files.
``load_image_bytes`` applies the same rules to encoded bytes (tar shard members). ``list_images`` lists an image
folder, a text file list, a manifest table or the images of tar shards, and ``source_kind`` tells training sources
apart. An image inside a tar shard is named by a member reference ``<shard>.tar::<member name>``
(``TAR_MEMBER_SEP``): ``load_image`` reads it like a file, so lists, manifests and caches can hold shard images.
``ImageDataset`` plus ``collate_skip_bad`` carry bad-image reasons from DataLoader workers back to the main process.
"""

from __future__ import annotations

import contextlib
import functools
import io
import operator
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from opendino.data.manifest import MANIFEST_SUFFIXES, read_manifest_paths

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "TAR_MEMBER_SEP",
    "BadImageError",
    "ImageDataset",
    "Sample",
    "SourceKind",
    "collate_skip_bad",
    "image_extensions",
    "list_images",
    "load_image",
    "load_image_bytes",
    "source_kind",
]

# Pillow's own hard error threshold (2 * its default MAX_IMAGE_PIXELS); checked per image, Pillow's globals untouched.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
# Longer side over shorter side beyond which an image is refused (no real photo is a 1 x 1000 strip).
MAX_ASPECT_RATIO = 100
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Formats Pillow registers but that we never open: MPEG is identify-only (no pixels) and EPS decoding runs a
# Ghostscript subprocess on the file, which is a needless attack surface for crawled data.
_EXCLUDED_FORMATS = frozenset({"MPEG", "EPS"})
_LIST_SUFFIXES = (".txt", ".lst", ".list")
# "<shard>.tar::<member>" names one member of a tar shard (see data.shards.member_ref)
TAR_MEMBER_SEP = "::"


class BadImageError(Exception):
    """An image file that cannot be decoded; ``path`` and a short human-readable ``reason``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(os.fspath(path), reason)
        self.path = os.fspath(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# ----------------------------------------------------------------------------------------------------------- decoding
@functools.cache
def _readable_formats() -> tuple[str, ...]:
    """Pillow formats that can actually decode pixels (no stubs, no identify-only plugins, no EPS)."""
    Image.init()
    formats = []
    for name, (factory, _accept) in Image.OPEN.items():
        is_stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        if not is_stub and name not in _EXCLUDED_FORMATS:
            formats.append(name)
    return tuple(formats)


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with dot) of every format ``load_image`` is willing to decode."""
    readable = set(_readable_formats())
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in readable)


def _check_pixels(path: str, size: tuple[int, int], max_pixels: int | None) -> None:
    pixels = size[0] * size[1]
    if max_pixels is not None and pixels > max_pixels:
        raise BadImageError(path, f"decompression bomb: {size[0]}x{size[1]} = {pixels} pixels > limit {max_pixels}")
    if max(size) > MAX_ASPECT_RATIO * min(size):
        # resizing the shorter side of a 1 x 100000 strip to 256 would ask for billions of pixels
        raise BadImageError(path, f"extreme aspect ratio: {size[0]}x{size[1]} (more than {MAX_ASPECT_RATIO}:1)")


def _check_max_pixels(max_pixels: int | None) -> None:
    if max_pixels is not None and (isinstance(max_pixels, bool) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")


def _check_file(path: str) -> None:
    """Reject missing, empty, directory and special files (a FIFO named x.jpg would block forever)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadImageError(path, "no such file (or broken symlink)") from None
    except OSError as e:
        raise BadImageError(path, f"cannot stat: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadImageError(path, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise BadImageError(path, "not a regular file")
    if st.st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)")


def _rescale_to_uint8(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale to 8-bit ``L``.

    ``I;16*`` and ``I`` data inside [0, 65535] is 16-bit: v -> round(v * 255 / 65535) (65535 -> 255, 32768 -> 128).
    ``F`` data inside [0, 1] is scaled by 255. Anything else (negative or wider ints, floats outside [0, 1]) is
    min-max stretched to [0, 255]; non-finite floats become 0.
    """
    arr = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES or (img.mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535):
        return Image.fromarray(((arr.astype(np.uint32) + 128) // 257).astype(np.uint8))
    data = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = data * 255.0
    elif hi > lo:
        scaled = (data - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(data)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded Pillow image to a new 8-bit RGB image; transparency is composited onto white."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return _rescale_to_uint8(img).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, 1, L, P without transparency; a copy when already RGB


def _apply_exif_orientation(img: Image.Image) -> None:
    """Apply the EXIF Orientation tag in place; unreadable EXIF metadata is ignored (the pixels themselves are fine)."""
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)


def _decode(fp: str | io.BytesIO, name: str, max_pixels: int | None) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow warns above its global MAX_IMAGE_PIXELS; our explicit max_pixels check is the one that decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(fp, formats=_readable_formats()) as img:
            _check_pixels(name, img.size, max_pixels)  # declared size, before any pixel is decoded
            img.load()  # full decode inside the try: lazy decoding errors (truncation) surface here
            _check_pixels(name, img.size, max_pixels)  # some formats (ICO, GIF frames) change size on load
            _apply_exif_orientation(img)
            return _to_rgb(img)  # always a new image, independent of the file closed by the ``with``


def _decode_or_bad(fp: str | io.BytesIO, name: str, max_pixels: int | None) -> Image.Image:
    """``_decode`` with every failure turned into a ``BadImageError`` naming ``name``."""
    try:
        return _decode(fp, name, max_pixels)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(name, f"decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise BadImageError(name, "not a recognised image format") from e
    except Exception as e:  # decoding untrusted files: any failure (OSError, SyntaxError, struct.error, ...) is "bad"
        raise BadImageError(name, f"{type(e).__name__}: {e}") from e


def load_image(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` to an 8-bit RGB ``PIL.Image`` (first frame of animations) or raise ``BadImageError``.

    ``max_pixels`` (width * height, ``None`` for no limit of ours) is checked on the declared size before decoding.
    Pillow's own hard limit (2 * ``Image.MAX_IMAGE_PIXELS``) still applies and is reported as ``BadImageError``
    too; Pillow's global settings are never modified. Truncated files are errors unless something else in the
    process has set ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` (this module never does).
    """
    path = os.fspath(path)
    _check_max_pixels(max_pixels)
    if TAR_MEMBER_SEP in path:
        from opendino.data.shards import read_member, split_member_ref  # shards imports this module

        if split_member_ref(path) is not None:
            return load_image_bytes(read_member(path), path, max_pixels=max_pixels)
    _check_file(path)
    return _decode_or_bad(path, path, max_pixels)


def load_image_bytes(data: bytes, name: str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """``load_image`` for encoded bytes (e.g. a tar shard member); ``name`` only labels the ``BadImageError``."""
    _check_max_pixels(max_pixels)
    if not data:
        raise BadImageError(name, "empty file (0 bytes)")
    return _decode_or_bad(io.BytesIO(data), name, max_pixels)


# ------------------------------------------------------------------------------------------------------------ listing
def _list_folder(root: str, extensions: frozenset[str]) -> list[str]:
    """Recursive, hidden files and folders skipped, sorted by relative path components (codepoint order)."""
    found: list[tuple[tuple[str, ...], str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        prefix: tuple[str, ...] = () if rel_dir == "." else tuple(rel_dir.split(os.sep))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                found.append(((*prefix, name), os.path.join(dirpath, name)))
    found.sort(key=operator.itemgetter(0))
    return [path for _, path in found]


def _resolve(entry: str, base_dir: str) -> str:
    return os.path.normpath(entry if os.path.isabs(entry) else os.path.join(base_dir, entry))


def _read_text_list(list_file: str) -> list[str]:
    """One path per line; blank lines and lines starting with ``#`` are skipped."""
    base_dir = os.path.dirname(list_file)
    with open(list_file, encoding="utf-8-sig") as f:
        entries = [line.strip() for line in f]
    return [_resolve(e, base_dir) for e in entries if e and not e.startswith("#")]


def list_images(source: str | os.PathLike[str], *, extensions: Iterable[str] | None = None) -> list[str]:
    """List the images of ``source``: a folder, a text file list (.txt/.lst/.list), a table with a ``path`` column
    or tar shards (a ``.tar`` file or a glob / brace pattern, listed as member references ``<shard>.tar::<member>``).

    A folder is walked recursively (hidden files and folders skipped, sorted deterministically) and keeps the files
    whose extension is in ``extensions`` (default: every format Pillow can decode, case-insensitive). List entries
    are kept in file order, relative ones resolved against the list file's folder; they are not checked for
    existence (a missing file becomes a ``BadImageError`` when loaded). A table is a ``.csv``, ``.tsv`` or
    ``.parquet`` manifest (``data.manifest``): its ``path`` column, other columns (weights too) ignored. Returns
    absolute, normalised paths.
    """
    text = os.fspath(source)
    if _names_shards(text):
        from opendino.data.shards import list_shard_images  # shards imports this module

        return list_shard_images(text)
    path = os.path.abspath(text)
    if not os.path.exists(path):
        raise ValueError(f"image source does not exist: {os.fspath(source)!r}")
    if os.path.isdir(path):
        exts = image_extensions() if extensions is None else frozenset(_normalise_ext(e) for e in extensions)
        paths = _list_folder(path, exts)
    elif path.lower().endswith(MANIFEST_SUFFIXES):
        paths = read_manifest_paths(path)
    elif path.lower().endswith(_LIST_SUFFIXES):
        paths = _read_text_list(path)
    else:
        raise ValueError(
            f"unsupported image source {path!r}: expected a folder or one of {MANIFEST_SUFFIXES + _LIST_SUFFIXES}"
        )
    if not paths:
        raise ValueError(f"no images found in {path!r}")
    return paths


def _normalise_ext(ext: str) -> str:
    ext = ext.strip().lower()
    if not ext or ext == ".":
        raise ValueError(f"invalid extension {ext!r}")
    return ext if ext.startswith(".") else "." + ext


_SHARD_SUFFIXES = (".tar",)
_PATTERN_CHARS = frozenset("*?[{")
SourceKind = Literal["folder", "list", "manifest", "shards"]


def _names_shards(text: str) -> bool:
    """A ``.tar`` file, or a glob / brace pattern that is not itself an existing path."""
    if os.path.isdir(text):
        return False
    return text.lower().endswith(_SHARD_SUFFIXES) or (not os.path.exists(text) and bool(_PATTERN_CHARS & set(text)))


def source_kind(source: str | os.PathLike[str]) -> SourceKind:
    """Which kind of training source ``source`` names, from its shape only (files are not opened).

    ``"shards"``: a ``.tar`` file or a glob / brace pattern (``/data/train-{000..099}.tar``, ``/data/*.tar``) that
    is not itself an existing path; ``"folder"``: an existing folder; ``"manifest"``: a ``.csv`` / ``.tsv`` /
    ``.parquet`` table (a ``.csv`` without a ``weight`` column is a plain file list too, read identically);
    ``"list"``: a .txt/.lst/.list file list.
    """
    text = os.fspath(source)
    if os.path.isdir(text):
        return "folder"
    if _names_shards(text):
        return "shards"
    lower = text.lower()
    if not os.path.exists(text):
        raise ValueError(f"image source does not exist: {text!r}")
    if lower.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    if lower.endswith(_LIST_SUFFIXES):
        return "list"
    raise ValueError(
        f"unsupported image source {text!r}: expected a folder, tar shards (.tar or a pattern), "
        f"a manifest {MANIFEST_SUFFIXES} or a file list {_LIST_SUFFIXES}"
    )


# ------------------------------------------------------------------------------------------------------------ dataset
class Sample(tuple):
    """``(image_or_None, index)`` with the failure ``reason`` attached as an attribute (``None`` when good).

    It unpacks like a plain 2-tuple; the reason rides along so that ``collate_skip_bad``, which runs inside the
    DataLoader worker, can put it into the batch (worker-side state never reaches the main process).
    """

    reason: str | None

    def __new__(cls, image: Any, index: int, reason: str | None = None) -> Sample:
        self = super().__new__(cls, (image, index))
        self.reason = reason
        return self

    def __reduce__(self) -> tuple[type[Sample], tuple[Any, int, str | None]]:
        return (type(self), (self[0], self[1], self.reason))


class ImageDataset(Dataset):
    """Images from ``paths`` through ``transform``; a bad image gives ``(None, index)`` instead of raising.

    ``transform`` maps an RGB ``PIL.Image`` to a tensor (``None``: uint8 CHW tensor, no resizing). Decoding errors
    and transform errors are both reported as bad samples; reasons are kept in ``failures`` (this process only)
    and on the returned ``Sample.reason`` (which ``collate_skip_bad`` forwards through workers).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        _check_max_pixels(max_pixels)
        self.paths = [os.fspath(p) for p in paths]
        self.transform = transform
        self.max_pixels = max_pixels
        self.failures: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        index = operator.index(index)
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} images")
        try:
            img = load_image(self.paths[index], max_pixels=self.max_pixels)
        except BadImageError as e:
            return self._bad(index, e.reason)
        try:
            tensor = self.transform(img) if self.transform is not None else _pil_to_uint8_tensor(img)
        except Exception as e:  # a pathological image must not kill a worker; the reason is reported
            return self._bad(index, f"transform failed: {type(e).__name__}: {e}")
        return Sample(tensor, index)

    def _bad(self, index: int, reason: str) -> Sample:
        self.failures[index] = reason
        return Sample(None, index, reason)


def _pil_to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def collate_skip_bad(
    batch: Sequence[Sequence[Any]],
) -> tuple[torch.Tensor | None, torch.Tensor, list[tuple[int, str]]]:
    """Stack the good samples of ``batch``; return ``(images or None, good_indices, [(index, reason), ...])``.

    ``images`` is ``None`` when every sample is bad; ``good_indices`` is a LongTensor aligned with ``images``.
    Good samples whose tensors have different shapes are a transform configuration error (``ValueError``).
    """
    tensors: list[torch.Tensor] = []
    good: list[int] = []
    bad: list[tuple[int, str]] = []
    for sample in batch:
        tensor, index = sample[0], int(sample[1])
        if tensor is None:
            bad.append((index, getattr(sample, "reason", None) or "unknown error"))
        else:
            tensors.append(tensor)
            good.append(index)
    shapes = sorted({tuple(t.shape) for t in tensors})
    if len(shapes) > 1:
        raise ValueError(f"cannot stack images of different shapes {shapes}; use a transform with a fixed output size")
    images = torch.stack(tensors) if tensors else None
    return images, torch.tensor(good, dtype=torch.long), bad
