"""The 15 ImageNet-C corruptions: contracts (shape, dtype, range, determinism, errors), exact formulas against
independent computations (colorsys, Pillow, scipy, reference loops), noise statistics and growth with severity."""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from opendino.eval import corruptions as C
from opendino.eval.corruptions import CORRUPTIONS, corrupt

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: thread sync would dominate

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform"}  # fmt: skip
# steps s -> s + 1 where ImageNet-C's own severity table changes the pixels less (measured on photos with the
# reference code: glass blur's sigma / shuffle pairs, snow 2 -> 3, frost 3 -> 4, elastic 1-2 affine vs 3-5 local)
KNOWN_DIPS = {"glass_blur": {1, 3}, "snow": {2}, "frost": {3}, "elastic_transform": {2}}


def natural_images(n: int = 3, h: int = 64, w: int = 96, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, h, w): colour noise with a 1/f spectrum (as natural images) and a few flat shapes."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    amplitude = 1 / np.maximum(np.hypot(fy, fx), 1 / max(h, w))
    out = []
    for _ in range(n):
        field = np.stack([np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.random((h, w)))).real for _ in range(3)], -1)
        field = (field - field.min()) / (field.max() - field.min())
        img = Image.fromarray((255 * (0.2 + 0.6 * field)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x0, y0, x0 + int(rng.integers(10, 30)), y0 + int(rng.integers(10, 30)))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return torch.stack(out)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mean_abs_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


# ------------------------------------------------------------------------------------------------------ contracts
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_range_and_determinism(name):
    images = natural_images(2, 32, 48)
    for severity in (1, 5):
        out = corrupt(images, name, severity, gen(1))
        assert out.shape == images.shape and out.dtype == torch.uint8
        assert torch.equal(out, corrupt(images, name, severity, gen(1)))  # the same seed, the same images
        if name in RANDOM:
            assert not torch.equal(out, corrupt(images, name, severity, gen(2)))
        floats = corrupt(images.float() / 255, name, severity, gen(1))
        assert floats.dtype == torch.float32 and floats.shape == images.shape
        assert floats.min() >= 0 and floats.max() <= 1
        # the uint8 path is the float path rounded
        assert (floats * 255 - out.float()).abs().max() <= 0.5 + 1e-3
    assert corrupt(images[:1], name, 3, gen()).shape == (1, 3, 32, 48)
    assert corrupt(natural_images(1, 80, 36), name, 2, gen()).shape == (1, 3, 80, 36)  # portrait, non-square


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_mean_absolute_change_grows_with_severity(name):
    images = natural_images(3, 64, 96)
    change = [mean_abs_change(corrupt(images, name, s, gen(0)), images) for s in range(1, 6)]
    for s in range(1, 5):
        if s not in KNOWN_DIPS.get(name, ()):
            assert change[s] > change[s - 1], f"{name}: severity {s + 1} changes less than {s}: {change}"
    if name == "elastic_transform":  # ImageNet-C: 1-2 large affine warps, 3-5 growing local displacement
        assert change[1] > change[0] and change[4] > change[2]
    else:
        assert change[4] > change[0] > 0


def test_bad_inputs_are_refused():
    images = natural_images(1, 32, 32)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "rain", 1)
    for severity in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(images, "fog", severity)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        corrupt(images[0], "fog", 1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        corrupt(images[:, :1], "fog", 1)
    with pytest.raises(ValueError, match=">= 32"):
        corrupt(natural_images(1, 32, 32)[..., :31], "fog", 1)
    with pytest.raises(TypeError, match="uint8 or float"):
        corrupt(images.int(), "fog", 1)


# ----------------------------------------------------------------------------------------------- exact formulas
def test_brightness_adds_to_the_hsv_value():
    images = natural_images(1, 32, 32, seed=3).float() / 255
    images[0, :, 0, 0] = 0  # a black pixel becomes grey
    for severity, shift in zip(range(1, 6), (0.1, 0.2, 0.3, 0.4, 0.5), strict=True):
        out = C.brightness(images, severity)
        pixels = images[0].permute(1, 2, 0).reshape(-1, 3).double().numpy()
        expected = []
        for r, g, b in pixels:
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            expected.append(colorsys.hsv_to_rgb(h, s, min(v + shift, 1.0)))
        expected = torch.tensor(expected).reshape(32, 32, 3).permute(2, 0, 1)
        torch.testing.assert_close(out[0].double(), expected, atol=1e-6, rtol=0)
        assert torch.allclose(out[0, :, 0, 0], torch.full((3,), shift))


def test_contrast_shrinks_towards_the_channel_mean():
    images = natural_images(2, 40, 32).float() / 255
    for severity, factor in zip(range(1, 6), (0.4, 0.3, 0.2, 0.1, 0.05), strict=True):
        mean = images.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(C.contrast(images, severity), (images - mean) * factor + mean)


def test_jpeg_equals_a_pillow_round_trip():
    images = natural_images(2, 48, 40)
    for severity, quality in zip(range(1, 6), (25, 18, 15, 10, 7), strict=True):
        out = C.jpeg_compression(images, severity)
        for i in range(2):
            buf = io.BytesIO()
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=quality)
            expected = np.asarray(Image.open(buf).convert("RGB"))
            np.testing.assert_array_equal(out[i].permute(1, 2, 0).numpy(), expected)


def test_pixelate_is_a_pillow_box_resize_down_and_up():
    images = natural_images(2, 50, 36)
    for severity, factor in zip(range(1, 6), (0.6, 0.5, 0.4, 0.3, 0.25), strict=True):
        out = C.pixelate(images, severity)
        for i in range(2):
            pil = Image.fromarray(images[i].permute(1, 2, 0).numpy())
            small = pil.resize((int(36 * factor), int(50 * factor)), Image.BOX)
            expected = np.asarray(small.resize((36, 50), Image.BOX)).astype(int)
            diff = np.abs(out[i].permute(1, 2, 0).numpy().astype(int) - expected)
            assert diff.max() <= 1, f"severity {severity}: off by {diff.max()}"  # Pillow rounds between passes


@pytest.mark.parametrize(("n", "sigma", "mode"), [(40, 1.5, "nearest"), (32, 2.44, "reflect"), (24, 19.5, "reflect")])
def test_gaussian_filter_matches_scipy(n, sigma, mode):
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, n, n + 5))
    truncate = 3.0 if mode == "reflect" else 4.0
    ours = C._gaussian_filter(torch.from_numpy(x).float(), sigma, truncate=truncate, mode=mode).numpy()
    ref = ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode=mode, truncate=truncate)
    np.testing.assert_allclose(ours, ref, atol=2e-6)


def test_defocus_is_a_disk_average_with_reflected_borders():
    kernel = C._disk_kernel(3, 0.1).double()  # alias blur of sigma 0.1: no blur at all
    coords = np.arange(-8, 9)
    disk = ((coords[:, None] ** 2 + coords[None, :] ** 2) <= 9).astype(np.float64)
    np.testing.assert_allclose(kernel.numpy(), disk / disk.sum(), atol=1e-12)
    images = natural_images(1, 40, 48).float() / 255
    expected = np.stack([ndimage.correlate(images[0, c].double().numpy(), disk / disk.sum(), mode="mirror")
                         for c in range(3)])  # fmt: skip
    np.testing.assert_allclose(C.defocus_blur(images, 1)[0].numpy(), np.clip(expected, 0, 1), atol=1e-5)


def test_motion_blur_is_a_one_sided_half_gaussian_line():
    x = torch.rand(2, 3, 33, 40, generator=gen())
    angles = torch.tensor([30.0, -45.0])
    out = C._motion_blur(x, 6, 2.5, angles).numpy()
    taps = np.arange(13)
    weights = np.exp(-(taps**2) / (2 * 2.5**2))
    weights /= weights.sum()
    for b, angle in enumerate(angles.tolist()):
        expected = np.zeros((3, 33, 40))
        for i, w in enumerate(weights):  # ImageMagick: out(x, y) += k_i in(x + ox_i, y + oy_i), edges repeated
            ox = int(np.ceil(i * np.cos(np.deg2rad(angle)) - 0.5))
            oy = int(np.ceil(i * np.sin(np.deg2rad(angle)) - 0.5))
            rows = np.clip(np.arange(33) + oy, 0, 32)
            cols = np.clip(np.arange(40) + ox, 0, 39)
            expected += w * x[b].numpy()[:, rows][:, :, cols]
        np.testing.assert_allclose(out[b], expected, atol=1e-5)


def test_zoom_blur_averages_centre_zooms():
    images = natural_images(1, 40, 52).float() / 255
    stops = (1.11, 1.16, 1.21, 1.26, 1.31)
    steps = (0.01, 0.01, 0.02, 0.02, 0.03)
    for severity in (1, 5):
        factors = np.arange(1, stops[severity - 1], steps[severity - 1])
        x = images[0].double().numpy()
        centre = (np.array(x.shape[1:]) - 1) / 2
        zooms = [
            np.stack([ndimage.affine_transform(x[c], np.eye(2) / z, offset=centre - centre / z, order=1)
                      for c in range(3)])
            for z in factors
        ]  # fmt: skip
        expected = (x + sum(zooms)) / (len(factors) + 1)
        np.testing.assert_allclose(C.zoom_blur(images, severity)[0].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "elastic_transform",
                                  "pixelate"])  # fmt: skip
def test_blurs_and_warps_keep_a_flat_image(name):
    flat = torch.full((2, 3, 40, 56), 0.37)
    for severity in (1, 5):
        out = corrupt(flat, name, severity, gen())
        expected = 0.37
        if name == "defocus_blur":  # ImageNet-C's kernels at radius 8 and 10 sum to about 1.01 (reflected antialias)
            expected *= C._disk_kernel(*((3, 0.1), (10, 0.5))[severity > 1]).sum().item()
        assert (out - expected).abs().max() < (1 / 255 if name == "glass_blur" else 1e-5)  # glass rounds to 8 bit


# ------------------------------------------------------------------------------------------------------- noises
def test_gaussian_noise_statistics():
    grey = torch.full((4, 3, 64, 64), 0.5)
    for severity, std in zip((1, 2, 3), (0.08, 0.12, 0.18), strict=True):
        noise = C.gaussian_noise(grey, severity, gen(severity)) - 0.5
        assert abs(noise.mean().item()) < 0.003
        assert noise.std().item() == pytest.approx(std, rel=0.02)
        assert noise.abs().max() < 6 * std  # nothing clipped at these severities


def test_shot_noise_is_poisson_photon_counts():
    grey = torch.full((4, 3, 64, 64), 0.5)
    photons = 60
    out = C.shot_noise(grey, 1, gen())
    counts = out * photons
    assert torch.allclose(counts, counts.round(), atol=1e-4)  # whole photon counts
    assert counts.mean().item() == pytest.approx(0.5 * photons, rel=0.01)
    assert counts.var().item() == pytest.approx(0.5 * photons, rel=0.05)  # Poisson: variance = mean


def test_impulse_noise_salts_and_peppers_the_stated_fraction():
    grey = torch.full((4, 3, 64, 64), 0.5)
    for severity, amount in zip((1, 5), (0.03, 0.27), strict=True):
        out = C.impulse_noise(grey, severity, gen())
        flipped = out != 0.5
        assert flipped.float().mean().item() == pytest.approx(amount, rel=0.06)
        assert set(out[flipped].unique().tolist()) == {0.0, 1.0}
        assert (out[flipped] == 1).float().mean().item() == pytest.approx(0.5, abs=0.03)


# ------------------------------------------------------------------------------------------ procedural textures
def test_fog_height_map_and_frost_texture():
    plasma = C._plasma(3, 64, 1.5, gen(), torch.device("cpu"))
    assert plasma.shape == (3, 64, 64)
    assert torch.allclose(plasma.amin(dim=(1, 2)), torch.zeros(3))
    assert torch.allclose(plasma.amax(dim=(1, 2)), torch.ones(3))
    assert not torch.equal(plasma[0], plasma[1])  # one map per image
    rough, smooth = (C._plasma(16, 64, d, gen(), torch.device("cpu")) for d in (1.4, 3.0))
    roughness = [(m.diff(dim=-1).abs().mean() / m.std()).item() for m in (rough, smooth)]
    assert roughness[0] > roughness[1]  # a smaller decay keeps more fine detail
    frost = C._frost_texture(8, 96, 96, gen(), torch.device("cpu"))
    assert frost.shape == (8, 3, 96, 96) and frost.min() >= 0 and frost.max() <= 1
    colour = frost.mean(dim=(0, 2, 3))
    assert colour[0] < colour[1] < colour[2]  # bluish white
    torch.testing.assert_close(colour, torch.tensor([0.57, 0.66, 0.70]), atol=0.08, rtol=0)
    assert 0.05 < frost.mean(1).std(dim=(1, 2)).mean().item() < 0.2


@pytest.mark.gpu
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_run_on_the_gpu(name):
    images = natural_images(2, 48, 64)
    cpu = corrupt(images, name, 3, gen())
    on_gpu = corrupt(images.cuda(), name, 3, gen())  # a CPU generator: the same draws on every device
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8
    assert (on_gpu.cpu().int() - cpu.int()).abs().float().mean() < 0.5
    cuda_gen = torch.Generator(device="cuda").manual_seed(0)
    assert corrupt(images.cuda(), name, 3, cuda_gen).shape == images.shape
