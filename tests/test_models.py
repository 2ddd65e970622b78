"""Contracts of the backbone and its layers beyond parity: presets, gradients, stochastic depth, attention maps,
meta-device materialisation, the DINO head."""

from __future__ import annotations

import pytest
import torch
from _util import chunk_block_keys

from opendino.models import PRESETS, DINOHead, DinoVisionTransformer, build_vit
from opendino.models.hub import HUB_MODELS, build_backbone, hub_kwargs
from opendino.models.layers import Block, drop_add_residual_stochastic_depth


def test_every_hub_preset_builds_on_meta_with_expected_size():
    expected_millions = {"s": 22, "b": 86, "l": 304, "g": 1136}
    for name in HUB_MODELS:
        with torch.device("meta"):
            model = DinoVisionTransformer(**hub_kwargs(name))
        n = sum(p.numel() for p in model.parameters()) / 1e6
        if name != "debug":
            size = name.split("_vit")[1][0]
            assert abs(n - expected_millions[size]) / expected_millions[size] < 0.02, (name, n)


def test_every_parameter_gets_a_gradient():
    model = build_backbone("debug", num_register_tokens=2).train()
    x = torch.randn(2, 3, 64, 48)
    masks = torch.zeros(2, (64 // 8) * (48 // 8), dtype=torch.bool)
    masks[:, :5] = True
    out = model.forward_features(x, masks=masks)
    loss = out["x_norm_clstoken"].square().sum() + out["x_norm_patchtokens"].sum() + out["x_norm_regtokens"].sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_invalid_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="ffn_layer"):
        DinoVisionTransformer(ffn_layer="gelu")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DinoVisionTransformer(img_size=100, patch_size=14)
    with pytest.raises(ValueError, match="divisible"):
        DinoVisionTransformer(embed_dim=100, num_heads=3)
    model = build_backbone("debug")
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(torch.randn(1, 3, 64, 64), n=[7])
    with pytest.raises(ValueError, match="unknown architecture"):
        build_vit("vit_huge")


def test_batch_subset_stochastic_depth_is_unbiased():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4)
    residual = torch.randn(8, 3, 4)
    idx = {id(x): None}

    def branch(sub: torch.Tensor) -> torch.Tensor:
        # recover which rows were picked: each row of x is unique
        rows = [int((x == r).all(dim=(1, 2)).nonzero()) for r in sub]
        idx[id(x)] = rows
        return residual[rows]

    mean = torch.zeros_like(x)
    n = 4000
    for _ in range(n):
        out = drop_add_residual_stochastic_depth(x, branch, 0.4)
        rows = idx[id(x)]
        assert len(rows) == int(8 * 0.6)  # subset size: int(B * (1 - rate))
        mean += out / n
    torch.testing.assert_close(mean, x + residual, atol=0.1, rtol=0)


@pytest.mark.parametrize("rate", [0.05, 0.3])
def test_block_stochastic_depth_expectation(rate):
    torch.manual_seed(0)
    block = Block(16, 2, drop_path=rate, init_values=1.0)
    x = torch.randn(32, 5, 16)
    with torch.no_grad():
        expected = block.eval()(x)
        block.train()
        # a single branch's expectation is exact; the two-branch composition is not linear, so compare the
        # attention branch alone
        branch = block._attn_branch(x)  # deterministic (no dropout): only the drop path is random
        outs = torch.stack([block.drop_path1(branch) + x for _ in range(3000)])
        dropped = (outs - x == 0).all(dim=(2, 3)).float().mean()
    torch.testing.assert_close(outs.mean(0), x + branch, atol=0.06, rtol=0)
    assert abs(dropped.item() - rate) < 0.02  # per-sample drop probability
    assert expected.shape == x.shape


def test_attention_maps_match_the_fused_path():
    torch.manual_seed(0)
    model = build_backbone("debug", num_register_tokens=1).eval()
    x = torch.randn(2, 3, 48, 64)
    maps = model.get_attention_maps(x, layers=[0, -1])
    assert sorted(maps) == [0, model.n_blocks - 1]
    tokens = model.prepare_tokens_with_masks(x)
    blk = next(model.iter_blocks())
    attn = blk.attn
    h = blk.norm1(tokens)
    b, n, c = h.shape
    v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)[2]
    manual = attn.proj((maps[0] @ v).transpose(1, 2).reshape(b, n, c))
    with torch.no_grad():
        torch.testing.assert_close(manual, attn(h), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, model.num_heads, n))


def test_meta_device_model_materialises_with_init_weights():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_backbone("debug")
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(float("nan"))  # a missed initialisation shows at once
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    out = model(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(out).all()


def test_chunked_model_matches_flat_model():
    torch.manual_seed(0)
    flat = build_vit("debug", block_chunks=0, init_values=0.5).eval()
    chunked = build_vit("debug", block_chunks=2, init_values=0.5).eval()
    sd = chunk_block_keys(flat.state_dict(), 2)
    chunked.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), flat(x), atol=0, rtol=0)
        a = chunked.get_intermediate_layers(x, n=[1, 3])
        b = flat.get_intermediate_layers(x, n=[1, 3])
    for u, w in zip(a, b, strict=True):
        torch.testing.assert_close(u, w, atol=0, rtol=0)


def test_dino_head_is_weight_normalised_and_trainable():
    torch.manual_seed(0)
    head = DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16)
    assert torch.equal(head.last_layer.weight_g, torch.ones(50, 1))
    row_norms = head.last_layer.weight.norm(dim=1)
    torch.testing.assert_close(row_norms, torch.ones(50))
    head(torch.randn(4, 32)).sum().backward()
    assert head.last_layer.weight_g.grad is not None and head.last_layer.weight_v.grad is not None


def test_debug_preset_is_tiny():
    model = build_backbone("debug")
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert PRESETS["debug"]["patch_size"] == 8
