"""`opendino convert` through files: every layout loads where it belongs, gives the same features, and converts
back to the official layout bit-identically."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from opendino.cli import main
from opendino.models.hub import build_backbone, load_backbone, save_backbone

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["plain", "reg4"])
def source(request, tmp_path_factory):
    torch.manual_seed(0)
    kw = {"num_register_tokens": 4, "interpolate_antialias": True, "interpolate_offset": 0.0}
    model = build_backbone(
        "debug",
        img_size=56,
        patch_size=14,
        embed_dim=64,
        num_heads=4,
        depth=2,
        **(kw if request.param == "reg4" else {}),
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = save_backbone(model, tmp_path_factory.mktemp(request.param) / "src.safetensors")
    return model, path


def _assert_same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_to_timm_and_back(source, tmp_path, capsys):
    model, path = source
    dst = tmp_path / "timm.safetensors"
    assert main(["convert", str(path), str(dst), "--to", "timm"]) == 0
    assert "timm.create_model(" in capsys.readouterr().out
    with safe_open(str(dst), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tm = timm.create_model(meta["timm_model"], pretrained=False, **json.loads(meta["timm_kwargs"])).eval()
    tm.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = model.forward_features(x)
        theirs = tm.forward_features(x)
    # timm's forward_features ends with the final norm: tokens are cls, registers, patches as ours
    r = model.num_register_tokens
    torch.testing.assert_close(theirs[:, 0], ours["x_norm_clstoken"], atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs[:, 1 + r :], ours["x_norm_patchtokens"], atol=1e-5, rtol=0)
    back = tmp_path / "back.pth"
    assert main(["convert", str(dst), str(back), "--to", "official"]) == 0
    _assert_same_state(torch.load(back, weights_only=True), model.state_dict())


def test_to_hf_and_back(source, tmp_path):
    model, path = source
    dst = tmp_path / "hf"
    assert main(["convert", str(path), str(dst), "--to", "hf"]) == 0
    config = json.loads((dst / "config.json").read_text())
    cls = transformers.Dinov2WithRegistersModel if model.num_register_tokens else transformers.Dinov2Model
    assert config["model_type"] == ("dinov2_with_registers" if model.num_register_tokens else "dinov2")
    hf, info = cls.from_pretrained(str(dst), output_loading_info=True)
    assert not any(info.values()), info
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = model.forward_features(x)
        hidden = hf.eval()(pixel_values=x).last_hidden_state
    r = model.num_register_tokens
    torch.testing.assert_close(hidden[:, 0], ours["x_norm_clstoken"], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[:, 1 + r :], ours["x_norm_patchtokens"], atol=1e-5, rtol=0)
    reloaded = load_backbone(dst)  # the HF folder itself is a valid source
    _assert_same_state(reloaded.state_dict(), model.state_dict())
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(dst), str(back), "--to", "official"]) == 0
    _assert_same_state(load_backbone(back).state_dict(), model.state_dict())


def test_convert_errors(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "none.pth"), str(tmp_path / "o.pth"), "--to", "official"]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "a", "b", "--to", "onnx"])
