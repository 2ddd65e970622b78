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


def content_vit(seed: int = 0) -> torch.nn.Module:
    """The debug ViT with patch tokens = LayerNorm(patch embedding of the patch's pixels): no position embedding and
    zero residual branches, so a patch's features depend on its own pixels only (pictures whose answer is known)."""
    from opendino.models.hub import build_backbone

    torch.manual_seed(seed)
    model = build_backbone("debug")
    with torch.no_grad():
        model.pos_embed.zero_()
        for blk in model.iter_blocks():
            for layer in (blk.attn.proj, blk.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
    return model.eval()


def write_halves_seg_dataset(root, n: int):
    """`n` 64 x 64 segmentation pairs under root/images and root/labels: left half red (class 0), right blue (1)."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        img = np.zeros((64, 64, 3), np.uint8)
        img[:, :32], img[:, 32:] = (220, 30, 30), (30, 30, 220)
        label = np.zeros((64, 64), np.uint8)
        label[:, 32:] = 1
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        Image.fromarray(label, mode="L").save(root / "labels" / f"{i}.png")
    return root


def train_tiny_depth_head(root, images):
    """Train the debug backbone's linear depth head (3 iterations, 40 px) on `images` (H, W, 3 uint8 arrays) with
    flat depth 2, 3, ... m; returns `root`, whose `out/` holds the saved head."""
    import numpy as np
    from PIL import Image

    from opendino.config import DepthEvalConfig
    from opendino.eval.depth import run
    from opendino.eval.depth_data import save_depth_png

    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(root / "rgb" / f"{i}.png")
        save_depth_png(root / "depth" / f"{i}.png", np.full(pixels.shape[:2], 2.0 + i, np.float32))
    run(DepthEvalConfig(backbone="debug", train=str(root), val=str(root), out=str(root / "out"), cache_dir="",
                        num_workers=0, iterations=3, warmup_iterations=1, loss_warmup_iterations=1, pictures=0,
                        image_size=40))  # fmt: skip
    return root
