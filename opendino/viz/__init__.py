"""Seeing the features: PCA, foreground, patch matches, attention, similarity, depth and segmentation pictures.

The API is pure functions over a loaded backbone (`opendino.load_backbone`) and PIL images, returning numpy arrays
and small dataclasses, with no file I/O; `opendino.viz.figures` turns them into uint8 pictures or PNG figures, and
`run_viz` (the `opendino viz KIND` command) writes them. Typical use:

    feats = [image_features(model, img, image_size=448) for img in images]
    maps = pca_maps(feats)                       # maps.rgb[i] (h, w, 3), maps.foreground.masks[i] (h, w)
    sim = similarity_map(feats[0], row, col)     # (h, w) cosine similarity to one patch
    m = mutual_nearest_neighbours(feats[0], feats[1], mask_a=..., mask_b=..., top=40)
    att = cls_attention(model, img)              # att.heads (n_heads, h, w), att.mean
    head = load_head("runs/eval/depth"); dm = predict_depth_map(model, head, img)
"""

from opendino.viz.attention import AttentionMaps, cls_attention
from opendino.viz.core import (
    DEFAULT_IMAGE_SIZE,
    PCA,
    Foreground,
    ImageFeatures,
    PCAMaps,
    fit_pca,
    foreground_masks,
    image_features,
    input_size,
    patch_at,
    pca_maps,
    prepare_image,
    similarity_map,
)
from opendino.viz.heads import (
    DenseHead,
    DepthMap,
    SegMap,
    check_head,
    load_head,
    predict_depth_map,
    predict_segmentation,
)
from opendino.viz.match import Matches, mutual_nearest_neighbours
from opendino.viz.run import run_viz

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "PCA",
    "AttentionMaps",
    "DenseHead",
    "DepthMap",
    "Foreground",
    "ImageFeatures",
    "Matches",
    "PCAMaps",
    "SegMap",
    "check_head",
    "cls_attention",
    "fit_pca",
    "foreground_masks",
    "image_features",
    "input_size",
    "load_head",
    "mutual_nearest_neighbours",
    "patch_at",
    "pca_maps",
    "predict_depth_map",
    "predict_segmentation",
    "prepare_image",
    "run_viz",
    "similarity_map",
]
