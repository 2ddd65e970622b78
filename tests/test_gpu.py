"""GPU paths (skipped without CUDA): bf16 autocast and channels-last give the fp32 features within bf16 precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from opendino.config import ExtractConfig
from opendino.extract import load_extracted, run_extract
from opendino.models.hub import build_backbone

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_forward_is_close_to_fp32(amp):
    model = build_backbone("dinov2_vits14", img_size=224).cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        ref = model.forward_features(x)["x_norm_patchtokens"]
        with torch.autocast("cuda", dtype=amp):
            low = model.forward_features(x.contiguous(memory_format=torch.channels_last))["x_norm_patchtokens"]
    assert torch.isfinite(low).all()
    assert _rel(low, ref) < 3e-2


def test_extraction_on_gpu_matches_cpu(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    common = dict(backbone="debug", data=str(tmp_path / "imgs"), resize_size=64, crop_size=64, num_workers=0)
    run_extract(ExtractConfig(out=str(tmp_path / "gpu"), device="cuda", amp="bf16", **common))
    run_extract(ExtractConfig(out=str(tmp_path / "cpu"), device="cpu", **common))
    gpu, cpu = load_extracted(tmp_path / "gpu"), load_extracted(tmp_path / "cpu")
    assert gpu["paths"] == cpu["paths"]
    assert _rel(torch.from_numpy(gpu["cls"]), torch.from_numpy(cpu["cls"])) < 3e-2


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_training_runs_on_gpu_in_every_precision(tmp_path, precision):
    """`opendino train` on CUDA: finite losses, checkpoints and the exported backbone, with bf16 autocast, fp16 with
    the gradient scaler (its state goes into the checkpoint) and fp32."""
    import json

    from opendino.cli import load_train_config
    from opendino.data.synthetic import make_shapes_dataset
    from opendino.log import read_metrics
    from opendino.models.hub import load_backbone
    from opendino.train.loop import run_train

    make_shapes_dataset(tmp_path / "images", n_per_class=4, size=32, seed=0)
    cfg = load_train_config(
        "debug",
        [
            f"data.source={tmp_path / 'images'}",
            f"run.output_dir={tmp_path / 'run'}",
            "run.device=cuda",
            f"run.precision={precision}",
            "run.max_steps=6",
            "run.log_every=1",
            "run.checkpoint_every=3",
            "run.progress=none",
        ],
    )
    summary = run_train(cfg)
    assert summary["steps"] == 6 and summary["nonfinite_total"] == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(np.isfinite(r["loss/total"]) for r in records) and "max_memory_gib" in records[-1]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert ("scaler" in state) == (precision == "fp16")
    backbone = load_backbone(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in backbone.parameters())


def test_cached_eval_features_on_gpu_match_cpu_and_key_on_precision(tmp_path):
    from opendino.data.augment import make_eval_transform
    from opendino.eval.features import cached_features

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(paths[-1])
    torch.manual_seed(0)
    model = build_backbone("debug").eval()
    t = make_eval_transform(64, 64)
    kw = dict(identity={"preset": "debug"}, outputs=("cls", "cls_blocks"), cache_dir=tmp_path / "cache")
    cpu = cached_features(model, paths, t, device=torch.device("cpu"), **kw)
    gpu = cached_features(model.cuda(), paths, t, device=torch.device("cuda"), amp="bf16", **kw)
    assert not gpu.from_cache  # bf16 features are a separate cache entry from fp32 ones
    for k in ("cls", "cls_blocks"):
        assert _rel(torch.from_numpy(gpu.features[k]), torch.from_numpy(cpu.features[k])) < 3e-2
