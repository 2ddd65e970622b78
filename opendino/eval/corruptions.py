"""The 15 ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019) at severities 1-5, vectorised in torch on image
batches so that they run on the evaluation device (JPEG alone goes through Pillow on the CPU, image by image).

Every corruption is `fn(images, severity, generator=None) -> images`: `images` (B, 3, H, W) uint8 or float in [0, 1],
H and W >= 32, the same shape, dtype and range back (uint8 results are rounded). Random draws come from `generator`
(a CPU generator gives the same corruption on every device; one on the images' device is faster), one draw per
image, so a seed fixes the result for a given batch. Severity parameters are those of the ImageNet-C generator
(hendrycks/robustness `make_imagenet_c.py`; facts sheet `dense_eval_facts.md` §4.2), in pixels of a 224 px crop and
not rescaled for other sizes (as the `imagecorruptions` package does). The code is ours; where ImageNet-C needs
external tools or assets it deviates (see docs/evaluation/robustness.md):
- frost blends a procedural ice texture (scattered six-armed crystals over a bluish-white haze) instead of
  ImageNet-C's frost photographs;
- motion_blur and the streaks of snow use ImageMagick's motion-blur kernel (a one-sided line of 2r + 1 taps with
  half-Gaussian weights) as shifted copies with edge replication;
- glass_blur's sequential pixel swaps become rounds of a random local gather (each pixel takes a neighbour at an
  offset in [-d, d)), which moves pixels the same distances but does not keep the pixel multiset;
- elastic_transform composes its random affine and elastic displacement into one bilinear resampling;
- zoom_blur, snow's zoom and the samplings above interpolate bilinearly with `grid_sample` (not scipy's grid);
- no 8-bit rounding between steps and no JPEG (quality 85) save after corrupting, which the released files had.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "CORRUPTIONS",
    "brightness",
    "contrast",
    "corrupt",
    "defocus_blur",
    "elastic_transform",
    "fog",
    "frost",
    "gaussian_noise",
    "glass_blur",
    "impulse_noise",
    "jpeg_compression",
    "motion_blur",
    "pixelate",
    "shot_noise",
    "snow",
    "zoom_blur",
]

MIN_SIDE = 32  # the smallest image side the corruptions accept (as `imagecorruptions`)
_GREY = (0.299, 0.587, 0.114)  # RGB -> grey weights of OpenCV's COLOR_RGB2GRAY (snow)


# ------------------------------------------------------------------------------------------------------ helpers
def _draw(kind: str, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """uniform [0, 1) or standard normal draws made on the generator's device, returned on `device`."""
    where = generator.device if generator is not None else device
    fn = torch.rand if kind == "rand" else torch.randn
    return fn(shape, generator=generator, device=where).to(device)


def _uniform(low: float, high: float, shape: tuple[int, ...], generator, device) -> Tensor:
    return low + (high - low) * _draw("rand", shape, generator, device)


@functools.lru_cache(maxsize=64)
def _gaussian_matrix(n: int, sigma: float, truncate: float, mode: str) -> Tensor:
    """(n, n) matrix of a 1-D Gaussian filter (scipy's kernel: radius int(truncate * sigma + 0.5)) with the border
    folded in: row i holds the weights of the input samples of output i. mode: "nearest" (edge repeated) or
    "reflect" (half-sample symmetric, d c b a | a b c d), at any radius, also one larger than n."""
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    index = torch.arange(n)[:, None] + taps.long()[None, :]  # (n, taps)
    if mode == "nearest":
        index = index.clamp(0, n - 1)
    else:
        index = index % (2 * n)
        index = torch.where(index >= n, 2 * n - 1 - index, index)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    matrix.scatter_add_(1, index, weights.expand(n, -1).contiguous())
    return matrix.float()


def _gaussian_filter(x: Tensor, sigma: float, *, truncate: float = 4.0, mode: str = "nearest") -> Tensor:
    """Separable Gaussian blur of the last two dims (as skimage/scipy `gaussian`, default border: nearest)."""
    mh = _gaussian_matrix(x.shape[-2], float(sigma), truncate, mode).to(x.device)
    mw = _gaussian_matrix(x.shape[-1], float(sigma), truncate, mode).to(x.device)
    return mh @ x @ mw.T


@functools.lru_cache(maxsize=64)
def _box_matrix(n_out: int, n_in: int) -> Tensor:
    """(n_out, n_in) weights of Pillow's BOX resampling (`precompute_coeffs` in its Resample.c): output i averages
    the inputs whose centres lie in (-1/2, 1/2] filter widths of its centre (i + 1/2) n_in / n_out, the width being
    max(n_in / n_out, 1) pixels."""
    scale = n_in / n_out
    width = max(scale, 1.0)
    centre = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale)[:, None]
    lo = torch.floor(centre - 0.5 * width + 0.5).clamp(min=0)
    hi = torch.floor(centre + 0.5 * width + 0.5).clamp(max=n_in)
    pixel = torch.arange(n_in, dtype=torch.float64)[None, :]
    rel = (pixel + 0.5 - centre) / width
    weights = ((pixel >= lo) & (pixel < hi) & (rel > -0.5) & (rel <= 0.5)).double()
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def _zoom(x: Tensor, factor: float) -> Tensor:
    """Magnify (B, C, H, W) about the image centre by `factor` >= 1, bilinear, same size."""
    b, _, h, w = x.shape
    ys = ((torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) * 2 / h - 1) / factor  # grid_sample's [-1, 1]
    xs = ((torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) * 2 / w - 1) / factor
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).expand(b, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _motion_blur(x: Tensor, radius: int, sigma: float, angle_deg: Tensor) -> Tensor:
    """ImageMagick's MotionBlurImage: out(p) = sum_i k_i x(p + o_i), k_i ∝ exp(-i² / 2σ²) for i < 2 radius + 1, with
    o_i = (ceil(i cos a - 1/2), ceil(i sin a - 1/2)) (x, y) for the angle a of each image; edges repeated."""
    b, c, h, w = x.shape
    width = 2 * radius + 1
    taps = torch.arange(width, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    angle = torch.deg2rad(angle_deg.float())[:, None]  # (B, 1)
    dx = torch.ceil(taps * torch.cos(angle) - 0.5).long()  # (B, width)
    dy = torch.ceil(taps * torch.sin(angle) - 0.5).long()
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    flat = x.flatten(2)  # (B, C, H*W)
    out = torch.zeros_like(flat)
    for i in range(width):
        ys = (rows[None, :] + dy[:, i : i + 1]).clamp(0, h - 1)  # (B, H)
        xs = (cols[None, :] + dx[:, i : i + 1]).clamp(0, w - 1)  # (B, W)
        index = (ys[:, :, None] * w + xs[:, None, :]).flatten(1)  # (B, H*W)
        out += kernel[i] * flat.gather(2, index[:, None, :].expand(b, c, h * w))
    return out.view_as(x)


# -------------------------------------------------------------------------------------------------- corruptions
# Each takes a float (B, 3, H, W) batch in [0, 1] (the public wrappers below check and convert).
def _gaussian_noise(x: Tensor, severity: int, g) -> Tensor:
    std = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return x + std * _draw("randn", tuple(x.shape), g, x.device)


def _shot_noise(x: Tensor, severity: int, g) -> Tensor:
    photons = (60, 25, 12, 5, 3)[severity - 1]  # Poisson(x * photons) / photons
    rates = (x * photons).to(g.device if g is not None else x.device)
    return torch.poisson(rates, generator=g).to(x.device) / photons


def _impulse_noise(x: Tensor, severity: int, g) -> Tensor:
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]  # salt-and-pepper: this fraction of values -> 0 or 1
    flipped = _draw("rand", tuple(x.shape), g, x.device) < amount
    salt = (_draw("rand", tuple(x.shape), g, x.device) < 0.5).to(x.dtype)
    return torch.where(flipped, salt, x)


@functools.lru_cache(maxsize=8)
def _disk_kernel(radius: int, alias_blur: float) -> Tensor:
    """ImageNet-C's defocus kernel: a normalised disk on a grid of half-width max(8, radius), antialiased by a 3x3
    (radius <= 8) or 5x5 Gaussian of sigma alias_blur with reflect-101 borders (OpenCV GaussianBlur)."""
    half = max(8, radius)
    coords = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((coords[:, None] ** 2 + coords[None, :] ** 2) <= radius**2).double()
    disk /= disk.sum()
    ksize = 3 if radius <= 8 else 5
    taps = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    g = torch.exp(-(taps**2) / (2 * alias_blur**2))
    g /= g.sum()
    padded = F.pad(disk[None, None], (ksize // 2,) * 4, mode="reflect")
    return F.conv2d(padded, (g[:, None] * g[None, :])[None, None])[0, 0].float()


def _defocus_blur(x: Tensor, severity: int, g) -> Tensor:
    radius, alias_blur = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[severity - 1]
    kernel = _disk_kernel(radius, alias_blur).to(x.device)
    pad = kernel.shape[-1] // 2
    padded = F.pad(x, (pad,) * 4, mode="reflect")  # OpenCV filter2D's default border (reflect-101)
    return F.conv2d(padded, kernel.expand(x.shape[1], 1, -1, -1), groups=x.shape[1])


def _glass_blur(x: Tensor, severity: int, g) -> Tensor:
    sigma, delta, rounds = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[severity - 1]
    b, _, h, w = x.shape
    x = torch.floor(_gaussian_filter(x, sigma).clamp(0, 1) * 255) / 255  # ImageNet-C shuffles 8-bit values
    rows = torch.arange(h, device=x.device)[:, None].expand(h, w)
    cols = torch.arange(w, device=x.device)[None, :].expand(h, w)
    inner = (rows > delta) & (rows <= h - delta) & (cols > delta) & (cols <= w - delta)  # pixels ImageNet-C visits
    for _ in range(rounds):
        offsets = torch.floor(_uniform(-delta, delta, (b, 2, h, w), g, x.device)).long()  # randint(-d, d)
        src_r = torch.where(inner, rows + offsets[:, 0], rows)  # (B, H, W)
        src_c = torch.where(inner, cols + offsets[:, 1], cols)
        flat = (src_r * w + src_c).flatten(1)[:, None, :].expand(-1, x.shape[1], -1)
        x = x.flatten(2).gather(2, flat).view_as(x)
    return _gaussian_filter(x, sigma)


def _motion_blur_images(x: Tensor, severity: int, g) -> Tensor:
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[severity - 1]
    return _motion_blur(x, radius, sigma, _uniform(-45, 45, (x.shape[0],), g, x.device))


_ZOOM_STOPS = ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03))  # np.arange(1, stop, step)


def _zoom_blur(x: Tensor, severity: int, g) -> Tensor:
    factors = np.arange(1, *_ZOOM_STOPS[severity - 1])
    out = x.clone()
    for factor in factors:
        out += _zoom(x, float(factor))
    return out / (len(factors) + 1)


def _snow(x: Tensor, severity: int, g) -> Tensor:
    # flake density (mean, std of a normal field), flake size (zoom), threshold, streak radius and sigma, image blend
    mean, std, zoom, threshold, radius, sigma, blend = (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    )[severity - 1]
    b, _, h, w = x.shape
    flakes = _zoom(mean + std * _draw("randn", (b, 1, h, w), g, x.device), zoom)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes).clamp(0, 1)
    flakes = _motion_blur(flakes, radius, sigma, _uniform(-135, -45, (b,), g, x.device))  # (B, 1, H, W)
    grey = torch.einsum("bchw,c->bhw", x, torch.tensor(_GREY, device=x.device, dtype=x.dtype))[:, None]
    x = blend * x + (1 - blend) * torch.maximum(x, grey * 1.5 + 0.5)
    return x + flakes + flakes.flip(-1, -2)


def _crystal_kernels(b: int, h: int, w: int, length: int, g, device: torch.device) -> Tensor:
    """(B, 1, H, W) six-armed crystals (three lines through the centre, tapering over `length` px, at a random turn
    per image) centred at pixel (0, 0) of the torus, for a circular convolution."""
    length = min(length, (min(h, w) - 1) // 2)
    offsets = torch.arange(-length, length + 1, device=device, dtype=torch.float32)
    ys, xs = offsets[:, None], offsets[None, :]
    turn = _uniform(0, math.pi / 3, (b, 1, 1, 1), g, device)
    star = torch.zeros(b, 1, 2 * length + 1, 2 * length + 1, device=device)
    for k in range(3):
        angle = turn + k * math.pi / 3
        along = xs * torch.cos(angle) + ys * torch.sin(angle)
        across = ys * torch.cos(angle) - xs * torch.sin(angle)
        star += torch.exp(-0.5 * (across / 0.6) ** 2) * (1 - along.abs() / length).clamp(min=0)
    star = F.pad(star, (0, w - star.shape[-1], 0, h - star.shape[-2]))
    return star.roll((-length, -length), dims=(-2, -1))


def _frost_texture(b: int, h: int, w: int, g, device: torch.device) -> Tensor:
    """(B, 3, H, W) procedural frost in [0, 1]: six-armed ice crystals of three sizes scattered at random (sparse
    seeds circularly convolved with crystal kernels) over a haze whose level varies per image, tinted bluish white.
    Calibrated to the mean colour (about 0.57, 0.66, 0.70) and grey contrast (std 0.07-0.17) of ImageNet-C's frost
    photographs."""
    crystals = torch.zeros(b, 1, h, w, device=device)
    for length, density, weight in ((36, 0.0006, 1.0), (18, 0.0025, 0.7), (8, 0.01, 0.45)):
        seeds = (_draw("rand", (b, 1, h, w), g, device) < density) * _uniform(0.4, 1.0, (b, 1, h, w), g, device)
        kernels = _crystal_kernels(b, h, w, length, g, device)
        crystals += weight * torch.fft.irfft2(torch.fft.rfft2(seeds) * torch.fft.rfft2(kernels), s=(h, w))
    haze = _uniform(0.33, 0.73, (b, 1, 1, 1), g, device)
    grey = haze + 0.55 * torch.tanh(1.2 * crystals) + 0.04 * _draw("rand", (b, 1, h, w), g, device)
    tint = torch.tensor((0.84, 0.95, 1.0), device=device).view(1, 3, 1, 1)
    return (grey * tint).clamp(0, 1)


def _frost(x: Tensor, severity: int, g) -> Tensor:
    image_weight, frost_weight = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[severity - 1]
    b, _, h, w = x.shape
    return image_weight * x + frost_weight * _frost_texture(b, h, w, g, x.device)


def _plasma(b: int, size: int, decay: float, g, device: torch.device) -> Tensor:
    """(B, size, size) diamond-square height maps in [0, 1] (size a power of two), as ImageNet-C's fog: the random
    offset of each level is uniform(-wibble, wibble) * wibble, wibble = 100 / decay**level."""
    m = torch.zeros(b, size, size, device=device)
    step, wibble = size, 100.0

    def wibbled(a: Tensor) -> Tensor:
        return a / 4 + wibble * _uniform(-wibble, wibble, tuple(a.shape), g, device)

    while step >= 2:
        half = step // 2
        corners = m[:, ::step, ::step]
        squares = corners + corners.roll(-1, dims=1)
        squares = squares + squares.roll(-1, dims=2)
        m[:, half::step, half::step] = wibbled(squares)
        centres, corners = m[:, half::step, half::step], m[:, ::step, ::step]
        m[:, ::step, half::step] = wibbled(centres + centres.roll(1, dims=1) + corners + corners.roll(-1, dims=2))
        m[:, half::step, ::step] = wibbled(centres + centres.roll(1, dims=2) + corners + corners.roll(-1, dims=1))
        step, wibble = half, wibble / decay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


def _fog(x: Tensor, severity: int, g) -> Tensor:
    strength, decay = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[severity - 1]
    b, _, h, w = x.shape
    size = 1 << (max(h, w) - 1).bit_length()  # ImageNet-C: 256 for its 224 px crops
    fog_map = _plasma(b, size, decay, g, x.device)[:, None, :h, :w]
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + strength * fog_map) * peak / (peak + strength)


def _brightness(x: Tensor, severity: int, g) -> Tensor:
    """HSV value + c: with hue and saturation fixed RGB scales with V (a black pixel becomes grey V')."""
    shift = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    value = x.amax(dim=1, keepdim=True)
    new = (value + shift).clamp(max=1)
    return torch.where(value > 0, x * new / value.clamp(min=1e-12), new.expand_as(x))


def _contrast(x: Tensor, severity: int, g) -> Tensor:
    factor = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    mean = x.mean(dim=(2, 3), keepdim=True)  # per image and channel
    return (x - mean) * factor + mean


# ImageNet-C's table in units of 244 px ("should have been 224"): elastic alpha, elastic sigma, affine jitter
_ELASTIC = ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02))


def _elastic_transform(x: Tensor, severity: int, g) -> Tensor:
    """Random affine (three points jittered by up to `jitter` px) then a smooth random displacement field
    (uniform(-1, 1) noise, Gaussian sigma, times alpha), sampled once bilinearly with reflected borders."""
    alpha, sigma, jitter = (244 * v for v in _ELASTIC[severity - 1])
    b, _, h, w = x.shape
    dev = x.device
    centre_x, centre_y, side = float(w // 2), float(h // 2), float(min(h, w) // 3)
    src = torch.tensor(
        [[centre_x + side, centre_y + side], [centre_x + side, centre_y - side], [centre_x - side, centre_y - side]],
        device=dev,
    )  # (3, 2) (x, y)
    dst = src + _uniform(-jitter, jitter, (b, 3, 2), g, dev)
    ones = torch.ones(b, 3, 1, device=dev)
    inverse = torch.linalg.solve(torch.cat([dst, ones], dim=2), src.expand(b, 3, 2))  # (B, 3, 2): [x y 1] -> source
    field = _gaussian_filter(_uniform(-1, 1, (b, 2, h, w), g, dev), sigma, truncate=3.0, mode="reflect") * alpha
    ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    px = xs[None].float() + field[:, 0]  # (B, H, W): where the displaced pixel lies in the affine-warped image
    py = ys[None].float() + field[:, 1]
    points = torch.stack([px, py, torch.ones_like(px)], dim=-1)  # (B, H, W, 3)
    source = torch.einsum("bhwk,bkj->bhwj", points, inverse)  # (B, H, W, 2) (x, y) in the input image
    grid = torch.stack([source[..., 0] / (w - 1), source[..., 1] / (h - 1)], dim=-1) * 2 - 1
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def _pixelate(x: Tensor, severity: int, g) -> Tensor:
    """Pillow BOX resize down to int(side * c), then BOX back up (ImageNet-C)."""
    factor = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    h, w = x.shape[-2:]
    sh, sw = int(h * factor), int(w * factor)
    down = _box_matrix(sh, h).to(x.device) @ x @ _box_matrix(sw, w).to(x.device).T
    return _box_matrix(h, sh).to(x.device) @ down @ _box_matrix(w, sw).to(x.device).T


def _jpeg_compression(x: Tensor, severity: int, g) -> Tensor:
    """A Pillow JPEG encode / decode round trip at quality c, image by image on the CPU (as ImageNet-C)."""
    quality = (25, 18, 15, 10, 7)[severity - 1]
    images = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    decoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255


# ----------------------------------------------------------------------------------------------- public functions
def _public(name: str, fn: Callable[[Tensor, int, torch.Generator | None], Tensor]) -> Callable:
    def corruption(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{name}: expected an image batch (B, 3, H, W), got {shape}")
        if min(images.shape[-2:]) < MIN_SIDE:
            raise ValueError(
                f"{name}: images of {tuple(images.shape[-2:])} px; the corruptions need sides >= {MIN_SIDE}"
            )
        if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
            raise ValueError(f"{name}: severity must be an int in 1..5, got {severity!r}")
        if images.dtype == torch.uint8:
            out = fn(images.float() / 255, severity, generator)
            return (out.clamp(0, 1) * 255).round().to(torch.uint8)
        if not images.is_floating_point():
            raise TypeError(f"{name}: images must be uint8 or float in [0, 1], got {images.dtype}")
        return fn(images.float(), severity, generator).clamp(0, 1).to(images.dtype)

    corruption.__name__ = corruption.__qualname__ = name
    corruption.__doc__ = (
        f"ImageNet-C {name} of a (B, 3, H, W) uint8 or [0, 1] float batch at severity 1..5 (same shape and dtype)."
        + (f"\n\n{fn.__doc__}" if fn.__doc__ else "")
    )
    return corruption


gaussian_noise = _public("gaussian_noise", _gaussian_noise)
shot_noise = _public("shot_noise", _shot_noise)
impulse_noise = _public("impulse_noise", _impulse_noise)
defocus_blur = _public("defocus_blur", _defocus_blur)
glass_blur = _public("glass_blur", _glass_blur)
motion_blur = _public("motion_blur", _motion_blur_images)
zoom_blur = _public("zoom_blur", _zoom_blur)
snow = _public("snow", _snow)
frost = _public("frost", _frost)
fog = _public("fog", _fog)
brightness = _public("brightness", _brightness)
contrast = _public("contrast", _contrast)
elastic_transform = _public("elastic_transform", _elastic_transform)
pixelate = _public("pixelate", _pixelate)
jpeg_compression = _public("jpeg_compression", _jpeg_compression)

_BY_NAME: dict[str, Callable[..., Tensor]] = {
    f.__name__: f
    for f in (gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur, snow,
              frost, fog, brightness, contrast, elastic_transform, pixelate, jpeg_compression)
}  # fmt: skip
CORRUPTIONS: tuple[str, ...] = tuple(_BY_NAME)  # the 15 of the benchmark, in ImageNet-C's order


def corrupt(images: Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Apply the ImageNet-C corruption `name` (one of CORRUPTIONS) at `severity` 1..5 to a (B, 3, H, W) batch."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown corruption {name!r}; expected one of {list(CORRUPTIONS)}")
    return _BY_NAME[name](images, severity, generator)
