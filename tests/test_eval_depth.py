"""`opendino eval depth`: the linear head and SigLoss against their official formulas, the metrics against hand
numbers and a per-pixel loop, depth-map reading, augmentation, and end-to-end runs on scenes whose depth is a
function of colour (learnable from a random debug backbone; position alone is not, its signal is too weak)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from opendino.config import ConfigError, DepthEvalConfig
from opendino.eval.depth import (
    LinearDepthHead,
    TokenSample,
    _batch_loss,
    lr_at,
    predict_depth,
    resize_prediction,
    run,
    sigloss,
    train_depth_head,
)
from opendino.eval.depth_data import (
    METRICS,
    augment_pair,
    crop_loader,
    depth_metrics,
    eval_mask,
    list_depth_pairs,
    load_pair,
    mean_metrics,
    read_depth,
    save_depth_png,
)
from opendino.models.hub import load_backbone

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: thread sync would dominate


def make_scenes(root, n: int, seed: int, h: int = 48, w: int = 64) -> None:
    """Red 16 px cells at 2 m, blue cells at 6 m, 5 % of the depth pixels missing (0), stored in millimetres."""
    rng = np.random.default_rng(seed)
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    for i in range(n):
        cells = np.kron(rng.integers(0, 2, (h // 16, w // 16)), np.ones((16, 16), int))
        img = np.where(cells[..., None] == 0, [220, 40, 40], [40, 40, 220]) + rng.integers(-20, 20, (h, w, 3))
        depth = np.where(cells == 0, 2.0, 6.0)
        depth[rng.random((h, w)) < 0.05] = 0
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "rgb" / f"{i:03d}.png")
        save_depth_png(root / "depth" / f"{i:03d}.png", depth)


# ------------------------------------------------------------------------------------------------ head and loss
def official_head(maps, weight, bias, bins, upsample=4):
    """The official BNHead + classify depth_pred, written out: concat CLS per block, resize, concat, conv, bins."""
    feats = [torch.cat([p, c[:, :, None, None].expand_as(p)], 1) for p, c in maps]
    size = [s * upsample for s in feats[0].shape[2:]]
    x = torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats], 1)
    logit = torch.relu(F.conv2d(x, weight, bias)) + 0.1
    logit = logit / logit.sum(dim=1, keepdim=True)
    return torch.einsum("ikmn,k->imn", logit, bins).unsqueeze(1)


@pytest.mark.parametrize("n_layers", [1, 4])
def test_head_matches_official_formulas(n_layers):
    torch.manual_seed(n_layers)
    head = LinearDepthHead(16, n_layers, n_bins=32, min_depth=0.5, max_depth=8.0)
    with torch.no_grad():
        head.conv_depth.weight.normal_(0, 0.3)
        head.conv_depth.bias.normal_(0, 0.3)
    maps = [(torch.randn(2, 16, 3, 5), torch.randn(2, 16)) for _ in range(n_layers)]
    out = head(maps)
    assert out.shape == (2, 1, 12, 20)
    ref = official_head(maps, head.conv_depth.weight, head.conv_depth.bias, torch.linspace(0.5, 8.0, 32))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert ((out >= 0.5) & (out <= 8.0)).all()


def test_head_bins_and_shapes():
    head = LinearDepthHead(8, 4, n_bins=256, min_depth=0.001, max_depth=10.0)
    torch.testing.assert_close(head.bins, torch.linspace(0.001, 10.0, 256))
    assert head.conv_depth.weight.shape == (256, 2 * 8 * 4, 1, 1)
    with pytest.raises(ValueError, match="takes 4 blocks"):
        head([(torch.zeros(1, 8, 2, 2), torch.zeros(1, 8))])
    with pytest.raises(ValueError, match="min_depth"):
        LinearDepthHead(8, 1, min_depth=5.0, max_depth=1.0)


def sigloss_numpy(pred, gt, warm_up):
    p, t = pred.ravel(), gt.ravel()
    g = np.log(p[t > 0] + 1e-3) - np.log(t[t > 0] + 1e-3)
    if warm_up:
        return math.sqrt(0.15 * g.mean() ** 2)
    return math.sqrt(g.var(ddof=1) + 0.15 * g.mean() ** 2)


@pytest.mark.parametrize("warm_up", [False, True])
def test_sigloss_matches_numpy(warm_up):
    rng = np.random.default_rng(1)
    pred = rng.uniform(0.5, 5, (2, 1, 7, 9))
    gt = rng.uniform(0.5, 5, (2, 1, 7, 9)) * (rng.random((2, 1, 7, 9)) > 0.3)
    loss = sigloss(torch.from_numpy(pred), torch.from_numpy(gt), warm_up=warm_up)
    assert loss.item() == pytest.approx(sigloss_numpy(pred, gt, warm_up), rel=1e-10)
    assert sigloss(torch.full((5,), 3.0), torch.full((5,), 3.0)).item() == pytest.approx(0.0, abs=1e-6)


def test_batch_loss_pools_pixels_and_warm_up_switch():
    """The batch loss is SigLoss over the pixels of all samples together; the warm-up form ignores the variance."""
    torch.manual_seed(0)
    head = LinearDepthHead(4, 1, n_bins=8, max_depth=10.0)
    samples = [TokenSample([(torch.randn(1, 4, 2, 3), torch.randn(1, 4))], (0, 0, 0, 0), torch.rand(16, 24) + 1)
               for _ in range(3)]  # fmt: skip
    with torch.no_grad():
        preds = [resize_prediction(head(s.maps), (16, 24), s.pads, s.depth.shape).flatten() for s in samples]
        gts = [s.depth.flatten() for s in samples]
        for warm in (False, True):
            want = sigloss(torch.cat(preds), torch.cat(gts), warm_up=warm)
            torch.testing.assert_close(_batch_loss(head, samples, 8, warm), want)


def test_training_skips_batches_without_valid_depth():
    head = LinearDepthHead(4, 1, n_bins=8, max_depth=10.0)
    maps = [(torch.randn(1, 4, 2, 3), torch.randn(1, 4))]
    empty, full = (
        TokenSample(maps, (0, 0, 0, 0), torch.zeros(16, 24)),
        TokenSample(maps, (0, 0, 0, 0), torch.ones(16, 24)),
    )
    losses = train_depth_head(head, iter([[empty], [full], [empty], [full]]), patch_size=8, iterations=2)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    with pytest.raises(ValueError, match="without valid depth"):
        train_depth_head(head, itertools.repeat([empty]), patch_size=8, iterations=1)


def test_lr_schedule():
    assert lr_at(0, lr=1.0, iterations=100, warmup=10) == pytest.approx(1e-3)
    assert lr_at(10, lr=1.0, iterations=100, warmup=10) == pytest.approx(1.0)
    assert lr_at(55, lr=1.0, iterations=100, warmup=10) == pytest.approx(0.5)
    assert lr_at(100, lr=1.0, iterations=100, warmup=10) == pytest.approx(0.0, abs=1e-12)
    values = [lr_at(s, lr=1.0, iterations=100, warmup=10) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_resize_prediction_crops_the_padding():
    """A map whose columns hold their own padded-pixel coordinate keeps, after the crop, the unpadded coordinates."""
    patch, (h, w) = 8, (4, 6)  # token grid of a 30 x 44 image padded by (left 2, right 2, top 1, bottom 1)
    xs = (torch.arange(4 * w) + 0.5) * patch / 4 - 0.5  # centre of each 4x-grid column in padded pixels
    depth = xs.expand(1, 1, 4 * h, 4 * w).contiguous()
    out = resize_prediction(depth, (32, 48), (2, 2, 1, 1), (30, 44))
    assert out.shape == (1, 1, 30, 44)
    inner = out[0, 0, 5, 4:-4]  # away from the clamped border the bilinear resize of a ramp is exact
    torch.testing.assert_close(inner, torch.arange(4, 40, dtype=torch.float32) + 2, atol=1e-4, rtol=0)


def test_predict_depth_flip_tta_is_the_mean_of_both_views():
    torch.manual_seed(0)
    model = load_backbone("debug").eval()
    head = LinearDepthHead(model.embed_dim, 1, n_bins=16, max_depth=10.0)
    image = torch.randn(3, 40, 56)
    both = predict_depth(model, head, image, [3], (40, 56), flip_tta=True)
    plain = predict_depth(model, head, image, [3], (40, 56), flip_tta=False)
    mirrored = predict_depth(model, head, image.flip(-1), [3], (40, 56), flip_tta=False).flip(-1)
    torch.testing.assert_close(both, (plain + mirrored) / 2, atol=1e-5, rtol=1e-5)
    assert both.shape == (40, 56) and float(both.min()) >= head.min_depth


# ------------------------------------------------------------------------------------------------------- metrics
def test_metrics_hand_computed():
    gt = np.array([1.0, 2.0, 4.0, 0.0])
    pred = np.array([1.0, 2.5, 2.0, 9.0])
    m = depth_metrics(pred, gt, gt > 0)  # the 0 pixel is not evaluated
    # thr = max(gt/pred, pred/gt) = 1, 1.25, 2
    assert m["delta1"] == pytest.approx(1 / 3)  # 1.25 is not < 1.25
    assert m["delta2"] == pytest.approx(2 / 3)
    assert m["delta3"] == pytest.approx(2 / 3)  # 2 > 1.953125
    assert m["abs_rel"] == pytest.approx((0 + 0.5 / 2 + 2 / 4) / 3)
    assert m["sq_rel"] == pytest.approx((0 + 0.25 / 2 + 4 / 4) / 3)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 0.25 + 4) / 3))
    e = [0.0, math.log(1.25), math.log(0.5)]
    assert m["rmse_log"] == pytest.approx(math.sqrt(sum(x * x for x in e) / 3))
    assert m["log10"] == pytest.approx((0 + math.log10(1.25) + math.log10(2)) / 3)
    mean = sum(e) / 3
    assert m["silog"] == pytest.approx(100 * math.sqrt(sum(x * x for x in e) / 3 - mean**2))


def test_metrics_match_a_pixel_loop():
    rng = np.random.default_rng(3)
    gt, pred = rng.uniform(0.2, 9, (20, 30)), rng.uniform(0.2, 9, (20, 30))
    mask = rng.random((20, 30)) > 0.4
    sums = dict.fromkeys(["d1", "d2", "d3", "ar", "sr", "se", "sl", "l10", "e", "e2"], 0.0)
    n = 0
    for t, p in zip(gt[mask], pred[mask], strict=True):
        thr = max(t / p, p / t)
        e = math.log(p) - math.log(t)
        for key, value in (("d1", thr < 1.25), ("d2", thr < 1.25**2), ("d3", thr < 1.25**3), ("ar", abs(t - p) / t),
                           ("sr", (t - p) ** 2 / t), ("se", (t - p) ** 2), ("sl", e * e), ("l10", abs(math.log10(t) -
                           math.log10(p))), ("e", e), ("e2", e * e)):  # fmt: skip
            sums[key] += float(value)
        n += 1
    m = depth_metrics(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(mask))
    want = {"delta1": sums["d1"] / n, "delta2": sums["d2"] / n, "delta3": sums["d3"] / n, "abs_rel": sums["ar"] / n,
            "sq_rel": sums["sr"] / n, "rmse": math.sqrt(sums["se"] / n), "rmse_log": math.sqrt(sums["sl"] / n),
            "log10": sums["l10"] / n, "silog": 100 * math.sqrt(sums["e2"] / n - (sums["e"] / n) ** 2)}  # fmt: skip
    assert m == pytest.approx(want, rel=1e-9)


def test_mean_metrics_skips_images_without_pixels():
    a = depth_metrics(np.array([2.0]), np.array([1.0]), np.array([True]))
    empty = depth_metrics(np.array([2.0]), np.array([1.0]), np.array([False]))
    assert all(math.isnan(v) for v in empty.values())
    b = depth_metrics(np.array([1.0]), np.array([1.0]), np.array([True]))
    mean = mean_metrics([a, empty, b])
    assert mean["rmse"] == pytest.approx(0.5) and mean["delta1"] == pytest.approx(0.5)
    assert set(mean) == set(METRICS)
    with pytest.raises(ValueError, match="positive"):
        depth_metrics(np.array([0.0]), np.array([1.0]), np.array([True]))


def test_eval_mask_range_and_crops():
    gt = torch.tensor([[0.0, 0.001, 0.5, 10.0, 12.0]])
    assert eval_mask(gt, min_depth=0.001, max_depth=10.0).tolist() == [[False, False, True, False, False]]
    full = torch.ones(480, 640)
    nyu = eval_mask(full, min_depth=0.001, max_depth=10.0, crop="nyu")
    assert nyu.sum() == (471 - 45) * (601 - 41) and nyu[45, 41] and not nyu[44, 41] and not nyu[45, 601]
    kitti = eval_mask(torch.ones(375, 1242), min_depth=0.001, max_depth=80.0, crop="kitti_garg")
    assert kitti.sum() == (int(0.99189189 * 375) - int(0.40810811 * 375)) * (
        int(0.96405229 * 1242) - int(0.03594771 * 1242)
    )
    with pytest.raises(ValueError, match="480 x 640"):
        eval_mask(torch.ones(48, 64), min_depth=0.001, max_depth=10.0, crop="nyu")


# ---------------------------------------------------------------------------------------------------------- data
def test_depth_png_round_trip_and_units(tmp_path):
    depth = np.array([[0.0, 1.2345, 9.87], [65.535, 0.0005, 3.0]])
    save_depth_png(tmp_path / "d.png", depth, depth_scale=1000)
    with Image.open(tmp_path / "d.png") as img:
        assert img.mode in ("I;16", "I")
        stored = np.asarray(img)
    assert stored.tolist() == [[0, 1234, 9870], [65535, 0, 3000]]  # 0.0005 m rounds to 0 mm (banker's rounding)
    np.testing.assert_allclose(read_depth(tmp_path / "d.png", 1000), stored / 1000, rtol=1e-6)
    np.testing.assert_allclose(read_depth(tmp_path / "d.png", 256), stored / 256, rtol=1e-6)  # KITTI's unit
    np.save(tmp_path / "m.npy", np.array([[1.5, np.nan], [-2.0, np.inf]], dtype=np.float32))
    assert read_depth(tmp_path / "m.npy", 1.0).tolist() == [[1.5, 0.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="uint16"):
        save_depth_png(tmp_path / "x.png", np.array([[70.0]]), depth_scale=1000)
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="mode RGB"):
        read_depth(tmp_path / "rgb.png", 1000)


def test_pairs_missing_partner_and_size_mismatch(tmp_path):
    make_scenes(tmp_path / "d", 3, seed=0)
    assert [p[0].rsplit("/", 1)[1] for p in list_depth_pairs(tmp_path / "d")] == ["000.png", "001.png", "002.png"]
    (tmp_path / "d" / "depth" / "001.png").unlink()
    with pytest.raises(ValueError, match="001"):
        list_depth_pairs(tmp_path / "d")
    with pytest.raises(ValueError, match="rgb/ and depth/"):
        list_depth_pairs(tmp_path / "nothing")
    save_depth_png(tmp_path / "d" / "depth" / "001.png", np.ones((10, 10)))
    with pytest.raises(ValueError, match="depth map"):
        load_pair(*list_depth_pairs(tmp_path / "d")[1], depth_scale=1000)


def test_load_pair_resizes_the_image_and_training_depth_only(tmp_path):
    make_scenes(tmp_path / "d", 1, seed=0)
    image, depth, native = load_pair(*list_depth_pairs(tmp_path / "d")[0], depth_scale=1000, image_size=24)
    assert image.shape == (3, 24, 32) and depth.shape == (24, 32) and native.shape == (48, 64)
    assert set(depth.unique().tolist()) <= {0.0, 2.0, 6.0}  # nearest: no blended depths


def test_augment_pair_keeps_image_and_depth_aligned():
    """Depth = column index and red channel = column / 63: every crop / flip / pad must keep them in step."""
    cols = torch.arange(40, dtype=torch.float32)
    image = torch.stack([cols.expand(30, 40) / 63, torch.zeros(30, 40), torch.zeros(30, 40)])
    depth = cols.expand(30, 40) + 1
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        crop, d = augment_pair(image, depth, 32, g)
        assert crop.shape == (3, 32, 32) and d.shape == (32, 32)
        assert (d[30:] == 0).all()  # rows below the 30-row image are padding: invalid depth
        red = crop[0, 0] * 0.229 + 0.485  # undo the normalisation (row 0 is inside the image)
        order = torch.argsort(d[0])
        assert (torch.diff(red[order]) >= -1e-6).all()  # red increases with depth, whatever the flip / colour change
    again = augment_pair(image, depth, 32, torch.Generator().manual_seed(5))
    torch.testing.assert_close(again, augment_pair(image, depth, 32, torch.Generator().manual_seed(5)))


def test_crop_loader_reports_bad_pairs(tmp_path):
    make_scenes(tmp_path / "d", 2, seed=0)
    (tmp_path / "d" / "rgb" / "001.png").write_bytes(b"not a png")
    loader = crop_loader(list_depth_pairs(tmp_path / "d"), depth_scale=1000, image_size=0, crop_size=32,
                         batch_size=4, seed=0)  # fmt: skip
    images, depths, bad = next(iter(loader))
    assert images is not None and images.shape[1:] == (3, 32, 32) and depths.shape[1:] == (32, 32)
    assert len(bad) == 4 - len(images) and all(path.endswith("001.png") for path, _ in bad)


# --------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    make_scenes(root / "train", 8, seed=0)
    make_scenes(root / "val", 3, seed=1)
    return root


def test_run_learns_depth_from_colour(scenes, tmp_path):
    cfg = DepthEvalConfig(backbone="debug", train=str(scenes / "train"), val=str(scenes / "val"), out=str(tmp_path),
                          cache_dir="", num_workers=0, iterations=100, warmup_iterations=10,
                          loss_warmup_iterations=10, pictures=2)  # fmt: skip
    record = run(cfg)
    baseline = record["extra"]["baseline"]
    # the trivial predictor: the mean training depth (about 4 m against 2 m / 6 m cells) is off by about 2 m
    assert baseline["rmse"] > 1.5
    assert record["metrics"]["rmse"] < 0.35 * baseline["rmse"]
    assert record["metrics"]["delta1"] > 0.75 and record["metrics"]["abs_rel"] < 0.15
    assert record["dataset"]["blocks"] == [3] and len(record["extra"]["per_image"]) == 3
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"] == pytest.approx(record["metrics"])
    assert "| linear head |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "predictions.png").stat().st_size > 0 and (tmp_path / "head.safetensors").exists()


def test_run_four_layers_online_with_a_bad_image(scenes, tmp_path):
    """Online crops through the backbone, 4 blocks; an unreadable validation image is reported, not fatal."""
    val = tmp_path / "val"
    make_scenes(val, 2, seed=2)
    (val / "rgb" / "001.png").write_bytes(b"broken")
    cfg = DepthEvalConfig(backbone="debug", train=str(scenes / "train"), val=str(val), out=str(tmp_path / "out"),
                          cache_dir="", num_workers=0, iterations=40, warmup_iterations=5, loss_warmup_iterations=5,
                          n_layers=4, train_mode="online", crop_size=32, train_batch_size=2, pictures=0,
                          flip_tta=False)  # fmt: skip
    record = run(cfg)
    assert record["dataset"]["blocks"] == [0, 1, 2, 3] and record["dataset"]["val_pairs"] == 1
    assert [p.rsplit("/", 1)[1] for p, _ in record["bad_images"]] == ["001.png"]
    losses = record["extra"]["loss"]  # every step (fewer than 200); steps 0-4 use the warm-up form
    assert math.isfinite(record["metrics"]["rmse"]) and np.mean(losses[-5:]) < np.mean(losses[5:10])
    assert not (tmp_path / "out" / "predictions.png").exists()


def test_train_depth_head_is_seeded(scenes):
    torch.manual_seed(0)
    model = load_backbone("debug").eval()
    from opendino.eval.depth import _cached_batches, cache_token_samples

    samples, bad = cache_token_samples(model, list_depth_pairs(scenes / "train")[:2], [3], depth_scale=1000)
    assert len(samples) == 4 and not bad
    torch.testing.assert_close(samples[1].depth, samples[0].depth.flip(-1))  # the mirror of each image
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        head = LinearDepthHead(model.embed_dim, 1, n_bins=16, max_depth=10.0)
        runs.append(train_depth_head(head, _cached_batches(samples, 2, seed=0), patch_size=8, iterations=5))
    assert runs[0] == runs[1]


def test_config_checks(scenes, tmp_path):
    base = dict(backbone="debug", train="a", val="b")
    with pytest.raises(ConfigError, match="train_mode"):
        DepthEvalConfig(**base, train_mode="lazy")
    with pytest.raises(ConfigError, match="eval_crop"):
        DepthEvalConfig(**base, eval_crop="eigen")
    with pytest.raises(ConfigError, match="min_depth"):
        DepthEvalConfig(**base, min_depth=5.0, max_depth=2.0)
    cfg = DepthEvalConfig(backbone="debug", train=str(scenes / "train"), val=str(scenes / "val"), cache_dir="",
                          out=str(tmp_path), num_workers=0, train_mode="online", crop_size=30)  # fmt: skip
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        run(cfg)
