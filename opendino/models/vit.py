"""The DINOv2 vision transformer (Oquab et al. 2023, arXiv 2304.07193).

Numerically and by state-dict names the backbone of facebookresearch/dinov2
(`dinov2/models/vision_transformer.py` at b8931f7): same constructor keywords and defaults, same token order
(cls, registers, patches; registers carry no position embedding), the same bicubic position-embedding
interpolation with its legacy `interpolate_offset` kludge and the antialiased variant of the register models,
LayerNorm eps 1e-6 and the same initialisation. Official checkpoints load with `strict=True`; parity with the
official code is tested against fixtures computed from it (tests/fixtures/official).

Additions that leave outputs unchanged: list inputs are run crop-size by crop-size (no xFormers nested tensors),
`get_intermediate_layers` also accepts negative indices and stops after the last block it needs,
`get_attention_maps` returns attention weights on demand, and `init_weights` resets every parameter so that a
model built on the meta device can be materialised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from opendino.models.layers import Block, LayerScale, Mlp, PatchEmbed, SwiGLUFFN

__all__ = ["FFN_LAYERS", "PRESETS", "BlockChunk", "DinoVisionTransformer", "build_vit"]


def _identity_ffn(*args: object, **kwargs: object) -> nn.Module:
    return nn.Identity()


FFN_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": Mlp,
    "swiglu": SwiGLUFFN,  # the official code maps both names to the fused SwiGLU (rounded hidden size)
    "swiglufused": SwiGLUFFN,
    "identity": _identity_ffn,
}


class BlockChunk(nn.ModuleList):
    """A run of blocks, padded in front with Identity so that keys keep global block indices (official FSDP
    wrapping unit; training checkpoints have `blocks.<chunk>.<global index>.*` keys)."""

    def forward(self, x: Tensor) -> Tensor:
        for b in self:
            x = b(x)
        return x


class DinoVisionTransformer(nn.Module):
    """ViT backbone with the official DINOv2 constructor, keys and public methods.

    forward_features(x) -> dict(x_norm_clstoken (B, D), x_norm_regtokens (B, R, D), x_norm_patchtokens (B, N, D),
    x_prenorm (B, 1 + R + N, D), masks); a list of tensors gives a list of such dicts.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,  # LayerScale init; None or 0 -> no LayerScale (no ls1/ls2 keys)
        act_layer: Callable[..., nn.Module] = nn.GELU,
        ffn_layer: str = "mlp",
        block_chunks: int = 1,  # official default; hub models use 0 (flat `blocks.<i>` keys)
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
    ) -> None:
        super().__init__()
        _validate_arch(img_size, patch_size, embed_dim, depth, num_heads, ffn_layer, block_chunks, num_register_tokens)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        # The architecture as constructor keywords (JSON-able), saved beside exported weights.
        self.arch = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            ffn_bias=ffn_bias,
            proj_bias=proj_bias,
            init_values=init_values,
            ffn_layer=ffn_layer,
            block_chunks=block_chunks,
            num_register_tokens=num_register_tokens,
            interpolate_antialias=interpolate_antialias,
            interpolate_offset=interpolate_offset,
        )
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        rates = [drop_path_rate] * depth if drop_path_uniform else np.linspace(0, drop_path_rate, depth).tolist()
        blocks = [
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=rates[i],
                init_values=init_values,
                norm_layer=norm_layer,
                act_layer=act_layer,
                ffn_layer=FFN_LAYERS[ffn_layer],
            )
            for i in range(depth)
        ]
        self.chunked_blocks = block_chunks > 0
        if self.chunked_blocks:
            size = depth // block_chunks
            chunks = [[nn.Identity()] * i + blocks[i : i + size] for i in range(0, depth, size)]
            self.blocks = nn.ModuleList([BlockChunk(c) for c in chunks])
        else:
            self.blocks = nn.ModuleList(blocks)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self._init_official()

    # ------------------------------------------------------------------ initialisation
    def _init_official(self) -> None:
        # Same draws in the same order as the official init_weights, so a seed gives the official weights.
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def init_weights(self) -> None:
        """Initialise every parameter as the constructor does: the official scheme for tokens and linears, PyTorch's
        default for the patch convolution, ones / zeros for norms, `init_values` for LayerScale, zeros for the mask
        token. Use it to materialise a model built on the meta device (after `to_empty`)."""
        self._init_official()
        self.patch_embed.proj.reset_parameters()
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm | LayerScale):
                m.reset_parameters()

    # ------------------------------------------------------------------ tokens
    def iter_blocks(self) -> Iterator[Block]:
        """The transformer blocks in order, whether or not they are stored in chunks."""
        for b in self.blocks:
            if isinstance(b, BlockChunk):
                yield from (blk for blk in b if isinstance(blk, Block))
            else:
                yield b  # type: ignore[misc]

    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        """Position embeddings for tokens `x` (B, 1 + N, D) of an image of height `w` and width `h`.

        Official argument naming kept (`w` is the height). Interpolation is skipped only when the patch count and
        the image's squareness match the stored grid; otherwise bicubic from the stored M x M grid, with
        scale_factor (h0 + offset) / M when `interpolate_offset` is set (legacy kludge), else an explicit size.
        """
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        dim = x.shape[-1]
        h0, w0 = w // self.patch_size, h // self.patch_size  # grid rows, grid columns
        m = int(math.sqrt(n))
        assert m * m == n, f"position embedding grid is not square ({n} patches)"
        kwargs: dict[str, object]
        if self.interpolate_offset:
            kwargs = {"scale_factor": ((h0 + self.interpolate_offset) / m, (w0 + self.interpolate_offset) / m)}
        else:
            kwargs = {"size": (h0, w0)}
        patch_pos = F.interpolate(
            pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2),  # (1, D, M, M)
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,  # type: ignore[arg-type]
        )
        assert patch_pos.shape[-2:] == (h0, w0)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)  # (1, h0 * w0, D)
        return torch.cat((pos_embed[:, :1], patch_pos), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """(B, C, H, W) -> tokens (B, 1 + R + N, D): patch embed, mask tokens, cls, position, registers."""
        _, _, height, width = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + N, D)
        x = x + self.interpolate_pos_encoding(x, height, width)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def _output_dict(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    # ------------------------------------------------------------------ public API
    def forward_features_list(self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None]) -> list[dict]:
        return [self.forward_features(x, m) for x, m in zip(x_list, masks_list, strict=True)]

    def forward_features(self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence | None = None):
        """Official output dict for a (B, C, H, W) tensor, or a list of dicts for a list of tensors (crops of
        different sizes), with `masks` (B, N) bool or a list of such (or None)."""
        if isinstance(x, list | tuple):
            masks_list: Sequence[Tensor | None] = [None] * len(x) if masks is None else masks  # type: ignore[assignment]
            if len(masks_list) != len(x):
                raise ValueError(f"got {len(x)} inputs but {len(masks_list)} masks")
            return self.forward_features_list(x, masks_list)
        tokens = self.prepare_tokens_with_masks(x, masks)  # type: ignore[arg-type]
        for blk in self.blocks:
            tokens = blk(tokens)
        return self._output_dict(tokens, masks)  # type: ignore[arg-type]

    def _take_indices(self, n: int | Sequence[int]) -> list[int]:
        depth = self.n_blocks
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"n={n}: must take between 1 and {depth} last blocks")
            return list(range(depth - n, depth))
        idx = [i + depth if i < 0 else i for i in n]
        bad = [j for j, i in zip(n, idx, strict=True) if not 0 <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for a model of depth {depth}")
        return idx

    def _get_intermediate_layers(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        take = self._take_indices(n)
        last = max(take)
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.iter_blocks()):
            tokens = blk(tokens)
            if i in take:
                outputs.append(tokens)
            if i == last:
                break
        return outputs

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens of the last `n` blocks (int) or of the blocks listed in `n` (ascending, negative from the
        end), optionally normed by the final norm, reshaped to (B, D, h, w), paired with their class token."""
        outputs = self._get_intermediate_layers(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            b, _, height, width = x.shape
            p = self.patch_size
            outputs = [o.reshape(b, height // p, width // p, -1).permute(0, 3, 1, 2).contiguous() for o in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens, strict=True))
        return tuple(outputs)

    @torch.no_grad()
    def get_attention_maps(self, x: Tensor, layers: int | Sequence[int] = -1) -> dict[int, Tensor]:
        """Softmax self-attention weights {block index: (B, heads, T, T)} over all 1 + R + N tokens.

        Runs the blocks normally and computes the weights of the requested blocks explicitly, so the fast fused
        attention path costs nothing extra when this is not called.
        """
        take = self._take_indices([layers] if isinstance(layers, int) else layers)
        tokens = self.prepare_tokens_with_masks(x)
        maps = {}
        for i, blk in enumerate(self.iter_blocks()):
            if i in take:
                maps[i] = blk.attn.attention_probs(blk.norm1(tokens))
                if i == max(take):
                    break
            tokens = blk(tokens)
        return maps

    def forward(self, *args, is_training: bool = False, **kwargs):
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])


def _validate_arch(
    img_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    ffn_layer: str,
    block_chunks: int,
    num_register_tokens: int,
) -> None:
    if ffn_layer not in FFN_LAYERS:
        raise ValueError(f"ffn_layer={ffn_layer!r}: expected one of {sorted(FFN_LAYERS)}")
    if patch_size <= 0 or img_size % patch_size:
        raise ValueError(f"img_size={img_size} must be a positive multiple of patch_size={patch_size}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
    if depth < 1 or num_register_tokens < 0:
        raise ValueError(f"depth={depth} must be >= 1 and num_register_tokens={num_register_tokens} >= 0")
    if block_chunks < 0 or (block_chunks > 0 and depth % block_chunks):
        raise ValueError(f"block_chunks={block_chunks} must be 0 or divide depth={depth}")


# Architecture presets in the official constructor's keywords. The four sizes are the official vit_small / vit_base
# / vit_large / vit_giant2 builders; `debug` is ours: tiny, for tests and CPU runs in seconds.
PRESETS: dict[str, dict] = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=4),
    "debug": dict(embed_dim=96, depth=4, num_heads=3, mlp_ratio=4, patch_size=8, img_size=64),
}


def build_vit(arch: str, **kwargs) -> DinoVisionTransformer:
    """`arch` one of PRESETS; keyword arguments override the preset (official constructor keywords)."""
    if arch not in PRESETS:
        raise ValueError(f"unknown architecture {arch!r}: expected one of {sorted(PRESETS)}")
    return DinoVisionTransformer(**{**PRESETS[arch], **kwargs})
