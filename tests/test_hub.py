"""load_backbone / save_backbone: every checkpoint form it accepts, and clear errors for the ones it refuses."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from _util import chunk_block_keys
from safetensors.torch import save_file

import opendino
from opendino.models.heads import DINOHead
from opendino.models.hub import CheckpointMismatchError, build_backbone, infer_arch, load_backbone, save_backbone
from opendino.models.vit import build_vit


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # registers with the official register models' interpolation (what a bare .pth is assumed to use)
    m = build_backbone("debug", num_register_tokens=2, interpolate_antialias=True, interpolate_offset=0.0).eval()
    with torch.no_grad():  # make every tensor distinctive (mask token, gammas, norms)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_preset_name_gives_random_weights_with_a_warning():
    with pytest.warns(UserWarning, match="randomly initialised"):
        m = opendino.load_backbone("debug")
    assert not m.training and m.patch_size == 8


def test_official_pth_roundtrip(model, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    loaded = load_backbone(path, arch={"num_heads": 3})  # the debug head count is not in the weights
    _same(model, loaded)


def test_interpolation_convention_can_be_overridden(tmp_path):
    torch.manual_seed(0)
    m = build_backbone("debug", num_register_tokens=2).eval()  # registers but offset 0.1, no antialias
    torch.save(m.state_dict(), tmp_path / "w.pth")
    guessed = load_backbone(tmp_path / "w.pth", arch={"num_heads": 3})
    assert guessed.interpolate_antialias and guessed.interpolate_offset == 0.0
    told = load_backbone(
        tmp_path / "w.pth", arch={"num_heads": 3, "interpolate_antialias": False, "interpolate_offset": 0.1}
    )
    _same(m, told)


def test_safetensors_carries_the_architecture(model, tmp_path):
    path = save_backbone(model, tmp_path / "backbone.safetensors")
    loaded = load_backbone(path)  # num_heads=3 comes from the metadata
    assert loaded.arch == {**model.arch, "block_chunks": 0}
    _same(model, loaded)


def test_official_training_checkpoint_teacher_with_chunked_blocks(model, tmp_path):
    chunked = build_vit("debug", block_chunks=2, num_register_tokens=2, init_values=1.0, interpolate_antialias=True)
    sd = chunk_block_keys(model.state_dict(), 2)
    chunked.load_state_dict(sd, strict=True)
    head = DINOHead(96, 10, hidden_dim=16, bottleneck_dim=8)
    teacher = {f"backbone.{k}": v for k, v in chunked.state_dict().items()}
    teacher.update({f"dino_head.{k}": v for k, v in head.state_dict().items()})
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")
    _same(model, load_backbone(tmp_path / "teacher_checkpoint.pth", arch={"num_heads": 3}))
    # the whole SSL model as the official trainer saves it: student and teacher, teacher wins
    student = {f"student.backbone.{k}": torch.zeros_like(v) for k, v in chunked.state_dict().items()}
    full = {"model": {**student, **{f"teacher.{k}": v for k, v in teacher.items()}}, "iteration": 10}
    torch.save(full, tmp_path / "model_0000010.rank_0.pth")
    _same(model, load_backbone(tmp_path / "model_0000010.rank_0.pth", arch={"num_heads": 3}))


def test_ddp_and_compile_prefixes_are_stripped(model, tmp_path):
    sd = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": {k.replace("_orig_mod.", ""): v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    _same(model, load_backbone(tmp_path / "ddp.pth", arch={"num_heads": 3}))


def test_run_directory(model, tmp_path):
    save_backbone(model, tmp_path / "run" / "teacher_backbone.safetensors")
    _same(model, load_backbone(tmp_path / "run"))


def test_fp16_checkpoint_is_cast_to_float32_by_default(model, tmp_path):
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "half.pth")
    loaded = load_backbone(tmp_path / "half.pth", arch={"num_heads": 3})
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    kept = load_backbone(tmp_path / "half.pth", arch={"num_heads": 3}, dtype=None)
    assert all(p.dtype == torch.float16 for p in kept.parameters())


def test_infer_arch_of_official_sizes():
    for name, expected_heads in (("dinov2_vitl14_reg", 16), ("dinov2_vitg14", 24)):
        with torch.device("meta"):
            m = build_backbone(name)
        arch = infer_arch(m.state_dict())
        assert arch == {**m.arch}, name
        assert arch["num_heads"] == expected_heads


def test_mismatch_lists_missing_unexpected_and_shapes(model, tmp_path):
    sd = dict(model.state_dict())
    sd.pop("norm.weight")
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["mask_token"] = torch.zeros(1, 7)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_backbone(tmp_path / "bad.safetensors", arch={"num_heads": 3})
    msg = str(err.value)
    assert "missing keys (1): norm.weight" in msg
    assert "unexpected keys (1): blocks.0.extra.weight" in msg
    assert "mask_token: checkpoint (1, 7) vs model (1, 96)" in msg


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"cls_token": _Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match=r"refusing to unpickle|cannot read"):
        load_backbone(path)
    assert "must never run" not in capsys.readouterr().out


def test_bad_paths_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a preset name"):
        load_backbone(tmp_path / "nope.pth")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read"):
        load_backbone(tmp_path / "empty.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="neither an opendino run"):
        load_backbone(tmp_path / "folder")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointMismatchError, match="not a DINOv2 backbone"):
        load_backbone(tmp_path / "resnet.pth")


def test_hub_module_functions():
    import opendino.hub as hub

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.device("meta"):
            m = hub.dinov2_vitg14_reg()
    assert m.num_register_tokens == 4 and m.interpolate_antialias and m.interpolate_offset == 0.0
    assert m.pos_embed.shape == (1, 1 + 37 * 37, 1536)
