"""The evaluation groundwork: cached features (keys, hits, bad images, several processes), the results files, the
shared classification metrics, the dense helpers and the `opendino eval` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import recall_score, top_k_accuracy_score

from opendino import config
from opendino.cli import main
from opendino.data.augment import make_eval_transform
from opendino.data.sources import list_images
from opendino.data.synthetic import make_shapes_dataset
from opendino.eval.common import markdown_table, setup
from opendino.eval.dense import center_pad, depth_block_indices, list_pairs, token_maps
from opendino.eval.features import backbone_identity, cached_features
from opendino.eval.metrics import classification_metrics, confusion_matrix, topk_accuracy
from opendino.eval.pictures import save_confusion_matrix, save_image_grid
from opendino.models.hub import build_backbone

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, n_per_class=2, size=40, seed=0)
    return list_images(root)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("debug").eval()


TRANSFORM = make_eval_transform(40, 32)


def test_cache_computes_once_and_matches_a_fresh_computation(model, images, tmp_path):
    ident = {"preset": "debug", "seed": 0}
    outputs = ("cls", "cls_blocks", "mean")
    first = cached_features(model, images, TRANSFORM, identity=ident, outputs=outputs, cache_dir=tmp_path)
    again = cached_features(model, images, TRANSFORM, identity=ident, outputs=outputs, cache_dir=tmp_path)
    fresh = cached_features(model, images, TRANSFORM, identity=ident, outputs=outputs, cache_dir=None)
    assert not first.from_cache and again.from_cache and not fresh.from_cache
    assert first.paths == again.paths == images
    for k in outputs:
        np.testing.assert_array_equal(first.features[k], again.features[k])
        np.testing.assert_allclose(first.features[k], fresh.features[k], rtol=0, atol=1e-6)
    feats = first.features
    assert feats["cls_blocks"].shape == (len(images), 4, model.embed_dim)
    np.testing.assert_allclose(feats["cls_blocks"][:, -1], feats["cls"], atol=1e-6)  # the last block's CLS is `cls`
    with torch.no_grad():
        x = torch.stack([TRANSFORM(Image.open(p).convert("RGB")) for p in images[:3]])
        out = model.forward_features(x)
    np.testing.assert_allclose(feats["cls"][:3], out["x_norm_clstoken"].numpy(), atol=1e-5)
    np.testing.assert_allclose(feats["mean"][:3], out["x_norm_patchtokens"].mean(1).numpy(), atol=1e-5)


def test_cache_key_follows_transform_outputs_backbone_and_files(model, images, tmp_path):
    ident = {"preset": "debug", "seed": 0}
    cached_features(model, images, TRANSFORM, identity=ident, cache_dir=tmp_path)
    changes = [
        dict(transform=make_eval_transform(40, 24)),
        dict(outputs=("cls", "mean")),
        dict(identity={"preset": "debug", "seed": 1}),
    ]
    for change in changes:
        kwargs = {"transform": TRANSFORM, "identity": ident, "outputs": ("cls",), **change}
        t = kwargs.pop("transform")
        assert not cached_features(model, images, t, cache_dir=tmp_path, **kwargs).from_cache, change
    assert len(list(tmp_path.iterdir())) == 1 + len(changes)
    edited = tmp_path / "copy"
    edited.mkdir()
    copies = []
    for p in images:  # the same images elsewhere, then one of them re-saved with other content
        q = edited / Path(p).name
        q.write_bytes(Path(p).read_bytes())
        copies.append(str(q))
    assert not cached_features(model, copies, TRANSFORM, identity=ident, cache_dir=tmp_path).from_cache
    assert cached_features(model, copies, TRANSFORM, identity=ident, cache_dir=tmp_path).from_cache
    Image.new("RGB", (50, 30), (255, 0, 0)).save(copies[0])
    assert not cached_features(model, copies, TRANSFORM, identity=ident, cache_dir=tmp_path).from_cache


def test_cls_is_served_from_a_cached_cls_blocks_entry(model, images, tmp_path):
    ident = {"preset": "debug", "seed": 0}
    blocks = cached_features(
        model, images, TRANSFORM, identity=ident, outputs=("cls_blocks", "mean"), cache_dir=tmp_path
    )
    cls = cached_features(model, images, TRANSFORM, identity=ident, outputs=("cls",), cache_dir=tmp_path)
    assert not blocks.from_cache and cls.from_cache and set(cls.features) == {"cls"}
    np.testing.assert_array_equal(cls.features["cls"], blocks.features["cls_blocks"][:, -1])
    fresh = cached_features(model, images, TRANSFORM, identity=ident, outputs=("cls",), cache_dir=None)
    np.testing.assert_allclose(cls.features["cls"], fresh.features["cls"], atol=1e-6)
    other = make_eval_transform(40, 24)  # not covered: another transform, or an output the entry lacks
    assert not cached_features(model, images, other, identity=ident, outputs=("cls",), cache_dir=tmp_path).from_cache
    assert not cached_features(
        model, images, TRANSFORM, identity=ident, outputs=("patch",), cache_dir=tmp_path
    ).from_cache


def test_bad_images_are_left_out_and_reported(model, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths = [images[0], str(broken), images[1]]
    fs = cached_features(model, paths, TRANSFORM, identity={"x": 1}, cache_dir=tmp_path / "c")
    assert fs.paths == [images[0], images[1]]
    assert fs.features["cls"].shape[0] == 2
    assert [p for p, _ in fs.bad] == [str(broken)]
    again = cached_features(model, paths, TRANSFORM, identity={"x": 1}, cache_dir=tmp_path / "c")
    assert again.from_cache and again.bad == fs.bad


def test_backbone_identity_changes_with_the_weights(tmp_path):
    from opendino.models.hub import save_backbone

    torch.manual_seed(0)
    path = save_backbone(build_backbone("debug"), tmp_path / "a.safetensors")
    first = backbone_identity(path)
    torch.manual_seed(1)
    save_backbone(build_backbone("debug"), tmp_path / "a.safetensors")
    assert backbone_identity(path) != first
    assert backbone_identity("debug", seed=3) == {"preset": "debug", "seed": 3}


_DIST_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from opendino import dist
    from opendino.data.augment import make_eval_transform
    from opendino.data.sources import list_images
    from opendino.eval.features import cached_features
    from opendino.models.hub import build_backbone
    dist.init_distributed("cpu")
    torch.manual_seed(0)
    model = build_backbone("debug").eval()
    paths = list_images(sys.argv[1])
    t = make_eval_transform(40, 32)
    for name, cache in (("cached", sys.argv[2]), ("gathered", None)):
        fs = cached_features(model, paths, t, identity={"preset": "debug"}, outputs=("cls", "mean"), cache_dir=cache)
        if dist.rank() == 1:
            np.savez(f"{sys.argv[3]}/{name}.npz", paths=np.array(fs.paths), **fs.features)
    dist.cleanup()
    """
)


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_compute_shards_and_every_process_gets_all(model, images, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_DIST_SCRIPT)
    folder = Path(images[0]).parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(folder), str(tmp_path / "cache"), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = cached_features(model, images, TRANSFORM, identity={"p": 1}, outputs=("cls", "mean"), cache_dir=None)
    for name in ("cached", "gathered"):
        got = np.load(tmp_path / f"{name}.npz")
        assert list(got["paths"]) == images
        for k in ("cls", "mean"):
            np.testing.assert_allclose(got[k], single.features[k], atol=1e-5)
    assert not list((tmp_path / "cache").glob("*/part-*")), "the per-process parts are merged and removed"


def test_results_files(tmp_path, images):
    cfg = config.load(config.FeaturesEvalConfig, None, [f"out={tmp_path}/o", "backbone=debug", "data=x"])
    ctx = setup("features", cfg)
    record = ctx.write_results(
        dataset={"data": "x"},
        metrics={"top1": 0.5, "tensor": torch.tensor([1.0, 2.0])},
        tables=[markdown_table(["a", "b"], [[1, 0.123456]])],
        bad_images=[("p.png", "truncated")],
    )
    on_disk = json.loads((tmp_path / "o" / "results.json").read_text())
    assert on_disk["metrics"] == {"top1": 0.5, "tensor": [1.0, 2.0]}
    assert on_disk["params"]["backbone"] == "debug" and on_disk["seed"] == 0
    assert on_disk["bad_images"] == [["p.png", "truncated"]] and record["evaluation"] == "features"
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| 1 | 0.1235 |" in md and "1 unreadable images" in md
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.endswith(".tmp")]


def test_classification_metrics_match_scikit_learn():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 7, generator=g)
    labels = torch.randint(0, 7, (200,), generator=g)
    labels[labels == 6] = 5  # class 6 never occurs: its per-class accuracy is NaN and left out of the mean
    acc = topk_accuracy(scores, labels, (1, 3, 5, 10))
    for k in (1, 3, 5):
        assert acc[k] == pytest.approx(top_k_accuracy_score(labels, scores, k=k, labels=range(7)))
    assert acc[10] == 1.0
    pred = scores.argmax(1)
    np.testing.assert_array_equal(
        confusion_matrix(pred, labels, 7).numpy(), sk_confusion(labels, pred, labels=range(7))
    )
    m = classification_metrics(scores, labels, [f"c{i}" for i in range(7)])
    recalls = recall_score(labels, pred, labels=range(6), average=None)
    assert [m["per_class"][f"c{i}"] for i in range(6)] == pytest.approx(list(recalls))
    assert np.isnan(m["per_class"]["c6"]) and m["mean_per_class"] == pytest.approx(recalls.mean())
    with pytest.raises(ValueError, match="scores"):
        topk_accuracy(scores, labels[:5])


def test_pictures_are_written(tmp_path):
    cm = np.array([[5, 1], [0, 4]])
    assert save_confusion_matrix(cm, ["a", "b"], tmp_path / "cm.png").stat().st_size > 1000
    rows = [[np.random.rand(8, 8, 3), np.random.rand(8, 8)], [np.random.rand(8, 8, 3), None]]
    assert save_image_grid(rows, tmp_path / "g.png", column_titles=["x", "y"], cmaps=[None, "magma"]).exists()
    with pytest.raises(ValueError, match="no pictures"):
        save_image_grid([], tmp_path / "e.png")


def test_dense_helpers(tmp_path, model):
    for stem in ("a", "b"):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "labels").mkdir(exist_ok=True)
        Image.new("RGB", (10, 10)).save(tmp_path / "images" / f"{stem}.jpg")
        Image.new("L", (10, 10)).save(tmp_path / "labels" / f"{stem}.png")
    pairs = list_pairs(tmp_path, "images", "labels", [".png"])
    assert [Path(i).stem for i, _ in pairs] == ["a", "b"] and all(t.endswith(".png") for _, t in pairs)
    Image.new("RGB", (10, 10)).save(tmp_path / "images" / "c.jpg")
    with pytest.raises(ValueError, match=r"1 files without a partner.*'c'"):
        list_pairs(tmp_path, "images", "labels", [".png"])
    x = torch.ones(1, 3, 13, 17)
    padded, pads = center_pad(x, 8)
    assert padded.shape[-2:] == (16, 24) and pads == (3, 4, 1, 2)
    assert padded[0, 0, 1:14, 3:20].eq(1).all() and padded.sum() == x.sum()
    maps = token_maps(model, torch.randn(2, 3, 13, 17), [-1, 0], norm=False, class_token=True)
    assert [tuple(m.shape) for m, _ in maps] == [(2, 96, 2, 3)] * 2 and maps[0][1].shape == (2, 96)
    assert depth_block_indices(12, 4) == [2, 5, 8, 11] and depth_block_indices(24, 4) == [4, 11, 17, 23]
    assert depth_block_indices(40, 4) == [9, 19, 29, 39] and depth_block_indices(6, 1) == [5]


def test_cli_features_and_errors(tmp_path, images, capsys):
    folder = str(Path(images[0]).parents[1])
    args = ["eval", "features", "--backbone", "debug", "--data", folder, "--resize-size", "40", "--crop-size", "32",
            "--num-workers", "0", "--out", str(tmp_path / "f"), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    with pytest.warns(UserWarning, match="randomly initialised"):
        assert main(args) == 0
    first = json.loads((tmp_path / "f" / "results.json").read_text())["metrics"]
    with pytest.warns(UserWarning, match="randomly initialised"):
        assert main(args) == 0
    second = json.loads((tmp_path / "f" / "results.json").read_text())["metrics"]
    assert (first["from_cache"], second["from_cache"]) == (False, True) and first["images"] == len(images)
    capsys.readouterr()
    assert main(["eval", "knn", "--backbone", "debug", "train=a", "val=b", "temprature=3"]) == 2
    assert "unknown key 'temprature'; did you mean 'temperature'?" in capsys.readouterr().err
    assert main(["eval", "features", "--backbone", "debug"]) == 2
    assert "missing required key 'data'" in capsys.readouterr().err
    assert main(["eval", "linear", "--backbone", "debug", "train=a", "val=b", "mode=slow"]) == 2
    assert "mode='slow': expected one of ['fast', 'augment']" in capsys.readouterr().err
