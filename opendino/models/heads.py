"""The DINO / iBOT projection head (DINOv2 `dinov2/layers/dino_head.py` at b8931f7).

MLP (nlayers Linear layers with GELU between, no BatchNorm by default) -> bottleneck -> L2-normalise -> a
weight-normalised linear layer without bias onto the prototypes. The weight norm is written out here (weight =
g * v / ||v|| per output row) instead of `torch.nn.utils.weight_norm`, whose hook API is deprecated and whose
parametrization replacement renames the keys: this keeps the official `last_layer.weight_g` / `last_layer.weight_v`
names and shapes, so official training checkpoints load unchanged. `weight_g` starts at 1 and is trained, as in the
official head.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = weight_g * weight_v / ||weight_v|| (norm over the input dim)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init for v, then g = 1 (the official head fills weight_g with 1 after wrapping).
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)
        nn.init.ones_(self.weight_g)

    @property
    def weight(self) -> Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in itertools.pairwise(dims):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """(..., in_dim) -> (..., out_dim) prototype scores; `mlp.*` and `last_layer.weight_{g,v}` keys as official."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self._init_mlp()  # before last_layer exists: the official order of random draws
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def init_weights(self) -> None:
        """Re-initialise every parameter as the constructor does (e.g. after `to_empty` from the meta device)."""
        self._init_mlp()
        self.last_layer.reset_parameters()

    def _init_mlp(self) -> None:
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)  # (..., bottleneck_dim)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)  # (..., out_dim)
