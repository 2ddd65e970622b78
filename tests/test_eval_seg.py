"""Linear segmentation evaluation: metrics against hand-computed numbers and scikit-learn, label folders and their
errors, the joint augmentation, the schedule and loss against their definitions, inference, and end to end on images
whose classes are told apart by colour."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score

from opendino.config import ConfigError, SegEvalConfig
from opendino.eval.seg import (
    LinearSegHead,
    cached_train_maps,
    poly_lr,
    predict,
    run,
    seg_blocks,
    seg_features,
    seg_loss,
    train_head_augmented,
    train_head_on_maps,
)
from opendino.eval.seg_data import (
    SegAugment,
    SegTrainStream,
    colorize,
    infer_num_classes,
    list_seg_pairs,
    load_label,
    load_pair,
    palette,
    photometric_distortion,
    reduce_zero_label,
    rescale_size,
    seg_confusion,
    seg_metrics,
)
from opendino.models.hub import build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: thread sync would dominate

RED, BLUE = (220, 30, 30), (30, 30, 220)


def make_split(root, n: int, *, size: int = 64, seed: int = 0, ignore: int = 255) -> str:
    """Images whose left part is red (class 0) and right part blue (class 1), split at a random column; the top two
    rows are labelled `ignore`."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        x = int(rng.integers(size // 4, 3 * size // 4))
        img = np.empty((size, size, 3), np.float64)
        img[:, :x], img[:, x:] = RED, BLUE
        img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
        label = np.zeros((size, size), np.uint8)
        label[:, x:] = 1
        label[:2] = ignore
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(label, mode="L").save(root / "labels" / f"{i:03d}.png")
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("seg")
    return make_split(root / "train", 16, seed=0), make_split(root / "val", 4, seed=1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("debug").eval()


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_hand_computed():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [1, 2, 0, 3]])  # class 3 absent everywhere: NaN; ignored pixels not counted
    cm = seg_confusion(pred, label, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    m = seg_metrics(cm, ["a", "b", "c", "d"])
    iou = [1 / 2, 2 / 4, 1 / 2]  # class b: intersection 2, union 2 + 4 - 2
    assert m["per_class_iou"]["a"] == pytest.approx(iou[0]) and m["per_class_iou"]["b"] == pytest.approx(iou[1])
    assert math.isnan(m["per_class_iou"]["d"]) and math.isnan(m["per_class_accuracy"]["d"])
    assert m["miou"] == pytest.approx(sum(iou) / 3)
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)
    assert m["mean_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_predicted_but_absent_class_counts_zero_iou():
    m = seg_metrics(seg_confusion(torch.tensor([0, 1]), torch.tensor([0, 0]), 2))
    assert m["per_class_iou"]["class_1"] == 0 and m["miou"] == pytest.approx(0.25)


def test_metrics_accumulated_over_images_match_scikit_learn():
    rng = np.random.default_rng(0)
    c, ignore = 5, 255
    labels = [rng.integers(0, c, (7, 9)) for _ in range(4)]
    for lab in labels:
        lab[rng.random(lab.shape) < 0.2] = ignore
    preds = [np.where(rng.random(lab.shape) < 0.6, np.clip(lab, 0, c - 1), rng.integers(0, c, lab.shape))
             for lab in labels]  # fmt: skip
    cm = sum(
        seg_confusion(torch.from_numpy(p), torch.from_numpy(lab), c, ignore)
        for p, lab in zip(preds, labels, strict=True)
    )
    y = np.concatenate([lab.ravel() for lab in labels])
    p = np.concatenate([p.ravel() for p in preds])
    keep = y != ignore
    np.testing.assert_array_equal(cm.numpy(), sk_confusion(y[keep], p[keep], labels=range(c)))
    m = seg_metrics(cm)
    ref = jaccard_score(y[keep], p[keep], labels=range(c), average=None)
    np.testing.assert_allclose([m["per_class_iou"][f"class_{i}"] for i in range(c)], ref)
    assert m["miou"] == pytest.approx(ref.mean())
    assert m["pixel_accuracy"] == pytest.approx((y[keep] == p[keep]).mean())


def test_confusion_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        seg_confusion(torch.tensor([0, 1]), torch.tensor([0, 7]), 2)
    with pytest.raises(ValueError, match="differ in shape"):
        seg_confusion(torch.zeros(2, 2), torch.zeros(2, 3), 2)


# ---------------------------------------------------------------------------------------------- data
def _touch_pair(root, stem, size=(8, 6), label_size=None, mode="L"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    Image.new("RGB", size).save(root / "images" / f"{stem}.jpg")
    Image.new(mode, label_size or size).save(root / "labels" / f"{stem}.png")


def test_pairs_missing_label_and_list_file(tmp_path):
    for stem in ("a", "b"):
        _touch_pair(tmp_path, stem)
    assert [p[0].rsplit("/", 1)[1] for p in list_seg_pairs(tmp_path)] == ["a.jpg", "b.jpg"]
    Image.new("RGB", (8, 6)).save(tmp_path / "images" / "c.jpg")  # no label
    with pytest.raises(ValueError, match=r"without a partner.*'c'"):
        list_seg_pairs(tmp_path)
    (tmp_path / "train.txt").write_text("b\na\n")  # a list pairs only its stems: c is allowed to be there
    assert len(list_seg_pairs(tmp_path, list_file="train.txt")) == 2
    (tmp_path / "val.txt").write_text("a\nc\n")
    with pytest.raises(ValueError, match=r"lack an image.*\['c'\]"):
        list_seg_pairs(tmp_path, list_file=str(tmp_path / "val.txt"))
    with pytest.raises(ValueError, match="list file"):
        list_seg_pairs(tmp_path, list_file="nope.txt")


def test_other_folder_names_and_palette_labels(tmp_path):
    """VOC's layout: JPEGImages + SegmentationClass palette PNGs (index values, 255 borders)."""
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    Image.new("RGB", (5, 4)).save(tmp_path / "JPEGImages" / "x.jpg")
    label = Image.fromarray(np.array([[0, 1, 255, 20, 3]] * 4, np.uint8), mode="P")
    label.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    label.save(tmp_path / "SegmentationClass" / "x.png")
    pairs = list_seg_pairs(tmp_path, "JPEGImages", "SegmentationClass")
    image, lab = load_pair(*pairs[0])
    assert image.size == (5, 4) and lab[0].tolist() == [0, 1, 255, 20, 3]
    assert infer_num_classes([pairs[0][1]], ignore_index=255) == 21


def test_shape_mismatch_and_colour_labels_are_errors(tmp_path):
    _touch_pair(tmp_path, "a", size=(8, 6), label_size=(6, 8))
    with pytest.raises(ValueError, match=r"label is 6x8 but its image .* is 8x6"):
        load_pair(*list_seg_pairs(tmp_path)[0])
    Image.new("RGB", (8, 6)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="mode 'RGB'"):
        load_label(tmp_path / "rgb.png")


def test_reduce_zero_label(tmp_path):
    label = np.array([[0, 1, 2, 150, 255]])
    assert reduce_zero_label(label, 255).tolist() == [[255, 0, 1, 149, 255]]
    Image.fromarray(label.astype(np.uint8), mode="L").save(tmp_path / "l.png")
    assert load_label(tmp_path / "l.png", reduce_zero=True).tolist() == [[255, 0, 1, 149, 255]]
    assert infer_num_classes([str(tmp_path / "l.png")], ignore_index=255, reduce_zero=True) == 150
    assert infer_num_classes([str(tmp_path / "l.png")], ignore_index=150) == 256  # 255 is a class here


def test_rescale_size_follows_the_keep_ratio_rule():
    assert rescale_size(240, 320, 224) == (224, 299)
    assert rescale_size(100, 1000, 512, 2048) == (205, 2048)  # the long side caps the scale


def test_augment_keeps_image_and_label_aligned():
    """Red pixels are class 0, blue ones class 1 before and after rescale, crop and flip."""
    label = torch.zeros(40, 60, dtype=torch.int64)
    label[:, 25:] = 1
    image = torch.tensor(RED, dtype=torch.uint8).view(3, 1, 1).repeat(1, 40, 60)
    image[:, :, 25:] = torch.tensor(BLUE, dtype=torch.uint8).view(3, 1, 1)
    aug = SegAugment(48, 32, (0.5, 2.0), cat_max_ratio=0.75, photometric=False)
    flips = set()
    for seed in range(12):
        x, y = aug(image, label, torch.Generator().manual_seed(seed))
        assert x.shape == (3, 32, 32) and y.shape == (32, 32) and x.dtype == torch.float32
        assert set(y.unique().tolist()) <= {0, 1, 255}
        valid = y != 255
        yf = y.float()[None]
        interior = valid & (F.max_pool2d(yf, 3, 1, 1) == -F.max_pool2d(-yf, 3, 1, 1))[0]  # away from borders
        assert torch.equal((x[0] > x[2])[interior], y[interior] == 0)  # red where class 0
        if len(y[valid].unique()) == 2:
            left = y[:, 0][y[:, 0] != 255]
            flips.add(bool(left.float().mean() > 0.5))  # blue (class 1) on the left: flipped
    x1, y1 = aug(image, label, torch.Generator().manual_seed(3))
    x2, y2 = aug(image, label, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert flips == {True, False}  # blue on the left (flipped) in some crops only


def test_augment_pads_small_images_with_ignore_and_retries_crops():
    label = torch.zeros(10, 10, dtype=torch.int64)
    x, y = SegAugment(10, 16, (1.0, 1.0), ignore_index=9)(torch.zeros(3, 10, 10, dtype=torch.uint8), label,
                                                          torch.Generator().manual_seed(0))  # fmt: skip
    assert (y[10:] == 9).all() and (y[:, 10:] == 9).all() and (y[:10, :10] == 0).all() and (x[:, 10:] == 0).all()
    big = torch.zeros(100, 100, dtype=torch.int64)
    big[:, 90:] = 1  # most 20x20 crops hold one class: the retry looks for a crop with two

    def mixed_crops(cat_max_ratio: float) -> int:
        aug = SegAugment(100, 20, (1.0, 1.0), cat_max_ratio=cat_max_ratio, photometric=False)
        image = torch.zeros(3, 100, 100, dtype=torch.uint8)
        return sum(len(aug(image, big, torch.Generator().manual_seed(s))[1].unique()) > 1 for s in range(40))

    assert mixed_crops(0.75) > 3 * max(1, mixed_crops(1.0))  # 26 of 40 against 5


def test_photometric_distortion_stays_in_range_and_is_seeded():
    image = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8)
    outs = [photometric_distortion(image, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(o.min() >= 0 and o.max() <= 255 and o.shape == image.shape for o in outs)
    assert sum(not torch.allclose(o, image.float(), atol=1) for o in outs) >= 6
    torch.testing.assert_close(photometric_distortion(image, torch.Generator().manual_seed(3)), outs[3])


def test_train_stream_is_seeded_per_sample(data):
    pairs = list_seg_pairs(data[0])
    stream = SegTrainStream(pairs, SegAugment(64, 32), seed=1)
    ks = range(len(pairs))
    assert sorted(stream.pair_index(k) for k in ks) == list(range(len(pairs)))  # an epoch visits every pair once
    first = stream[5]
    assert torch.equal(SegTrainStream(pairs, SegAugment(64, 32), seed=1)[5][0], first[0])
    assert not torch.equal(SegTrainStream(pairs, SegAugment(64, 32), seed=2)[5][0], first[0])
    images, labels, bad = SegTrainStream.collate([first, (None, None, ("x.jpg", "broken")), stream[6]])
    assert images.shape == (2, 3, 32, 32) and labels.shape == (2, 32, 32) and bad == [("x.jpg", "broken")]


# ---------------------------------------------------------------------------------------------- head and training
def test_poly_schedule_with_warmup():
    def reference(step, total=100, base=1.0, warmup=10, ratio=1e-6):  # mmcv: warm-up factor times the poly lr
        regular = base * (1 - step / total) ** 1.0
        return regular * (1 - (1 - step / warmup) * (1 - ratio)) if step < warmup else regular

    assert poly_lr(0, 100, 1.0, 10) == pytest.approx(1e-6 * 1.0)
    for step in (0, 3, 9, 10, 50, 99):
        assert poly_lr(step, 100, 1.0, 10) == pytest.approx(reference(step))
    assert poly_lr(50, 100, 2e-3) == pytest.approx(1e-3)


def test_loss_averages_over_all_pixels_with_ignore_as_zero():
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 8, 10))
    labels[0, :4] = 255
    up = F.interpolate(logits, size=(8, 10), mode="bilinear", align_corners=False)
    total = sum(-up[b, :, i, j].log_softmax(0)[labels[b, i, j]] for b in range(2) for i in range(8) for j in range(10)
                if labels[b, i, j] != 255)  # fmt: skip
    assert seg_loss(logits, labels, 255).item() == pytest.approx(total.item() / labels.numel(), rel=1e-5)


def test_head_is_bn_then_1x1_conv():
    head = LinearSegHead(6, 3)
    assert head.conv.kernel_size == (1, 1) and head.conv.bias.abs().sum() == 0
    assert 0.003 < head.conv.weight.std().item() < 0.03
    x = torch.randn(2, 6, 4, 5) * 3 + 1
    head.eval()  # fresh running stats: mean 0, var 1
    expected = torch.einsum("bchw,kc->bkhw", x / math.sqrt(1 + 1e-5), head.conv.weight[:, :, 0, 0])
    torch.testing.assert_close(head(x), expected + head.conv.bias.view(1, -1, 1, 1))


def test_blocks_and_concatenated_features(model):
    assert seg_blocks(12, "linear") == [11] and seg_blocks(12, "ms") == [8, 9, 10, 11]
    with pytest.raises(ValueError, match="last 4 blocks"):
        seg_blocks(3, "ms")
    x = torch.randn(2, 3, 60, 70)  # padded to 64 x 72: an 8 x 9 grid
    with torch.no_grad():
        feats = seg_features(model, x, [0, 3])
        last = model.get_intermediate_layers(F.pad(x, (1, 1, 2, 2)), [3], reshape=True, norm=True)[0]
    assert feats.shape == (2, 2 * model.embed_dim, 8, 9)
    torch.testing.assert_close(feats[:, model.embed_dim :], last)


def test_cached_maps_with_flips_and_cache_hit(model, data, tmp_path):
    pairs = list_seg_pairs(data[0])[:3]
    kw = dict(flips=True, cache_dir=tmp_path, identity={"preset": "debug", "seed": 0})
    maps, labels, bad = cached_train_maps(model, pairs, (32, 40), [3], **kw)
    assert maps.shape == (6, model.embed_dim, 4, 5) and maps.dtype == torch.float16 and labels.shape == (6, 32, 40)
    assert torch.equal(labels[3:], labels[:3].flip(-1)) and not bad
    again = cached_train_maps(model, pairs, (32, 40), [3], **kw)
    assert len(list(tmp_path.glob("seg-*/maps.safetensors"))) == 1
    assert torch.equal(again[0], maps) and torch.equal(again[1], labels)


def test_unreadable_train_images_are_skipped_and_reported(model, data, tmp_path):
    import shutil

    root = tmp_path / "train"
    shutil.copytree(data[0], root)
    broken = root / "images" / "003.png"
    broken.write_bytes(b"not an image")
    pairs = list_seg_pairs(root)
    maps, labels, bad = cached_train_maps(model, pairs, (32, 32), [3], flips=False)
    assert maps.shape[0] == labels.shape[0] == len(pairs) - 1 and [b[0] for b in bad] == [str(broken)]
    augment = SegAugment(32, 32)
    _, losses, bad = train_head_augmented(model, pairs, augment, blocks=[3], num_classes=2, iterations=2,
                                          batch_size=8, warmup=0)  # fmt: skip
    assert len(losses) == 2 and [b[0] for b in bad] == [str(broken)]  # 16 samples: one whole epoch


def test_colour_task_is_learnable_from_cached_maps(model, data):
    """The red / blue split of the test data: a linear head on random debug features separates it."""
    pairs = list_seg_pairs(data[0])
    maps, labels, _ = cached_train_maps(model, pairs, (64, 64), [3])
    head, losses = train_head_on_maps(maps, labels, num_classes=2, iterations=150, batch_size=8, lr=1e-2, warmup=10)
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
    with torch.no_grad():
        pred = F.interpolate(head(maps.float()), size=(64, 64), mode="bilinear").argmax(1)
    assert seg_metrics(seg_confusion(pred, labels, 2))["miou"] > 0.9


def test_predict_views_and_slide_windows(model):
    head = LinearSegHead(model.embed_dim, 3).eval()
    image = torch.randint(0, 256, (3, 37, 50), dtype=torch.uint8)
    whole = predict(model, head, image, blocks=[3], resize_size=40)
    assert whole.shape == (3, 37, 50)
    torch.testing.assert_close(whole.sum(0), torch.ones(37, 50))
    ms = predict(model, head, image, blocks=[3], resize_size=40, scales=(1.0, 1.5), flip=True)
    slide = predict(model, head, image, blocks=[3], resize_size=40, window=24)
    assert ms.shape == slide.shape == whole.shape and not torch.allclose(ms, whole)
    torch.testing.assert_close(predict(model, head, image, blocks=[3], resize_size=40, window=200), whole)


# ---------------------------------------------------------------------------------------------- end to end
def _cfg(data, tmp_path, **kw) -> SegEvalConfig:
    base = dict(backbone="debug", train=data[0], val=data[1], out=str(tmp_path / "out"), cache_dir=str(tmp_path),
                num_workers=0, resize_size=64, iterations=150, warmup_iterations=10, lr=1e-2, mode="fast",
                class_names=("red", "blue"))  # fmt: skip
    return SegEvalConfig(**(base | kw))


def test_run_fast_linear_end_to_end(data, tmp_path):
    record = run(_cfg(data, tmp_path))
    assert record["metrics"]["miou"] > 0.9 and record["dataset"]["num_classes"] == 2
    assert set(record["extra"]["per_class_iou"]) == {"red", "blue"} and record["extra"]["mode"] == "fast"
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text())["metrics"] == record["metrics"]
    assert "| red |" in (out / "results.md").read_text() and (out / "predictions.png").stat().st_size > 0


def test_run_ms_augment_end_to_end(data, tmp_path):
    cfg = _cfg(data, tmp_path, variant="ms", mode="augment", iterations=4, train_batch_size=2, crop_size=32,
               test_scales=(1.0, 1.5), inference="slide", class_names=())  # fmt: skip
    record = run(cfg)
    assert record["extra"]["blocks"] == [0, 1, 2, 3] and record["extra"]["mode"] == "augment"
    assert 0 <= record["metrics"]["miou"] <= 1 and "class_1" in record["extra"]["per_class_iou"]


def test_config_checks_and_command_line():
    from opendino import cli

    args = cli._parser().parse_args(["eval", "seg", "--backbone", "debug", "--train", "ade", "--val", "ade",
                                     "--images-dir", "images/training", "images/validation", "--ratio-range", "1", "3",
                                     "--reduce-zero-label"])  # fmt: skip
    cfg = cli._load(SegEvalConfig, args)
    assert cfg.images_dir == ("images/training", "images/validation") and cfg.ratio_range == (1.0, 3.0)
    assert cfg.reduce_zero_label and cfg.labels_dir == ("labels",)
    with pytest.raises(ConfigError, match="ratio_range"):
        SegEvalConfig(backbone="debug", train="a", val="b", ratio_range=(2.0, 1.0))
    with pytest.raises(ConfigError, match="images_dir"):
        SegEvalConfig(backbone="debug", train="a", val="b", images_dir=("a", "b", "c"))
    with pytest.raises(ConfigError, match="mode"):
        SegEvalConfig(backbone="debug", train="a", val="b", mode="cached")


def test_palette_and_colorize():
    colours = palette(30)
    assert colours.shape == (30, 3) and len({tuple(c) for c in colours.round(3)}) == 30 and colours.max(1).min() > 0.5
    pic = colorize(np.array([[0, 1, 255, 7]]), 3, 255)
    assert pic.shape == (1, 4, 3) and (pic[0, 2] == 0).all() and (pic[0, 3] == 0).all() and pic[0, 0].max() > 0
