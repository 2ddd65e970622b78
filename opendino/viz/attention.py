"""Self-attention of the class token to the patches, per head (the DINO / DINOv2 attention pictures).

The weights are the softmax attention probabilities of one block (default: the last), computed explicitly by
`DinoVisionTransformer.get_attention_maps` from the block's normed input. The row of the class token is kept and
its columns on the register tokens (and on itself) dropped, so a head's map sums to 1 minus what the class token
gives to itself and to the registers; it is not renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from opendino.viz.core import DEFAULT_IMAGE_SIZE, prepare_image, to_input

__all__ = ["AttentionMaps", "cls_attention"]


@dataclass(frozen=True)
class AttentionMaps:
    """Class-token-to-patch attention of one block."""

    image: np.ndarray  # (H, W, 3) uint8: the resized picture fed to the backbone
    heads: np.ndarray  # (n_heads, h, w) float32 attention probabilities
    block: int  # 0-based block index
    patch_size: int

    @property
    def mean(self) -> np.ndarray:
        """(h, w) mean over the heads."""
        return self.heads.mean(axis=0)


@torch.no_grad()
def cls_attention(
    model: nn.Module, image: Image.Image, *, image_size: int = DEFAULT_IMAGE_SIZE, block: int = -1
) -> AttentionMaps:
    """CLS-to-patch attention per head of `block` (negative: from the end) for `image` resized as in
    `image_features`."""
    p = int(model.patch_size)  # type: ignore[arg-type]
    pixels = prepare_image(image, image_size, p)
    maps = model.get_attention_maps(to_input(pixels, model), layers=block)  # type: ignore[operator]
    ((index, probs),) = maps.items()  # (1, heads, T, T), T = 1 + registers + patches
    first_patch = 1 + int(model.num_register_tokens)  # type: ignore[arg-type]
    h, w = pixels.shape[0] // p, pixels.shape[1] // p
    heads = probs[0, :, 0, first_patch:].float().cpu().numpy().reshape(-1, h, w)
    return AttentionMaps(pixels, heads, int(index), p)
