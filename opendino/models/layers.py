"""Building blocks of the DINOv2 vision transformer.

Numerically the layers of facebookresearch/dinov2 (`dinov2/layers/*.py` at b8931f7), with the same parameter
names, so official checkpoints load with `strict=True`. Deviations, none of which change outputs:
- attention always goes through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU); there
  is no xFormers path. Attention probabilities are computed only when asked for (`Attention.attention_probs`).
- "swiglu" and "swiglufused" are one class, as in the official code without xFormers (the fused variant's hidden
  size rounding applies to both).
- stochastic depth keeps the official "efficient" variant: for rates above 0.1 the residual branch runs on a random
  subset of the batch and is rescaled (paper section 5, `drop_add_residual_stochastic_depth`); at or below 0.1 it is
  per-sample DropPath. Each branch gets its own DropPath (the official code reuses `drop_path1` for both; the two
  modules have the same rate and draw fresh noise per call, so the distribution is identical).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFN",
    "drop_add_residual_stochastic_depth",
    "swiglu_hidden_features",
]


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D) by a stride-p convolution; H and W must be multiples of p."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.patches_resolution = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        p = self.patch_size[0]
        if h % p or w % p:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT); `gamma` starts at `init_values`."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (dropout kept for the official signature; DINOv2 always uses 0)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def swiglu_hidden_features(mlp_hidden: int) -> int:
    """Hidden width of the official fused SwiGLU for an MLP of width `mlp_hidden`: 2/3 of it, rounded up to 8."""
    return (int(mlp_hidden * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU FFN with the official fused layout: `w12` holds [x1; x2], output = w3(silu(x1) * x2)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features or in_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, out_features or in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, computed by `scaled_dot_product_attention`."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # 3 x (B, heads, N, head_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self._qkv(x)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, c)  # (B, heads, N, hd) -> (B, N, D)
        return self.proj_drop(self.proj(x))

    def attention_probs(self, x: Tensor) -> Tensor:
        """Softmax attention weights (B, heads, N, N), computed explicitly; only for inspection."""
        q, k, _ = self._qkv(x)
        return ((q * self.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


class DropPath(nn.Module):
    """Per-sample stochastic depth: zero a sample's residual with probability `drop_prob`, rescale the rest."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep) if keep > 0 else x * mask


def drop_add_residual_stochastic_depth(
    x: Tensor, residual_func: Callable[[Tensor], Tensor], drop_ratio: float
) -> Tensor:
    """x + residual on a random subset of max(1, int(B * (1 - drop_ratio))) samples, scaled by B / subset.

    Unbiased like DropPath, but the residual branch only computes on the kept samples (the official "efficient
    stochastic depth").
    """
    b = x.shape[0]
    subset = max(int(b * (1 - drop_ratio)), 1)
    keep = torch.randperm(b, device=x.device)[:subset]
    residual = residual_func(x[keep])  # (subset, N, D)
    out = torch.index_add(x.flatten(1), 0, keep, residual.flatten(1).to(x.dtype), alpha=b / subset)
    return out.view_as(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        ffn_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path

    def _attn_branch(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.sample_drop_ratio > 0.1:
            # The batch-subset variant only pays off above 0.1 (official threshold).
            x = drop_add_residual_stochastic_depth(x, self._attn_branch, self.sample_drop_ratio)
            return drop_add_residual_stochastic_depth(x, self._ffn_branch, self.sample_drop_ratio)
        x = x + self.drop_path1(self._attn_branch(x))
        return x + self.drop_path2(self._ffn_branch(x))
