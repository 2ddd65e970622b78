"""Small helpers shared by tests."""

from __future__ import annotations

import torch


def chunk_block_keys(state: dict[str, torch.Tensor], blocks_per_chunk: int) -> dict[str, torch.Tensor]:
    """blocks.<i>.* -> blocks.<i // blocks_per_chunk>.<i>.* (the official training layout, block_chunks > 0)."""
    out = {}
    for k, v in state.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // blocks_per_chunk}.{k[len('blocks.') :]}"
        out[k] = v
    return out
