"""opendino.viz pure functions: input sizes, PCA and its sign rule (against scikit-learn), foreground by the first
component with the border rule, PCA colours, similarity, mutual nearest neighbours (against a reference loop and on
a shifted copy) and class-token attention (against a direct computation).

The separation tests use a constructed backbone whose patch tokens depend only on the patch's own pixels (no
position embedding, every residual branch zero: token = final LayerNorm(patch embedding)), so a textured region and
a flat one are told apart by construction, not by luck."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _util import content_vit
from PIL import Image

from opendino.models.hub import build_backbone
from opendino.viz import (
    ImageFeatures,
    cls_attention,
    fit_pca,
    foreground_masks,
    image_features,
    input_size,
    mutual_nearest_neighbours,
    patch_at,
    pca_maps,
    prepare_image,
    similarity_map,
)
from opendino.viz.core import border_mask
from opendino.viz.figures import foreground_overlay, mask_picture, match_picture, upsample

pytestmark = pytest.mark.usefixtures("one_thread")

GREY = 128


def texture(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def square_scene(textured_object: bool, size: int = 64, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A square of 6 x 6 patches (8 px) in the middle of an 8 x 8 patch grid, the background a ring of one patch:
    textured on flat grey, or flat grey on texture. Returns the image and the (8, 8) object mask."""
    tex = texture(size, size, seed)
    flat = np.full_like(tex, GREY)
    obj = np.zeros((8, 8), dtype=bool)
    obj[1:7, 1:7] = True
    inside = upsample(obj, (size, size))[..., None]
    pixels = np.where(inside, tex, flat) if textured_object else np.where(inside, flat, tex)
    return Image.fromarray(pixels), obj


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return content_vit()


# ------------------------------------------------------------------------------------------------ inputs
def test_input_size_keeps_the_aspect_ratio_on_the_patch_grid():
    assert input_size(451, 300, 64, 8) == (64, 96)  # 451 / 300 * 64 = 96.2 -> 12 patches
    assert input_size(300, 451, 64, 8) == (96, 64)
    assert input_size(100, 100, 448, 14) == (448, 448)
    assert input_size(1000, 10, 64, 8) == (64, 256)  # beyond 4:1 squashed to 4:1
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        input_size(100, 100, 100, 14)


def test_image_features_shapes_and_registers_left_out():
    torch.manual_seed(0)
    vit = build_backbone("debug", num_register_tokens=2).eval()
    image = Image.fromarray(texture(30, 45, 1))
    f = image_features(vit, image, image_size=32)
    assert f.image.shape == (32, 48, 3) and f.patches.shape == (4, 6, 96) and f.cls.shape == (96,)
    out = vit.forward_features(torch.zeros(1, 3, 32, 48))
    assert out["x_norm_patchtokens"].shape[1] == 24  # 4 x 6 patches, the 2 registers excluded
    assert f.grid == (4, 6) and patch_at(f, 47.5, 0) == (0, 5) and patch_at(f, 8, 31) == (3, 1)
    with pytest.raises(ValueError, match="outside"):
        patch_at(f, 48, 0)


# ------------------------------------------------------------------------------------------------ PCA
def test_fit_pca_matches_scikit_learn_and_fixes_the_sign():
    from sklearn.decomposition import PCA as SkPCA

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) + 3.0
    ours = fit_pca(x, 3)
    ref = SkPCA(3).fit(x)
    np.testing.assert_allclose(np.abs(ours.components), np.abs(ref.components_), atol=1e-8)
    np.testing.assert_allclose(ours.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-8)
    rows = np.arange(3)
    assert (ours.components[rows, np.abs(ours.components).argmax(axis=1)] > 0).all()
    # the same components whatever the row order or a global sign flip of the data (eigh's sign is arbitrary)
    for other in (x[rng.permutation(len(x))], -x + 1.0):
        np.testing.assert_allclose(fit_pca(other, 3).components, ours.components, atol=1e-8)
    np.testing.assert_allclose(
        ours.transform(x), ref.transform(x) * np.sign(ours.components @ ref.components_.T).diagonal()
    )


def test_fit_pca_rejects_bad_input():
    with pytest.raises(ValueError, match="n_components"):
        fit_pca(np.zeros((5, 2)), 3)
    with pytest.raises(ValueError, match="non-empty"):
        fit_pca(np.zeros((0, 4)), 1)


# ------------------------------------------------------------------------------------------------ foreground
def _features(model, image: Image.Image) -> ImageFeatures:
    return image_features(model, image, image_size=64)


@pytest.mark.parametrize("textured_object", [True, False])
def test_foreground_is_the_square_whatever_the_component_sign(model, textured_object):
    image, obj = square_scene(textured_object)
    f = _features(model, image)
    assert f.grid == (8, 8)
    fg = foreground_masks([f])
    np.testing.assert_array_equal(fg.masks[0], obj)  # the border rule picks the side that does not touch the border
    flipped = ImageFeatures(f.image, -f.patches, f.cls, f.patch_size)  # flips the first component's raw sign
    np.testing.assert_array_equal(foreground_masks([flipped]).masks[0], obj)
    assert fg.scores[0][obj].min() > 0 > fg.scores[0][~obj].max()
    assert np.isclose(np.concatenate([s.ravel() for s in fg.scores]).std(), 1.0)  # scores in standard deviations
    assert not foreground_masks([f], threshold=100.0).masks[0].any()


def test_left_and_right_halves_are_separated(model):
    """Textured left half, flat right half: foreground is exactly one half, the PCA colours exactly that half."""
    pixels = np.full((64, 64, 3), GREY, np.uint8)
    pixels[:, :32] = texture(64, 32, 3)
    f = _features(model, Image.fromarray(pixels))
    maps = pca_maps([f])
    left = np.zeros((8, 8), bool)
    left[:, :4] = True
    mask = maps.masks[0]
    assert (mask == left).all() or (mask == ~left).all()
    scores = maps.foreground.scores[0]
    assert scores[:, :4].min() > scores[:, 4:].max() or scores[:, 4:].min() > scores[:, :4].max()
    rgb = maps.rgb[0]
    assert (rgb[~mask] == 0).all() and (rgb[mask].max(axis=1) > 0).all()  # background black, foreground coloured
    # with the background kept, the first colour component (red) tells the halves apart
    red = pca_maps([f], remove_background=False).rgb[0][..., 0]
    assert red[:, :4].min() > red[:, 4:].max() or red[:, 4:].min() > red[:, :4].max()
    assert red.min() == 0 and red.max() == 1  # min-max scaled


def test_pca_maps_over_a_set_is_deterministic_and_order_free(model):
    feats = [_features(model, square_scene(True, seed=s)[0]) for s in range(3)]
    a, b = pca_maps(feats), pca_maps(feats)
    for x, y in zip(a.rgb, b.rgb, strict=True):
        assert np.array_equal(x, y)
    c = pca_maps(feats[::-1])
    for x, y in zip(a.rgb, c.rgb[::-1], strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    everything = pca_maps(feats, remove_background=False)
    assert all(m.all() for m in everything.masks) and everything.foreground is None
    with pytest.raises(ValueError, match="masks of shapes"):
        pca_maps(feats[:1], masks=[np.ones((3, 3), bool)])


def test_border_mask():
    m = border_mask(4, 5)
    assert m.sum() == 4 * 5 - 2 * 3 and not m[1:3, 1:4].any()


# ------------------------------------------------------------------------------------------------ similarity, matches
@pytest.fixture(scope="module")
def shifted_pair(model):
    """A texture and its copy shifted right by 2 patches (16 px), the uncovered strip filled with new texture."""
    a = texture(64, 64, 5)
    b = texture(64, 64, 6)
    b[:, 16:] = a[:, :48]
    return _features(model, Image.fromarray(a)), _features(model, Image.fromarray(b))


def test_mutual_neighbours_of_a_shifted_copy_follow_the_shift(shifted_pair):
    a, b = shifted_pair
    m = mutual_nearest_neighbours(a, b)
    exact = m.similarity > 0.9999
    assert exact.sum() == 8 * 6  # every patch with a partner
    assert exact[: 8 * 6].all() and (np.diff(m.similarity) <= 0).all()  # strongest first
    np.testing.assert_array_equal(m.b[exact], np.add(m.a[exact], [0, 2]))
    top = mutual_nearest_neighbours(a, b, top=10)
    assert len(top) == 10 and (top.b == np.add(top.a, [0, 2])).all()
    # masks restrict both sides
    mask_a = np.zeros((8, 8), bool)
    mask_a[:, 0] = True
    only = mutual_nearest_neighbours(a, b, mask_a=mask_a)
    assert (only.a[:, 1] == 0).all() and (only.b[only.similarity > 0.9999][:, 1] == 2).all()
    with pytest.raises(ValueError, match="mask_b has shape"):
        mutual_nearest_neighbours(a, b, mask_b=np.ones((2, 2), bool))


def test_mutual_neighbours_match_a_reference_loop():
    rng = np.random.default_rng(0)
    fa = ImageFeatures(np.zeros((24, 32, 3), np.uint8), rng.normal(size=(3, 4, 5)).astype(np.float32), np.zeros(5), 8)
    fb = ImageFeatures(np.zeros((16, 40, 3), np.uint8), rng.normal(size=(2, 5, 5)).astype(np.float32), np.zeros(5), 8)
    mask_b = rng.random((2, 5)) > 0.3

    def cos(u, v):
        return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))

    pa = [(r, c) for r in range(3) for c in range(4)]
    pb = [(r, c) for r in range(2) for c in range(5) if mask_b[r, c]]
    expected = []
    for i in pa:
        j = max(pb, key=lambda q: cos(fa.patches[i], fb.patches[q]))
        if max(pa, key=lambda p: cos(fa.patches[p], fb.patches[j])) == i:
            expected.append((i, j, cos(fa.patches[i], fb.patches[j])))
    expected.sort(key=lambda t: -t[2])
    got = mutual_nearest_neighbours(fa, fb, mask_b=mask_b)
    assert [(tuple(a), tuple(b)) for a, b in zip(got.a, got.b, strict=True)] == [(i, j) for i, j, _ in expected]
    np.testing.assert_allclose(got.similarity, [s for *_, s in expected], rtol=1e-5)


def test_similarity_map_is_cosine_and_finds_the_shifted_patch(shifted_pair):
    a, b = shifted_pair
    sim = similarity_map(a, 3, 1)
    assert sim.shape == (8, 8) and np.isclose(sim[3, 1], 1.0, atol=1e-5)
    ref = torch.nn.functional.cosine_similarity(torch.from_numpy(a.patches), torch.from_numpy(a.patches[3, 1]), dim=-1)
    np.testing.assert_allclose(sim, ref.numpy(), atol=1e-5)
    across = similarity_map(a, 3, 1, target=b)
    assert np.unravel_index(across.argmax(), across.shape) == (3, 3)
    with pytest.raises(ValueError, match="outside the 8 x 8 patch grid"):
        similarity_map(a, 8, 0)


# ------------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("registers", [0, 2])
def test_cls_attention_against_a_direct_computation(registers):
    torch.manual_seed(0)
    vit = build_backbone("debug", num_register_tokens=registers).eval()
    image = Image.fromarray(texture(40, 64, 2))
    maps = cls_attention(vit, image, image_size=32)
    assert maps.heads.shape == (3, 4, 6) and maps.block == 3 and maps.image.shape == (32, 48, 3)
    # direct: tokens into the last block, softmax(q k^T / sqrt(d)) of its normed input, class-token row
    from opendino.viz.core import to_input

    with torch.no_grad():
        x = vit.prepare_tokens_with_masks(to_input(prepare_image(image, 32, 8), vit))
        blocks = list(vit.iter_blocks())
        for blk in blocks[:-1]:
            x = blk(x)
        last = blocks[-1]
        qkv = last.attn.qkv(last.norm1(x)).reshape(1, x.shape[1], 3, 3, 32).permute(2, 0, 3, 1, 4)
        probs = (qkv[0] @ qkv[1].transpose(-2, -1) / 32**0.5).softmax(-1)[0, :, 0]  # (heads, T)
    np.testing.assert_allclose(maps.heads.reshape(3, -1), probs[:, 1 + registers :].numpy(), atol=1e-6)
    # what the class token gives to itself and to the registers is the rest of the row
    np.testing.assert_allclose(maps.heads.sum(axis=(1, 2)) + probs[:, : 1 + registers].sum(-1).numpy(), 1, atol=1e-5)
    np.testing.assert_allclose(maps.mean, maps.heads.mean(0))
    assert cls_attention(vit, image, image_size=32, block=0).block == 0


# ------------------------------------------------------------------------------------------------ renderers
def test_renderers():
    grid = np.arange(6).reshape(2, 3)
    up = upsample(grid, (4, 6))
    assert (up == np.repeat(np.repeat(grid, 2, 0), 2, 1)).all()
    mask = np.array([[True, False]])
    assert (mask_picture(mask, (2, 4)) == [[255, 255, 0, 0]] * 2).all()
    image = np.full((2, 4, 3), 200, np.uint8)
    over = foreground_overlay(image, mask)
    assert (over[:, :2] == 200).all() and (over[:, 2:] == 50).all()


def test_match_picture_size(shifted_pair):
    a, b = shifted_pair
    m = mutual_nearest_neighbours(a, b, top=5)
    pic = match_picture(a.image, b.image, m, np.ones((5, 3)) * 0.5, 8, gap=10)
    assert pic.shape == (64, 64 + 10 + 64, 3) and pic.dtype == np.uint8
    assert (pic[:, 64:74] != 255).any()  # lines cross the gap
