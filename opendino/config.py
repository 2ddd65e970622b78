"""Typed configuration: one frozen dataclass per stage, loaded from YAML plus dotted `key=value` overrides.

Rules the whole project relies on:
- an unknown key, a wrong type or an impossible value is a `ConfigError` naming the key (with a suggestion for
  near-misses) before any work starts;
- a loaded config is never mutated (frozen dataclasses); derived values are pure functions of it;
- this module imports nothing from the package.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "CURATE_STAGES",
    "EVAL_CONFIGS",
    "ConfigError",
    "CopydetectEvalConfig",
    "CropsConfig",
    "CurateBalanceConfig",
    "CurateConfig",
    "CurateDedupConfig",
    "CurateEmbedConfig",
    "CurateReportConfig",
    "CurateRetrieveConfig",
    "DataConfig",
    "DemoConfig",
    "DepthEvalConfig",
    "DinoConfig",
    "EvalCommon",
    "ExtractConfig",
    "FeaturesEvalConfig",
    "IbotConfig",
    "KnnEvalConfig",
    "KoleoConfig",
    "LinearEvalConfig",
    "LogregEvalConfig",
    "ModelConfig",
    "OptimConfig",
    "QuickstartConfig",
    "RetrievalEvalConfig",
    "RobustnessEvalConfig",
    "RunConfig",
    "SchedulesConfig",
    "SeedSetConfig",
    "SegEvalConfig",
    "TeacherConfig",
    "TrainConfig",
    "VizConfig",
    "dump_yaml",
    "field_docs",
    "global_batch_size",
    "load",
    "parse_overrides",
    "run_iterations",
    "scaled_lr",
    "to_dict",
    "total_iterations",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot run: names the offending key and what was expected."""


# ---------------------------------------------------------------------------------------------- schemas
def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {list(choices)}")


def _check_positive(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be positive")


@dataclass(frozen=True)
class ExtractConfig:
    """`opendino extract`: features of every image of a folder / list, written in resumable shards."""

    backbone: str  # preset name, checkpoint file, Hugging Face folder or opendino run directory
    data: str  # image folder (recursive), .txt list (one path per line) or .csv with a `path` column
    out: str  # output folder: shard files, manifest.json, bad_images.tsv
    resize_size: int = 256  # shorter side before the centre crop (official eval transform: 256)
    crop_size: int = 224  # centre crop, a multiple of the patch size (official: 224)
    full_image: tuple[int, int] | None = None  # (H, W): resize whole images to this size instead of resize+crop
    batch_size: int = 64  # images per forward pass
    num_workers: int = 4  # DataLoader decoding processes (0: decode in the main process)
    shard_size: int = 10_000  # images per output shard (a killed run resumes at shard granularity)
    format: str = "safetensors"  # "safetensors" or "npy"
    cls: bool = True  # write the CLS token (after the final norm): `cls` (n, D)
    mean_pool: bool = False  # write the mean of the patch tokens: `mean` (n, D)
    patch_tokens: bool = False  # write all patch tokens: `patch` (n, h*w, D); large
    save_dtype: str = "float32"  # dtype on disk: float32, float16 or bfloat16 (bfloat16 only with safetensors)
    normalize: bool = False  # L2-normalise every CLS / mean / patch vector before saving (cosine = dot product)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    amp: str = "bf16"  # autocast dtype on GPU: bf16, fp16 or none (CPU always runs fp32)
    channels_last: bool = True  # channels-last input memory format on GPU
    compile: bool = False  # torch.compile the backbone (pays off for large folders on GPU)
    max_image_pixels: int = 178_956_970  # larger images are skipped as decompression bombs
    overwrite: bool = False  # start afresh even if `out` holds a finished or partial extraction

    def __post_init__(self) -> None:
        _check_choice("format", self.format, ("safetensors", "npy"))
        _check_choice("save_dtype", self.save_dtype, ("float32", "float16", "bfloat16"))
        _check_choice("amp", self.amp, ("bf16", "fp16", "none"))
        for name in ("resize_size", "crop_size", "batch_size", "shard_size", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be positive")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers}: must be >= 0")
        if self.save_dtype == "bfloat16" and self.format == "npy":
            raise ConfigError("save_dtype=bfloat16 needs format=safetensors (numpy has no bfloat16)")
        if not (self.cls or self.mean_pool or self.patch_tokens):
            raise ConfigError("nothing to write: enable at least one of cls, mean_pool, patch_tokens")


@dataclass(frozen=True)
class QuickstartConfig:
    """`opendino quickstart`: pretrain the debug ViT on generated images, then compare its kNN accuracy with random
    initialisation (no download)."""

    out: str = "runs/quickstart"  # folder for the generated images, the training run and quickstart.json
    n_per_class: int = 100  # generated training images per class (10 classes); as many again for validation
    image_size: int = 64  # side of the generated images, in pixels
    crop_size: int = 32  # side of the global crops (a multiple of 8, the debug patch size); local crops are half
    steps: int = 300  # training iterations (the schedules are sized to this)
    batch_size: int = 32  # images per training step
    num_workers: int = 1  # DataLoader decoding processes
    seed: int = 0  # seed of the image generator, the initial weights and the training run
    device: str = "auto"  # "auto", "cpu", "cuda", ...

    def __post_init__(self) -> None:
        if self.n_per_class < 2:
            raise ConfigError(f"n_per_class={self.n_per_class}: need at least 2 images per class")
        if self.image_size < 16 or self.batch_size <= 0 or self.num_workers < 0 or self.steps <= 0:
            raise ConfigError("image_size must be >= 16, batch_size and steps > 0, num_workers >= 0")
        if self.crop_size % 16 or not 32 <= self.crop_size <= self.image_size:
            raise ConfigError(f"crop_size={self.crop_size}: must be a multiple of 16 between 32 and image_size")


# ---------------------------------------------------------------------------------------------- training
_ARCHS = ("vit_small", "vit_base", "vit_large", "vit_giant2", "debug")
_FFN_LAYERS = ("mlp", "swiglu", "swiglufused", "identity")


@dataclass(frozen=True)
class DataConfig:
    """Where the unlabelled training images come from and how they are loaded."""

    source: str = ""  # image folder (recursive), .txt list, .csv/.parquet manifest (path[,weight]) or tar shards glob
    kind: str = "auto"  # auto, folder, list, manifest or shards ("auto": shards for *.tar patterns, else by suffix)
    batch_size_per_gpu: int = 64  # images per process and step (official train.batch_size_per_gpu)
    num_workers: int = 8  # DataLoader decoding processes per training process (0: decode in the main process)
    shuffle: bool = True  # shuffle the image order (off only to debug)
    shuffle_buffer: int = 1000  # samples held for shuffling within a worker (tar shards only)
    pin_memory: bool = True  # page-locked batches for faster host-to-GPU copies (GPU only)
    max_image_pixels: int = 178_956_970  # larger images are skipped as decompression bombs

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, ("auto", "folder", "list", "manifest", "shards"))
        _check_positive(self, "batch_size_per_gpu", "shuffle_buffer", "max_image_pixels")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers}: must be >= 0")


@dataclass(frozen=True)
class CropsConfig:
    """Multi-crop augmentation (dinov2/data/augmentations.py)."""

    global_crops_number: int = 2  # global crops per image (the official recipe and the losses assume 2)
    global_crops_scale: tuple[float, float] = (0.32, 1.0)  # RandomResizedCrop area range of the global crops
    global_crops_size: int = 224  # side of the global crops in pixels, a multiple of the patch size
    local_crops_number: int = 8  # local crops per image (0 disables them)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)  # RandomResizedCrop area range of the local crops
    local_crops_size: int = 96  # side of the local crops in pixels, a multiple of the patch size
    blur: str = "official"  # "official": blur p 0.0/0.9/0.5 as the released models; "intended": 1.0/0.1/0.5

    def __post_init__(self) -> None:
        _check_choice("blur", self.blur, ("official", "intended"))
        if self.global_crops_number != 2:
            raise ConfigError(f"global_crops_number={self.global_crops_number}: only 2 is supported (official)")
        if self.local_crops_number < 0:
            raise ConfigError(f"local_crops_number={self.local_crops_number}: must be >= 0")
        _check_positive(self, "global_crops_size", "local_crops_size")
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"{name}={[lo, hi]}: expected 0 < min <= max <= 1")


@dataclass(frozen=True)
class ModelConfig:
    """The student backbone (the teacher is built identically, without stochastic depth)."""

    arch: str = "vit_large"  # vit_small, vit_base, vit_large, vit_giant2 or debug (tiny, for CPU tests)
    patch_size: int = 16  # patch side in pixels (14 for the released models)
    drop_path_rate: float = 0.3  # stochastic depth rate (student only); above 0.1 the batch-subset variant runs
    drop_path_uniform: bool = True  # same rate in every block (else linearly increasing with depth)
    layerscale: float = 1.0e-5  # LayerScale initial value (0: no LayerScale)
    ffn_layer: str = "mlp"  # mlp, swiglu, swiglufused or identity
    block_chunks: int = 0  # group blocks in chunks as the official training code (checkpoint key layout only)
    qkv_bias: bool = True  # bias in the attention qkv projection
    proj_bias: bool = True  # bias in the attention output projection
    ffn_bias: bool = True  # biases in the feed-forward layers
    num_register_tokens: int = 0  # register tokens (Darcet et al. 2024); 4 for the *_reg models
    interpolate_antialias: bool = False  # antialiased bicubic position-embedding interpolation
    interpolate_offset: float = 0.1  # official position-embedding interpolation offset (0 for the *_reg models)
    pretrained_weights: str = ""  # start the student and teacher backbones from these weights ("" = random init)

    def __post_init__(self) -> None:
        _check_choice("arch", self.arch, _ARCHS)
        _check_choice("ffn_layer", self.ffn_layer, _FFN_LAYERS)
        _check_positive(self, "patch_size")
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError(f"drop_path_rate={self.drop_path_rate}: expected 0 <= rate < 1")
        if self.layerscale < 0 or self.num_register_tokens < 0 or self.block_chunks < 0:
            raise ConfigError("layerscale, num_register_tokens and block_chunks must be >= 0")


@dataclass(frozen=True)
class DinoConfig:
    """The DINO (image-level, CLS token) objective and its head."""

    loss_weight: float = 1.0  # weight of the DINO loss in the total
    head_n_prototypes: int = 65536  # output dimension of the DINO head (prototypes)
    head_bottleneck_dim: int = 256  # dimension before the weight-normalised prototype layer
    head_nlayers: int = 3  # MLP layers of the head
    head_hidden_dim: int = 2048  # hidden width of the head MLP
    student_temp: float = 0.1  # student softmax temperature (official loss-module default)

    def __post_init__(self) -> None:
        _check_positive(self, "head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim")
        _check_positive(self, "student_temp")
        if self.loss_weight < 0:
            raise ConfigError(f"loss_weight={self.loss_weight}: must be >= 0")


@dataclass(frozen=True)
class IbotConfig:
    """The iBOT (masked patch tokens) objective, its masking and its head."""

    loss_weight: float = 1.0  # weight of the iBOT loss in the total (0 disables masking and the loss)
    mask_sample_probability: float = 0.5  # share of the global crops that get a mask
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)  # masked share of patches, spread over the masked crops
    separate_head: bool = False  # untied iBOT head (True in the official ViT-L/g recipes); False: share the DINO head
    head_n_prototypes: int = 65536  # output dimension of the iBOT head (separate head only)
    head_bottleneck_dim: int = 256  # bottleneck dimension of the iBOT head (separate head only)
    head_nlayers: int = 3  # MLP layers of the iBOT head (separate head only)
    head_hidden_dim: int = 2048  # hidden width of the iBOT head (separate head only)
    student_temp: float = 0.1  # student softmax temperature (official loss-module default)

    def __post_init__(self) -> None:
        _check_positive(self, "head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim")
        _check_positive(self, "student_temp")
        if self.loss_weight < 0:
            raise ConfigError(f"loss_weight={self.loss_weight}: must be >= 0")
        if not 0 <= self.mask_sample_probability <= 1:
            raise ConfigError(f"mask_sample_probability={self.mask_sample_probability}: expected 0..1")
        lo, hi = self.mask_ratio_min_max
        if not 0 <= lo <= hi <= 1:
            raise ConfigError(f"mask_ratio_min_max={[lo, hi]}: expected 0 <= min <= max <= 1")


@dataclass(frozen=True)
class KoleoConfig:
    """The KoLeo regulariser on the student's global-crop CLS features (official dino.koleo_loss_weight)."""

    loss_weight: float = 0.1  # weight of the KoLeo term (0 disables it)

    def __post_init__(self) -> None:
        if self.loss_weight < 0:
            raise ConfigError(f"loss_weight={self.loss_weight}: must be >= 0")


@dataclass(frozen=True)
class TeacherConfig:
    """EMA teacher: momentum, temperatures and centering of its outputs."""

    momentum_teacher: float = 0.992  # EMA momentum at the start (cosine schedule to final_momentum_teacher)
    final_momentum_teacher: float = 1.0  # EMA momentum at the end of training
    warmup_teacher_temp: float = 0.04  # teacher temperature at the start (linear warm-up)
    teacher_temp: float = 0.07  # teacher temperature after the warm-up
    centering: str = "centering"  # "centering" (softmax with an EMA centre) or "sinkhorn_knopp" (3 iterations)
    center_momentum: float = 0.9  # EMA momentum of the softmax centre (official loss-module default)

    def __post_init__(self) -> None:
        _check_choice("centering", self.centering, ("centering", "sinkhorn_knopp"))
        for name in ("momentum_teacher", "final_momentum_teacher", "center_momentum"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}={getattr(self, name)}: expected a value in [0, 1]")
        _check_positive(self, "warmup_teacher_temp", "teacher_temp")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, learning rate and weight decay values (their schedules' lengths are in `schedules`)."""

    base_lr: float = 0.004  # learning rate before scaling by the global batch (see scaling_rule)
    lr: float = 0.0  # the learning rate actually used; 0 = derive it from base_lr with scaling_rule
    min_lr: float = 1.0e-6  # learning rate at the end of the cosine decay
    scaling_rule: str = "sqrt_wrt_1024"  # sqrt_wrt_1024: lr = base_lr * sqrt(global_batch / 1024)
    weight_decay: float = 0.04  # weight decay at the start (cosine schedule to weight_decay_end)
    weight_decay_end: float = 0.4  # weight decay at the end of training
    clip_grad: float = 3.0  # gradient-norm clipping per student part (backbone, heads); 0 disables
    patch_embed_lr_mult: float = 0.2  # learning-rate multiplier of the patch embedding
    layerwise_decay: float = 0.9  # layer-wise learning-rate decay (1.0 = none)
    adamw_beta1: float = 0.9  # AdamW beta1
    adamw_beta2: float = 0.999  # AdamW beta2

    def __post_init__(self) -> None:
        _check_choice("scaling_rule", self.scaling_rule, ("sqrt_wrt_1024", "none"))
        for name in ("base_lr", "lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 0")
        if not 0 < self.layerwise_decay <= 1 or self.patch_embed_lr_mult < 0:
            raise ConfigError("layerwise_decay must be in (0, 1] and patch_embed_lr_mult >= 0")
        for name in ("adamw_beta1", "adamw_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: expected 0 <= beta < 1")


@dataclass(frozen=True)
class SchedulesConfig:
    """Lengths of the training schedules, in epochs of `epoch_length` iterations (official 'epochs')."""

    epochs: int = 100  # length of training in epochs (total iterations = epochs * epoch_length)
    epoch_length: int = 1250  # iterations per epoch (official OFFICIAL_EPOCH_LENGTH, independent of the data size)
    warmup_epochs: int = 10  # linear learning-rate warm-up
    warmup_teacher_temp_epochs: int = 30  # linear teacher-temperature warm-up
    freeze_last_layer_epochs: int = 1  # the heads' last layer gets learning rate 0 for this long

    def __post_init__(self) -> None:
        _check_positive(self, "epochs", "epoch_length")
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
            if not 0 <= getattr(self, name) <= self.epochs:
                raise ConfigError(f"{name}={getattr(self, name)}: expected 0 <= value <= epochs={self.epochs}")


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives and how it executes: devices, precision, parallelism, checkpoints, logging."""

    output_dir: str = "runs/train"  # run directory: config.yaml, metrics.jsonl, TensorBoard, checkpoints/, backbone
    seed: int = 0  # seed of initialisation, data order, augmentations and masks
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16, fp16 (with a grad scaler) or fp32
    parallel: str = "ddp"  # data parallelism over processes: ddp or fsdp (FSDP2 fully_shard)
    compile: bool = False  # torch.compile each transformer block (GPU)
    activation_checkpointing: bool = False  # recompute block activations in the backward pass to save memory
    max_steps: int = 0  # stop after this many iterations (0: the full schedule); the schedules keep their length
    checkpoint_every: int = 1250  # iterations between checkpoints (and at the end)
    keep_last: int = 3  # checkpoints kept (older ones deleted)
    resume: bool = True  # continue from the last checkpoint in output_dir when there is one
    log_every: int = 10  # iterations between metric lines (metrics.jsonl, TensorBoard, console)
    progress: str = "auto"  # console output: auto (bar on a terminal, lines otherwise), bar, line or none
    tensorboard: bool = True  # write TensorBoard events to output_dir/tb
    max_nonfinite_steps: int = 10  # consecutive steps with a non-finite loss before the run stops
    knn_train: str = ""  # labelled folder (class sub-folders) for a periodic kNN evaluation ("" = off)
    knn_val: str = ""  # labelled validation folder for the periodic kNN evaluation
    knn_every: int = 0  # iterations between kNN evaluations (0: only at the end when knn_train is set)
    knn_size: int = 224  # resize side of the kNN evaluation images (a multiple of the patch size)

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        _check_choice("parallel", self.parallel, ("ddp", "fsdp"))
        _check_choice("progress", self.progress, ("auto", "bar", "line", "none"))
        _check_positive(self, "checkpoint_every", "keep_last", "log_every", "max_nonfinite_steps", "knn_size")
        if self.max_steps < 0 or self.knn_every < 0:
            raise ConfigError("max_steps and knn_every must be >= 0")
        if bool(self.knn_train) != bool(self.knn_val):
            raise ConfigError("knn_train and knn_val go together: set both or neither")


@dataclass(frozen=True)
class TrainConfig:
    """`opendino train`: self-supervised DINOv2 pretraining (DINO + iBOT + KoLeo, EMA teacher)."""

    data: DataConfig = DataConfig()  # training images
    crops: CropsConfig = CropsConfig()  # multi-crop augmentation
    model: ModelConfig = ModelConfig()  # student / teacher backbone
    dino: DinoConfig = DinoConfig()  # DINO loss and head
    ibot: IbotConfig = IbotConfig()  # iBOT loss, masking and head
    koleo: KoleoConfig = KoleoConfig()  # KoLeo regulariser
    teacher: TeacherConfig = TeacherConfig()  # EMA teacher
    optim: OptimConfig = OptimConfig()  # optimiser values
    schedules: SchedulesConfig = SchedulesConfig()  # schedule lengths
    run: RunConfig = RunConfig()  # execution and outputs

    def __post_init__(self) -> None:
        p = self.model.patch_size
        for name in ("global_crops_size", "local_crops_size"):
            size = getattr(self.crops, name)
            if size % p:
                near = sorted({max(p, size // p * p), (size // p + 1) * p})
                raise ConfigError(f"crops.{name}={size} is not a multiple of model.patch_size={p}; try one of {near}")
        if self.run.knn_size % p:
            raise ConfigError(f"run.knn_size={self.run.knn_size} is not a multiple of model.patch_size={p}")
        if self.ibot.loss_weight > 0 and self.ibot.mask_sample_probability > 0:
            n_tokens = (self.crops.global_crops_size // p) ** 2
            if n_tokens < 8:  # the official mask generator: blocks of >= 4 patches, at most half the grid
                raise ConfigError(
                    f"crops.global_crops_size={self.crops.global_crops_size} gives {n_tokens} patches; iBOT block "
                    "masking needs at least 8: use larger global crops or ibot.loss_weight=0"
                )
        if self.schedules.epochs * self.schedules.epoch_length < 1:
            raise ConfigError("the schedule has no iterations")


_AMPS = ("bf16", "fp16", "none")


# ---------------------------------------------------------------------------------------------- curation
CURATE_STAGES = ("embed", "dedup", "retrieve", "balance", "manifest")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class SeedSetConfig:
    """A curated seed set: pool images close to its images are retrieved."""

    name: str  # short label (letters, digits, . _ -) used in the manifest's `source` column and the report
    data: str  # the seed images: folder, .txt list, manifest table or tar shards
    method: str = "auto"  # "sample" (nearest pool images of each seed), "cluster" (pool clusters holding seeds), "auto"
    k: int = 4  # sample-based: pool images retrieved per seed image (paper: 4; 32 for ImageNet-1k)
    include: bool = True  # put the seed images themselves into the manifest too (the paper's curated sets "as is")

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"seed set name {self.name!r}: use letters, digits, '.', '_' or '-'")
        _check_choice("method", self.method, ("auto", "sample", "cluster"))
        if self.k < 1:
            raise ConfigError(f"k={self.k}: must be >= 1")


@dataclass(frozen=True)
class CurateEmbedConfig:
    """Stage 1: L2-normalised float16 CLS features of the pool, the seed sets and the evaluation sets."""

    resize_size: int = 256  # shorter side before the centre crop (official eval transform: 256)
    crop_size: int = 224  # centre crop, a multiple of the patch size (official: 224)
    batch_size: int = 64  # images per forward pass
    num_workers: int = 4  # DataLoader decoding processes (0: decode in the main process)
    shard_size: int = 10_000  # images per feature shard (a killed run resumes at shard granularity)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", ...; under torchrun each process its own GPU
    amp: str = "bf16"  # autocast dtype on GPU: bf16, fp16 or none (CPU always runs fp32)
    compile: bool = False  # torch.compile the backbone (pays off for large pools on GPU)
    max_image_pixels: int = 178_956_970  # larger images are skipped as decompression bombs

    def __post_init__(self) -> None:
        _check_choice("amp", self.amp, _AMPS)
        _check_positive(self, "resize_size", "crop_size", "batch_size", "shard_size", "max_image_pixels")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers}: must be >= 0")


@dataclass(frozen=True)
class CurateDedupConfig:
    """Stage 2: near-duplicate removal within the pool and against evaluation sets (k-NN graph, components)."""

    k: int = 64  # neighbours per image in the k-NN graph (paper: 64)
    threshold: float = 0.95  # cosine similarity above which two pool images are near-duplicates (see docs)
    eval_sets: tuple[str, ...] = ()  # image sources (evaluation sets) whose near-duplicates leave the pool
    eval_threshold: float = 0.9  # cosine similarity above which a pool image duplicates an evaluation image
    expand_components: bool = True  # drop the whole pool duplicate group of a matched image (paper)
    index: str = "auto"  # faiss index: "auto" (exact when small, IVF when large), "flat", "ivf" or "ivfpq"
    nlist: int = 0  # IVF inverted lists (0: 4·sqrt(n)); also used by the retrieve stage's index
    nprobe: int = 0  # IVF lists searched per query (0: 2·sqrt(nlist)); fewer is faster, may miss neighbours
    pq_m: int = 0  # ivfpq sub-quantisers, must divide the embedding dimension (0: largest divisor up to d/8)
    examples: int = 8  # duplicate groups drawn in the report

    def __post_init__(self) -> None:
        _check_choice("index", self.index, ("auto", "flat", "ivf", "ivfpq"))
        _check_positive(self, "k")
        for name in ("nlist", "nprobe", "pq_m"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 0 (0: automatic)")
        for name in ("threshold", "eval_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)}: a cosine similarity in [-1, 1]")
        if self.examples < 0:
            raise ConfigError(f"examples={self.examples}: must be >= 0")


@dataclass(frozen=True)
class CurateRetrieveConfig:
    """Stage 3: pool images retrieved around each seed set (sample-based or cluster-based, paper Sec. 3)."""

    auto_sample_min: int = 1000  # method "auto": sample-based from this many seed images on, else cluster-based
    min_similarity: float = -1.0  # sample-based: neighbours below this cosine similarity are not taken (-1: all)
    n_clusters: int = 0  # cluster-based: k-means clusters of the pool (0: pool size / 100; paper: 100,000)
    min_seeds: int = 3  # cluster-based: a cluster is taken when it holds more than this many seed images (paper: 3)
    per_cluster: int = 10_000  # cluster-based: pool images taken from each chosen cluster (paper: 10,000)
    cap: int = 1_000_000  # cluster-based: at most this many pool images per seed set (paper: 1M)
    strategy: str = "random"  # cluster-based, in a cluster larger than per_cluster: "random" or "closest" images
    kmeans_iters: int = 50  # cluster-based: Lloyd iterations of the pool k-means

    def __post_init__(self) -> None:
        _check_choice("strategy", self.strategy, ("random", "closest"))
        _check_positive(self, "auto_sample_min", "per_cluster", "cap", "kmeans_iters")
        if self.n_clusters < 0 or self.min_seeds < 0:
            raise ConfigError("n_clusters and min_seeds must be >= 0")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ConfigError(f"min_similarity={self.min_similarity}: a cosine similarity in [-1, 1]")


@dataclass(frozen=True)
class CurateBalanceConfig:
    """Stage 4: hierarchical k-means with resampling, then balanced sampling (Vo et al. 2024)."""

    apply_to: str = "auto"  # "pool" (deduplicated pool), "retrieved", "none"; "auto": retrieved if seeds, else pool
    n_clusters: tuple[int, ...] = ()  # clusters per level, bottom up (empty: 2 levels, input/20 and input/100)
    sample_sizes: tuple[int, ...] = ()  # resampling sample size per level, 1 = none (empty: 10, then 3, ...)
    n_resamples: int = 10  # resampling rounds per level (each a fresh k-means++ k-means on the sample)
    resample_strategy: str = "closest"  # resampling sample: the points "closest" to each centroid or "random"
    n_iters: int = 50  # Lloyd iterations of every k-means (reference: 50, no early stop)
    fit_sample: int = 0  # fit level 1 on this many random points, then assign all (0: all points; for 100M+)
    target: int = 0  # images selected (0: half of the input)
    multiplier: int = 1  # times one image may be selected at most (the count is its manifest weight)
    leaf_strategy: str = "random"  # in a leaf cluster over its budget: "random" images or those "closest" to it
    device: str = "auto"  # k-means device: "auto" (cuda if available), "cpu", "cuda", ...

    def __post_init__(self) -> None:
        _check_choice("apply_to", self.apply_to, ("auto", "pool", "retrieved", "none"))
        _check_choice("resample_strategy", self.resample_strategy, ("closest", "random"))
        _check_choice("leaf_strategy", self.leaf_strategy, ("random", "closest"))
        _check_positive(self, "n_iters", "multiplier")
        if any(k < 1 for k in self.n_clusters) or any(r < 1 for r in self.sample_sizes):
            raise ConfigError("n_clusters and sample_sizes hold positive integers")
        if self.sample_sizes and len(self.sample_sizes) != len(self.n_clusters):
            raise ConfigError(f"sample_sizes has {len(self.sample_sizes)} values for {len(self.n_clusters)} levels")
        if self.n_resamples < 0 or self.fit_sample < 0 or self.target < 0:
            raise ConfigError("n_resamples, fit_sample and target must be >= 0")


@dataclass(frozen=True)
class CurateReportConfig:
    """Stage 5 (with the manifest): the report's pictures."""

    clusters: int = 6  # balanced clusters drawn as image rows in the report
    images_per_row: int = 8  # images per drawn cluster, duplicate group or retrieval example
    retrieval_examples: int = 4  # seed images shown with their retrieved neighbours, per seed set

    def __post_init__(self) -> None:
        if self.clusters < 0 or self.retrieval_examples < 0 or self.images_per_row < 2:
            raise ConfigError("clusters / retrieval_examples must be >= 0 and images_per_row >= 2")


@dataclass(frozen=True)
class CurateConfig:
    """`opendino curate`: a pretraining set from a raw image pool (embed, dedup, retrieve, balance, manifest)."""

    backbone: str  # preset name, checkpoint file, Hugging Face folder or opendino run directory
    pool: tuple[str, ...]  # the raw image pool: folders, .txt lists, manifests or tar shard patterns
    out: str  # output folder: one sub-folder per stage, manifest and report
    seeds: tuple[SeedSetConfig, ...] = ()  # curated seed sets (name, data, method, k, include); none: balance only
    stages: tuple[str, ...] = CURATE_STAGES  # stages to run, in pipeline order; an up-to-date stage is skipped
    force: bool = False  # rerun the listed stages even when their outputs are up to date
    seed: int = 0  # every random choice of the pipeline derives from it (k-means, sampling, report examples)
    manifest: str = "manifest.csv"  # manifest file name inside `out` (.csv, .tsv or .parquet)
    embed: CurateEmbedConfig = CurateEmbedConfig()  # stage 1
    dedup: CurateDedupConfig = CurateDedupConfig()  # stage 2
    retrieve: CurateRetrieveConfig = CurateRetrieveConfig()  # stage 3
    balance: CurateBalanceConfig = CurateBalanceConfig()  # stage 4
    report: CurateReportConfig = CurateReportConfig()  # stage 5

    def __post_init__(self) -> None:
        if not self.pool:
            raise ConfigError("pool: name at least one image source")
        for stage in self.stages:
            _check_choice("stages", stage, CURATE_STAGES)
        if list(self.stages) != sorted(set(self.stages), key=CURATE_STAGES.index):
            raise ConfigError(f"stages={list(self.stages)}: each at most once, in the order {list(CURATE_STAGES)}")
        names = [s.name for s in self.seeds]
        if len(set(names)) != len(names):
            raise ConfigError(f"seeds: names must be unique, got {names}")
        if not self.manifest.lower().endswith((".csv", ".tsv", ".parquet")) or "/" in self.manifest:
            raise ConfigError(f"manifest={self.manifest!r}: a file name ending in .csv, .tsv or .parquet")
        if self.balance.apply_to == "retrieved" and not self.seeds:
            raise ConfigError("balance.apply_to=retrieved needs seed sets (seeds: [...])")


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, kw_only=True)
class EvalCommon:
    """Settings every `opendino eval NAME` shares: the frozen backbone, where results go, how features are computed."""

    backbone: str  # preset name (random weights), checkpoint file, Hugging Face folder or opendino run directory
    out: str = ""  # folder for results.json, results.md and pictures ("" = runs/eval/<name>)
    cache_dir: str = "auto"  # feature cache ("auto" = $OPENDINO_CACHE or ~/.cache/opendino/features; "" = off)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    amp: str = "bf16"  # autocast dtype of the backbone on GPU: bf16, fp16 or none (CPU always runs fp32)
    batch_size: int = 64  # images per backbone forward pass
    num_workers: int = 4  # DataLoader decoding processes (0: decode in the main process)
    seed: int = 0  # seed of random initialisation (preset backbones), data splits, training and synthetic edits

    def __post_init__(self) -> None:
        _check_choice("amp", self.amp, _AMPS)
        _check_positive(self, "batch_size")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers}: must be >= 0")
        if not self.backbone:
            raise ConfigError("backbone: give a preset name, a checkpoint file or a run directory")


@dataclass(frozen=True, kw_only=True)
class FeaturesEvalConfig(EvalCommon):
    """`opendino eval features`: compute (and cache) the features the other evaluations use; reports throughput."""

    data: str  # image folder (recursive), .txt list or .csv with a `path` column
    resize_size: int = 256  # shorter side before the centre crop (official eval transform: 256)
    crop_size: int = 224  # centre crop, a multiple of the patch size (official: 224)
    outputs: tuple[str, ...] = ("cls",)  # any of cls, mean, cls_blocks, patch (see opendino.eval.features)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "resize_size", "crop_size")
        for name in self.outputs:
            _check_choice("outputs", name, ("cls", "mean", "cls_blocks", "patch"))


@dataclass(frozen=True, kw_only=True)
class KnnEvalConfig(EvalCommon):
    """`opendino eval knn`: weighted k-nearest-neighbour classification of CLS features (official protocol)."""

    train: str  # labelled training folder: <train>/<class>/<image>
    val: str  # labelled validation folder with the same class names
    ks: tuple[int, ...] = (10, 20, 100, 200)  # numbers of neighbours (official: 10, 20, 100, 200)
    temperature: float = 0.07  # softmax temperature of the neighbour weights (official: 0.07)
    resize_size: int = 256  # shorter side before the centre crop (official: 256)
    crop_size: int = 224  # centre crop (official: 224)
    chunk_size: int = 1024  # queries per similarity block
    train_chunk_size: int = 65536  # training features per similarity block (float32 chunk_size x this on device)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "temperature", "resize_size", "crop_size", "chunk_size", "train_chunk_size")
        if not self.ks or min(self.ks) <= 0:
            raise ConfigError(f"ks={list(self.ks)}: give one or more positive numbers of neighbours")


@dataclass(frozen=True, kw_only=True)
class LinearEvalConfig(EvalCommon):
    """`opendino eval linear`: linear probes on frozen features, the official grid trained at once."""

    _OFFICIAL_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)  # not a field

    train: str  # labelled training folder: <train>/<class>/<image>
    val: str  # labelled validation folder (official: the best head is picked on it)
    mode: str = "fast"  # fast: heads trained on cached centre-crop features; augment: official random crops + flips
    learning_rates: tuple[float, ...] = _OFFICIAL_LRS  # SGD rates of the grid (official: 13), x train_batch_size/256
    n_last_blocks: tuple[int, ...] = (1, 4)  # CLS tokens of the last n blocks, concatenated (official: 1 and 4)
    avgpool: tuple[bool, ...] = (False, True)  # also concatenate the mean patch token of the last block
    epochs: int = 10  # training epochs of epoch_length iterations (official: 10)
    epoch_length: int = 1250  # iterations per epoch (official: 1250)
    train_batch_size: int = 128  # images per linear-head step (official: 128 per GPU); lrs scale by it / 256
    val_fraction: float = 0.0  # > 0: pick the best head on this fraction of train instead of on val (then report val)
    resize_size: int = 256  # eval transform: shorter side before the centre crop (official: 256)
    crop_size: int = 224  # eval crop and train RandomResizedCrop size (official: 224)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("mode", self.mode, ("fast", "augment"))
        _check_positive(self, "epochs", "epoch_length", "train_batch_size", "resize_size", "crop_size")
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise ConfigError(f"learning_rates={list(self.learning_rates)}: give one or more positive rates")
        if not self.n_last_blocks or min(self.n_last_blocks) <= 0 or max(self.n_last_blocks) > 4:
            raise ConfigError(f"n_last_blocks={list(self.n_last_blocks)}: give one or more block counts in 1..4")
        if not self.avgpool:
            raise ConfigError("avgpool: give at least one of false, true")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction}: expected 0 <= value < 1")


@dataclass(frozen=True, kw_only=True)
class LogregEvalConfig(EvalCommon):
    """`opendino eval logreg`: L-BFGS logistic regression on CLS features over the official grid of C."""

    train: str  # labelled training folder: <train>/<class>/<image>
    val: str  # labelled validation folder with the same class names
    c_min_exp: float = -6.0  # C grid = 10 ** linspace(c_min_exp, c_max_exp, c_steps) (official: -6, 5, 45)
    c_max_exp: float = 5.0  # largest exponent of the C grid
    c_steps: int = 45  # number of C values
    holdout_fraction: float = 0.1  # part of train that picks C (official: 10%); the best C is then refit on all
    max_iter: int = 1000  # L-BFGS iterations per fit (official: 1000)
    tol: float = 1e-12  # L-BFGS tolerance (official: 1e-12)
    warm_start: bool = True  # start each fit from the previous C's solution (same optimum, fewer iterations)
    threads: int = 0  # BLAS / OpenMP threads of the fits (0 = the libraries' default; 1 is far faster on a busy CPU)
    resize_size: int = 224  # shorter side before the centre crop (official logreg: 224, unlike kNN / linear)
    crop_size: int = 224  # centre crop (official: 224)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "c_steps", "max_iter", "tol", "resize_size", "crop_size")
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads}: must be >= 0 (0 = the libraries' default)")
        if self.c_min_exp > self.c_max_exp:
            raise ConfigError(f"c_min_exp={self.c_min_exp} > c_max_exp={self.c_max_exp}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction={self.holdout_fraction}: expected 0 < value < 1")


@dataclass(frozen=True, kw_only=True)
class SegEvalConfig(EvalCommon):
    """`opendino eval seg`: linear semantic segmentation on frozen patch tokens ("linear" or "+ms")."""

    train: str  # folder with images/ and labels/ (label PNGs holding class indices, same file stems)
    val: str  # validation folder in the same layout (may be the train folder with other dirs / list)
    images_dir: tuple[str, ...] = ("images",)  # image sub-folder of train and val, or two: train's then val's
    labels_dir: tuple[str, ...] = ("labels",)  # label sub-folder of train and val, or two: train's then val's
    train_list: str = ""  # optional text file of train file stems (VOC: ImageSets/Segmentation/train.txt)
    val_list: str = ""  # optional text file of val file stems (relative paths: to the val folder if not found)
    reduce_zero_label: bool = False  # label 0 -> ignore_index, others -1 (ADE20K; done before everything else)
    variant: str = "linear"  # linear: BN + 1x1 conv on the last block; ms: on the last 4 blocks + multi-scale test
    num_classes: int = 0  # classes (0 = 1 + the largest label value found in train, ignore_index excluded)
    ignore_index: int = 255  # label value left out of the loss and the metrics (CamVid: 11)
    class_names: tuple[str, ...] = ()  # names for the table and pictures (default: class_0, class_1, ...)
    mode: str = "auto"  # fast: head on cached token maps (+ mirror); augment: official crops; auto: augment on GPU
    resize_size: int = 448  # shorter side at test and the base of random scaling (official: 512 linear, 640 ms)
    ratio_range: tuple[float, ...] = (0.5, 2.0)  # augment mode: random scale of resize_size (official ms: 1 3)
    crop_size: int = 448  # augment mode: training crop side in pixels (official: 512 linear, 640 ms)
    cat_max_ratio: float = 0.75  # augment mode: retry a crop where one class covers more (1 = off)
    cache_flips: bool = True  # fast mode: also store the token maps of horizontally flipped train images
    iterations: int = 4000  # training steps of the linear head (official: 40000)
    train_batch_size: int = 8  # crops per training step (official: 16)
    lr: float = 1e-3  # AdamW learning rate, poly decay after a linear warm-up
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_iterations: int = 150  # linear warm-up steps (official: 1500 of 40000)
    inference: str = "whole"  # whole: one pass per view; slide: crop_size windows, stride 2/3 of a window
    test_scales: tuple[float, ...] = (1.0, 1.32, 1.73, 2.28, 3.0)  # "ms" test-time scales (with flips)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("variant", self.variant, ("linear", "ms"))
        _check_choice("mode", self.mode, ("auto", "fast", "augment"))
        _check_choice("inference", self.inference, ("whole", "slide"))
        _check_positive(self, "resize_size", "crop_size", "iterations", "train_batch_size", "lr", "cat_max_ratio")
        if self.num_classes < 0 or self.warmup_iterations < 0 or self.weight_decay < 0:
            raise ConfigError("num_classes, warmup_iterations and weight_decay must be >= 0")
        if not self.test_scales or min(self.test_scales) <= 0:
            raise ConfigError(f"test_scales={list(self.test_scales)}: give one or more positive scales")
        if len(self.ratio_range) != 2 or not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ConfigError(f"ratio_range={list(self.ratio_range)}: give two positive values, low <= high")
        for name in ("images_dir", "labels_dir"):
            if len(getattr(self, name)) not in (1, 2):
                raise ConfigError(f"{name}={list(getattr(self, name))}: give one folder name, or two (train, val)")


@dataclass(frozen=True, kw_only=True)
class DepthEvalConfig(EvalCommon):
    """`opendino eval depth`: linear monocular depth over 256 depth bins on frozen tokens (paper "lin. 1 / 4")."""

    train: str  # folder with rgb/ and depth/ (depth maps as 16-bit PNG or .npy, same file stems)
    val: str  # validation folder in the same layout (may be the train folder for a sanity check)
    depth_scale: float = 1000.0  # stored value per metre (1000: millimetres in uint16 PNG; 1: metres in .npy)
    min_depth: float = 0.001  # smallest valid depth in metres (official: 0.001)
    max_depth: float = 10.0  # largest depth in metres: bin range and validity (NYU: 10, KITTI: 80)
    n_layers: int = 1  # 1: last block ("lin. 1"); 4: four evenly spaced blocks ("lin. 4")
    n_bins: int = 256  # uniform depth bins of the classification head (official: 256)
    image_size: int = 0  # shorter side fed to the backbone in pixels (0 = native); metrics stay at depth-map size
    train_mode: str = "cached"  # cached: tokens of whole images + mirrors computed once; online: crop/flip/jitter
    crop_size: int = 448  # online training crop side in pixels, a multiple of the patch size
    iterations: int = 2000  # training steps of the linear head
    train_batch_size: int = 4  # images (cached) or crops (online) per training step
    lr: float = 5e-3  # AdamW learning rate (cosine after a linear warm-up)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_iterations: int = 100  # linear learning-rate warm-up steps
    loss_warmup_iterations: int = 100  # first steps on SigLoss's warm-up form sqrt(0.15 mean(g)^2) (official: 100)
    flip_tta: bool = True  # average the predictions of each validation image and of its mirror (official)
    eval_crop: str = "none"  # evaluation mask: none, nyu (rows 45:471, cols 41:601 of 480x640) or kitti_garg
    pictures: int = 6  # validation images drawn in predictions.png (0 = none)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "depth_scale", "min_depth", "max_depth", "n_bins", "crop_size", "iterations")
        _check_positive(self, "train_batch_size", "lr")
        _check_choice("n_layers", str(self.n_layers), ("1", "4"))
        _check_choice("train_mode", self.train_mode, ("cached", "online"))
        _check_choice("eval_crop", self.eval_crop, ("none", "nyu", "kitti_garg"))
        if self.min_depth >= self.max_depth:
            raise ConfigError(f"min_depth={self.min_depth} must be < max_depth={self.max_depth}")
        for name in ("image_size", "weight_decay", "warmup_iterations", "loss_warmup_iterations", "pictures"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 0")


@dataclass(frozen=True, kw_only=True)
class RetrievalEvalConfig(EvalCommon):
    """`opendino eval retrieval`: instance retrieval by cosine similarity; mAP and recall@k (Revisited Oxford /
    Paris easy / medium / hard with junk images when given their ground truth)."""

    queries: str  # folder or .txt list of query images
    database: str  # folder or .txt list of database images
    ground_truth: str  # .json {query: {"positives": [...], "junk": [...]}} or a revisitop gnd_*.pkl file
    ks: tuple[int, ...] = (1, 5, 10)  # recall@k and precision@k cut-offs
    resize_size: int = 256  # shorter side before the centre crop
    crop_size: int = 224  # centre crop (0 = no crop: the whole image squashed to resize_size x resize_size)
    feature: str = "cls"  # descriptor: cls (CLS token) or gem (generalised-mean pooled patch tokens, p = 3)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("feature", self.feature, ("cls", "gem"))
        _check_positive(self, "resize_size")
        if not self.ks or min(self.ks) <= 0:
            raise ConfigError(f"ks={list(self.ks)}: give one or more positive cut-offs")
        if self.crop_size < 0:
            raise ConfigError(f"crop_size={self.crop_size}: must be >= 0")


_COPY_EDITS = (
    "crop", "rotate", "flip", "pad", "background", "color", "grayscale", "overlay_image", "emoji", "text", "blur",
    "pixelate", "jpeg",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class CopydetectEvalConfig(EvalCommon):
    """`opendino eval copydetect`: copy detection on a synthetic benchmark built from an image folder (strong edits
    of some references among distractors): micro average precision and recall@1."""

    images: str  # image folder (recursive) or .txt list: the references, queries and distractors come from it
    n_queries: int = 500  # edited copies of references used as queries
    n_distractor_queries: int = 500  # queries with no reference in the database (other images, edited too)
    resize_size: int = 256  # shorter side before the centre crop
    crop_size: int = 224  # centre crop
    k: int = 10  # neighbours kept per query (predictions pooled for micro-AP)
    edits: tuple[str, ...] = _COPY_EDITS  # edits drawn from for each query (empty: exact copies, a sanity check)
    min_edits: int = 2  # fewest edits composed per query
    max_edits: int = 4  # most edits composed per query (each query draws its number in min_edits..max_edits)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "n_queries", "resize_size", "crop_size", "k", "min_edits")
        if self.n_distractor_queries < 0:
            raise ConfigError(f"n_distractor_queries={self.n_distractor_queries}: must be >= 0")
        for name in self.edits:
            _check_choice("edits", name, _COPY_EDITS)
        if self.max_edits < self.min_edits:
            raise ConfigError(f"max_edits={self.max_edits} must be >= min_edits={self.min_edits}")


_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class RobustnessEvalConfig(EvalCommon):
    """`opendino eval robustness`: accuracy under ImageNet-C corruptions applied on the fly to a labelled validation
    folder, with mean corruption error (mCE) normalised by a baseline run."""

    train: str  # labelled training folder: the classifier is fitted on its clean features
    val: str  # labelled validation folder: corrupted on the fly
    classifier: str = "linear"  # linear (the best head of the fast linear protocol) or knn (k = 20)
    corruptions: tuple[str, ...] = _CORRUPTIONS  # ImageNet-C corruption names (default: the 15 of the benchmark)
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)  # severities 1-5
    baseline: str = ""  # earlier robustness results.json (or its folder), or alexnet: CE / mCE ("" = mean error)
    max_per_class: int = 0  # validation images per class (0 = all): a smaller, faster run
    resize_size: int = 256  # shorter side before the centre crop; corruptions act on the crop, as ImageNet-C
    crop_size: int = 224  # centre crop
    linear_epochs: int = 10  # classifier=linear: epochs of the fast linear protocol (official: 10)
    linear_epoch_length: int = 1250  # classifier=linear: iterations per epoch (official: 1250)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("classifier", self.classifier, ("linear", "knn"))
        for name in self.corruptions:
            _check_choice("corruptions", name, _CORRUPTIONS)
        if not self.corruptions or not self.severities:
            raise ConfigError("give at least one corruption and one severity")
        for s in self.severities:
            if not 1 <= s <= 5:
                raise ConfigError(f"severities: {s} is not in 1..5")
        if self.max_per_class < 0:
            raise ConfigError(f"max_per_class={self.max_per_class}: must be >= 0")
        _check_positive(self, "resize_size", "crop_size", "linear_epochs", "linear_epoch_length")


@dataclass(frozen=True)
class VizConfig:
    """`opendino viz KIND`: pictures of a backbone's patch features (PCA, foreground, matches, attention) and of the
    depth / segmentation heads trained by `opendino eval depth` / `opendino eval seg`."""

    KINDS = ("pca", "foreground", "match", "attention", "depth", "seg")  # not a field

    kind: str  # what to draw: pca, foreground, match, attention, depth or seg
    backbone: str  # preset name (random weights, seeded), checkpoint file, Hugging Face folder or opendino run folder
    images: tuple[str, ...]  # image files or folders of images (match: exactly two images)
    out: str = "runs/viz"  # output folder for the PNGs, masks and viz.json
    image_size: int = 0  # shorter side fed to the backbone, a multiple of the patch (0: 448; depth / seg: the head's)
    threshold: float = 0.0  # foreground: first-component score above this many standard deviations (paper: 0)
    keep_background: bool = False  # pca / match: use every patch (no foreground split)
    per_image: bool = False  # pca / foreground: one PCA per image instead of one over all the images together
    matches: int = 40  # match: lines drawn (the most similar mutual nearest neighbours)
    block: int = -1  # attention: the block whose attention is drawn (negative: counted from the end)
    head: str = ""  # depth / seg: the --out folder of `opendino eval depth` / `eval seg` (holds head.safetensors)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    seed: int = 0  # seed of the random weights of a preset backbone

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, self.KINDS)
        if not self.backbone:
            raise ConfigError("backbone: give a preset name, a checkpoint file or a run directory")
        if not self.images:
            raise ConfigError("images: give one or more image files or folders")
        if self.image_size < 0 or not math.isfinite(self.threshold):
            raise ConfigError(f"image_size={self.image_size} must be >= 0 and threshold={self.threshold} finite")
        _check_positive(self, "matches")
        if self.kind in ("depth", "seg") and not self.head:
            raise ConfigError(f"kind={self.kind} needs head: the output folder of `opendino eval {self.kind}`")


@dataclass(frozen=True)
class DemoConfig:
    """`opendino demo`: a local web page showing a backbone's PCA, foreground, attention, patch similarity and matches
    (and depth / segmentation with heads from `opendino eval depth` / `opendino eval seg`) on uploaded images."""

    backbone: str  # preset name (random weights, seeded), checkpoint file, Hugging Face folder or opendino run folder
    host: str = "127.0.0.1"  # address to listen on (127.0.0.1: this machine only; 0.0.0.0: every network interface)
    port: int = 7860  # TCP port of the page: http://HOST:PORT/
    depth_head: str = ""  # the --out folder of `opendino eval depth` (adds the depth view; "" = none)
    seg_head: str = ""  # the --out folder of `opendino eval seg` (adds the segmentation view; "" = none)
    image_size: int = 448  # shorter side fed to the backbone, a multiple of the patch size (bigger: finer, slower)
    threshold: float = 0.0  # default foreground threshold: first-component score in standard deviations (paper: 0)
    matches: int = 40  # default number of match lines between two images
    max_upload_mb: float = 20.0  # largest request accepted, in MiB (larger uploads get HTTP 413)
    max_pixels: int = 40_000_000  # largest decoded image (width x height) accepted; larger ones are refused
    feature_cache: int = 16  # images whose patch features stay in memory, so similarity clicks reuse them (0 = off)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    seed: int = 0  # seed of the random weights of a preset backbone

    def __post_init__(self) -> None:
        if not self.backbone:
            raise ConfigError("backbone: give a preset name, a checkpoint file or a run directory")
        if not self.host:
            raise ConfigError("host: give an address to listen on, e.g. 127.0.0.1")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port={self.port}: expected 1 to 65535")
        _check_positive(self, "image_size", "matches", "max_upload_mb", "max_pixels")
        if self.feature_cache < 0 or not math.isfinite(self.threshold):
            raise ConfigError(f"feature_cache={self.feature_cache} must be >= 0 and threshold={self.threshold} finite")


EVAL_CONFIGS: dict[str, type] = {
    "features": FeaturesEvalConfig,
    "knn": KnnEvalConfig,
    "linear": LinearEvalConfig,
    "logreg": LogregEvalConfig,
    "seg": SegEvalConfig,
    "depth": DepthEvalConfig,
    "retrieval": RetrievalEvalConfig,
    "copydetect": CopydetectEvalConfig,
    "robustness": RobustnessEvalConfig,
}


def global_batch_size(cfg: TrainConfig, world_size: int) -> int:
    """Images per optimisation step over all processes."""
    return cfg.data.batch_size_per_gpu * world_size


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    """The learning rate used: `optim.lr` when set, else `base_lr` scaled by the official rule (utils/config.py:25)."""
    if cfg.optim.lr > 0:
        return cfg.optim.lr
    if cfg.optim.scaling_rule == "none":
        return cfg.optim.base_lr
    return cfg.optim.base_lr * math.sqrt(global_batch_size(cfg, world_size) / 1024.0)


def total_iterations(cfg: TrainConfig) -> int:
    """Length of the schedules in iterations."""
    return cfg.schedules.epochs * cfg.schedules.epoch_length


def run_iterations(cfg: TrainConfig) -> int:
    """Iterations this run performs: the schedule length, or `run.max_steps` when smaller and set."""
    total = total_iterations(cfg)
    return min(total, cfg.run.max_steps) if cfg.run.max_steps else total


# ---------------------------------------------------------------------------------------------- loading
def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """["a.b=1", "c=[2, 3]"] -> nested {"a": {"b": 1}, "c": [2, 3]}; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=0.001)")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is set both as a value and as a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, Mapping) and isinstance(merged.get(k), dict) else v
    return merged


def load(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping = (),
    *,
    base: Mapping[str, Any] | None = None,
) -> T:
    """Build `schema` from `base` (a nested mapping, e.g. a preset), a YAML file over it (optional) and overrides
    (["k=v", ...] or a nested mapping) over both."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the config ({e})") from e
        if not isinstance(loaded, dict | None):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data = _merge(data, loaded or {})
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return _build(schema, _merge(data, extra), prefix="")


def _build(schema: type[T], data: Mapping[str, Any], prefix: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {prefix + near[0]!r}?" if near else f"; known keys: {sorted(fields)}"
            raise ConfigError(f"unknown key {prefix + str(key)!r}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {prefix + name!r}")
    try:
        return schema(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}" if prefix else str(e)) from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check (and minimally convert: int -> float, list -> tuple) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in (o for o in options if o is not type(None)):
            try:
                return _coerce(opt, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r}: matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.")  # type: ignore[arg-type]
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r}: expected a list")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}={value!r}: expected {len(args)} values")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(f"{key}={value!r}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data (tuples become lists), for YAML / JSON output."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


@functools.cache
def _own_field_docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=#]+(?:=[^#]*)?#\s*(.+)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def field_docs(schema: type) -> dict[str, str]:
    """{field: its trailing comment} read from the schema's source: the one place a field is documented."""
    docs: dict[str, str] = {}
    for cls in reversed([c for c in schema.__mro__ if dataclasses.is_dataclass(c)]):  # base classes first
        docs.update(_own_field_docs(cls))
    return docs


def dump_yaml(cfg: Any, header: str = "") -> str:
    """`cfg` as YAML with every key commented by its field documentation (nested dataclasses become sections).

    `load(type(cfg), <this text>)` gives back an equal config.
    """
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()] if header.strip() else []

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):  # an item of a list of sections (e.g. curation seed sets): a flow mapping
            return to_dict(v)
        return [plain(x) for x in v] if isinstance(v, tuple | list) else v

    def scalar(v: Any) -> str:
        # the whole value in one flow-style dump, so that items are quoted for the flow context ("{", ",", "[")
        return yaml.safe_dump(plain(v), default_flow_style=True, width=10_000).strip().removesuffix("...").strip()

    def emit(obj: Any, indent: str) -> None:
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                doc = (type(value).__doc__ or "").strip().splitlines()[0]
                lines.append(f"{indent}{f.name}:  # {doc}" if doc else f"{indent}{f.name}:")
                emit(value, indent + "  ")
            else:
                comment = docs.get(f.name, "")
                lines.append(f"{indent}{f.name}: {scalar(value)}" + (f"  # {comment}" if comment else ""))

    if lines:
        lines.append("")
    emit(cfg, "")
    return "\n".join(lines) + "\n"
