"""Synthetic image edits for the copy-detection evaluation, in the spirit of the DISC21 queries.

DISC21 queries are references transformed by several edits at once (crops, rotations, colour changes, overlaid
text and emoji, pasting onto another image, blur, pixelation, JPEG). The benchmark's own edit pipeline is not
reproduced: these are our edits, drawn with PIL and `torchvision.transforms.v2.functional`, no downloads (PIL's
default font). Every parameter comes from an explicit `random.Random`, so a query is a pure function of its source
image, its seed and the edit settings; the chosen edits are applied in the fixed order of `EDITS` (geometry, then
colour, then overlays, then degradations, JPEG last) and described by short strings such as ``"crop(0.42)"``.
"""

from __future__ import annotations

import io
import math
import random
import string
from collections.abc import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2 import functional as TF

__all__ = ["EDITS", "apply_edits", "random_edits"]

EDITS = (
    "crop", "rotate", "flip", "pad", "background", "color", "grayscale", "overlay_image", "emoji", "text", "blur",
    "pixelate", "jpeg",
)  # fmt: skip
# edits that need a second image (another picture of the collection, or a drawn one when none is given)
_NEEDS_OTHER = ("background", "overlay_image")

Edit = Callable[[Image.Image, random.Random, Image.Image | None], tuple[Image.Image, str]]
Other = Image.Image | Callable[[], Image.Image | None] | None  # a picture, or a function loading it when needed


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _drawn_picture(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A stand-in second image: a two-colour gradient with a few rectangles."""
    w, h = size
    a, b = _colour(rng), _colour(rng)
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    img = Image.composite(Image.new("RGB", (w, h), a), Image.new("RGB", (w, h), b), img.convert("L"))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        draw.rectangle(
            (x0, y0, x0 + rng.randrange(1, w // 2 + 2), y0 + rng.randrange(1, h // 2 + 2)), fill=_colour(rng)
        )
    return img


def _crop(img: Image.Image, rng: random.Random, _other: Image.Image | None) -> tuple[Image.Image, str]:
    """Keep a random part of 25-70 % of the area, aspect ratio in [3/4, 4/3]."""
    w, h = img.size
    area = rng.uniform(0.25, 0.7)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = max(1, min(w, round(math.sqrt(area * w * h * ratio))))
    ch = max(1, min(h, round(math.sqrt(area * w * h / ratio))))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return TF.crop(img, top, left, ch, cw), f"crop({cw * ch / (w * h):.2f})"


def _rotate(img: Image.Image, rng: random.Random, _other: Image.Image | None) -> tuple[Image.Image, str]:
    """A quarter turn (30 %) or a tilt of 10-45 degrees either way, canvas enlarged, corners filled."""
    quarter = rng.random() < 0.3
    angle = float(rng.choice((90, 180, 270))) if quarter else rng.choice((-1, 1)) * rng.uniform(10, 45)
    return TF.rotate(img, angle, expand=True, fill=list(_colour(rng))), f"rotate({angle:.0f})"


def _flip(img: Image.Image, _rng: random.Random, _other: Image.Image | None) -> tuple[Image.Image, str]:
    return TF.horizontal_flip(img), "flip"


def _pad(img: Image.Image, rng: random.Random, _other: Image.Image | None) -> tuple[Image.Image, str]:
    """A coloured border of 5-30 % of the size on each side (drawn independently)."""
    w, h = img.size
    sides = [round(rng.uniform(0.05, 0.3) * s) for s in (w, h, w, h)]  # left, top, right, bottom
    return TF.pad(img, sides, fill=list(_colour(rng))), "pad"


def _background(img: Image.Image, rng: random.Random, other: Image.Image | None) -> tuple[Image.Image, str]:
    """Paste the image, scaled to 40-80 % of the side, onto another picture."""
    scale = rng.uniform(0.4, 0.8)
    w, h = img.size
    bw, bh = max(w, round(w / scale)), max(h, round(h / scale))
    canvas = (other or _drawn_picture((bw, bh), rng)).resize((bw, bh), Image.Resampling.BILINEAR)
    canvas.paste(img, (rng.randint(0, bw - w), rng.randint(0, bh - h)))
    return canvas, f"background({scale:.2f})"


def _color(img: Image.Image, rng: random.Random, _other: Image.Image | None) -> tuple[Image.Image, str]:
    """Brightness, contrast and saturation factors in [0.5, 1.5], hue shift in [-0.1, 0.1]."""
    b, c, s, hue = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(-0.1, 0.1)
    img = TF.adjust_brightness(img, b)
    img = TF.adjust_contrast(img, c)
    img = TF.adjust_saturation(img, s)
    return TF.adjust_hue(img, hue), f"color({b:.1f},{c:.1f},{s:.1f},{hue:+.2f})"


def _grayscale(img: Image.Image, _rng: random.Random, _other: Image.Image | None) -> tuple[Image.Image, str]:
    return TF.rgb_to_grayscale(img, num_output_channels=3), "grayscale"


def _overlay_image(img: Image.Image, rng: random.Random, other: Image.Image | None) -> tuple[Image.Image, str]:
    """Another picture, 20-40 % of the shorter side, pasted with opacity 0.6-1 at a random place."""
    w, h = img.size
    side = max(1, min(min(w, h), round(rng.uniform(0.2, 0.4) * min(w, h))))
    patch = (other or _drawn_picture((side, side), rng)).resize((side, side), Image.Resampling.BILINEAR)
    alpha = rng.uniform(0.6, 1.0)
    mask = Image.new("L", (side, side), round(255 * alpha))
    out = img.copy()
    out.paste(patch, (rng.randint(0, w - side), rng.randint(0, h - side)), mask)
    return out, f"overlay_image({alpha:.1f})"


def _emoji(img: Image.Image, rng: random.Random, _other: Image.Image | None) -> tuple[Image.Image, str]:
    """1-3 smiling faces (coloured disc, eyes, mouth), 15-35 % of the shorter side each."""
    out = img.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    n = rng.randint(1, 3)
    for _ in range(n):
        d = max(6, round(rng.uniform(0.15, 0.35) * min(w, h)))
        x, y = rng.randint(0, max(0, w - d)), rng.randint(0, max(0, h - d))
        draw.ellipse((x, y, x + d, y + d), fill=rng.choice([(255, 204, 0), _colour(rng)]), outline=(0, 0, 0))
        e = max(1, d // 10)
        for ex in (x + 0.32 * d, x + 0.68 * d):
            draw.ellipse((ex - e, y + 0.35 * d - e, ex + e, y + 0.35 * d + e), fill=(0, 0, 0))
        draw.arc((x + 0.25 * d, y + 0.3 * d, x + 0.75 * d, y + 0.75 * d), 20, 160, fill=(0, 0, 0), width=max(1, e))
    return out, f"emoji({n})"


def _text(img: Image.Image, rng: random.Random, _other: Image.Image | None) -> tuple[Image.Image, str]:
    """1-3 random strings of 4-10 characters, 8-25 % of the height, random colours, outlined."""
    out = img.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    n = rng.randint(1, 3)
    for _ in range(n):
        size = max(6, round(rng.uniform(0.08, 0.25) * h))
        font = ImageFont.load_default(size=size)
        words = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(4, 10)))
        xy = (rng.randint(-w // 4, max(0, w - size)), rng.randint(0, max(0, h - size)))
        draw.text(xy, words, font=font, fill=_colour(rng), stroke_width=max(1, size // 12), stroke_fill=_colour(rng))
    return out, f"text({n})"


def _blur(img: Image.Image, rng: random.Random, _other: Image.Image | None) -> tuple[Image.Image, str]:
    """Gaussian blur, sigma 1-3 % of the shorter side (at least 0.5 px)."""
    sigma = max(0.5, rng.uniform(0.01, 0.03) * min(img.size))
    kernel = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(img, [kernel, kernel], [sigma, sigma]), f"blur({sigma:.1f})"


def _pixelate(img: Image.Image, rng: random.Random, _other: Image.Image | None) -> tuple[Image.Image, str]:
    """Blocks of 3-7 % of the shorter side (at least 2 px): box downscale, nearest upscale."""
    w, h = img.size
    block = max(2, round(rng.uniform(0.03, 0.07) * min(w, h)))
    small = img.resize((max(1, w // block), max(1, h // block)), Image.Resampling.BOX)
    return small.resize((w, h), Image.Resampling.NEAREST), f"pixelate({block})"


def _jpeg(img: Image.Image, rng: random.Random, _other: Image.Image | None) -> tuple[Image.Image, str]:
    """Re-encode as JPEG at quality 5-25."""
    quality = rng.randint(5, 25)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB"), f"jpeg({quality})"


_EDIT_FUNCTIONS: dict[str, Edit] = {
    "crop": _crop,
    "rotate": _rotate,
    "flip": _flip,
    "pad": _pad,
    "background": _background,
    "color": _color,
    "grayscale": _grayscale,
    "overlay_image": _overlay_image,
    "emoji": _emoji,
    "text": _text,
    "blur": _blur,
    "pixelate": _pixelate,
    "jpeg": _jpeg,
}
assert tuple(_EDIT_FUNCTIONS) == EDITS


def apply_edits(
    image: Image.Image, names: Sequence[str], rng: random.Random, *, other: Other = None
) -> tuple[Image.Image, list[str]]:
    """Apply the edits `names` (in the order of `EDITS`, whatever their order here) to an RGB image.

    `other` is the second picture of the `background` and `overlay_image` edits, or a function returning it (called
    only when one of them is applied); a drawn picture stands in when it is None. Returns the edited RGB image and
    one description per edit.
    """
    unknown = sorted(set(names) - set(EDITS))
    if unknown:
        raise ValueError(f"unknown edits {unknown}: expected some of {list(EDITS)}")
    if callable(other):
        other = other() if set(names) & set(_NEEDS_OTHER) else None
    out = image.convert("RGB")
    described = []
    for name in EDITS:
        if name in names:
            out, text = _EDIT_FUNCTIONS[name](out, rng, other)
            described.append(text)
    return out.convert("RGB"), described


def random_edits(
    image: Image.Image,
    rng: random.Random,
    *,
    edits: Sequence[str] = EDITS,
    min_edits: int = 2,
    max_edits: int = 4,
    other: Other = None,
) -> tuple[Image.Image, list[str]]:
    """Compose between `min_edits` and `max_edits` distinct edits drawn from `edits` (all of them when fewer).

    An empty `edits` returns an RGB copy of the image (an exact-copy query).
    """
    if min_edits < 0 or max_edits < min_edits:
        raise ValueError(f"need 0 <= min_edits <= max_edits, got {min_edits} and {max_edits}")
    pool = list(dict.fromkeys(edits))
    n = min(len(pool), rng.randint(min_edits, max_edits))
    return apply_edits(image, rng.sample(pool, n), rng, other=other)
