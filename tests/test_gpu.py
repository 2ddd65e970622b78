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
