"""`MPMAConfig`: every architectural choice of MPMA as one typed, validated dataclass.

SPEC §5 is "our reading" of the MPMA paper; each choice the paper may make differently is a field here,
documented by the string under it (litgpt style). Named architectures (`mpma_base`, ...) are overrides of
these defaults and live in `mpma_ds.models.factory`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Literal

from mpma_ds.config import ConfigSection, build
from mpma_ds.models.registry import IMAGE_ENCODERS, LOCAL_LOSSES

TEXT_ARCHS = ("bert", "roberta")
ATTN_IMPLS = ("auto", "sdpa", "eager")
PATCH_STEMS = ("linear", "conv")
ALIGN_ON = ("masked", "full", "full_image")
GLOBAL_POOLS = ("mean", "cls")
MEMORY_KV = ("concat", "gated_sum")
KERNEL_IMPLS = ("auto", "reference", "chunked", "triton")


@dataclass
class MPMAConfig(ConfigSection):
    """Architecture, loss and efficiency settings of one MPMA model (defaults = `mpma_base`)."""

    # ---------------------------------------------------------------- image encoder (timm ViT)
    image_size: int = 288
    """Square input image side in pixels; must be divisible by `patch_size`. Other sizes still run
    (position embeddings are interpolated), this is the size the position table is built for."""
    patch_size: int = 16
    """ViT patch side in pixels."""
    in_chans: int = 1
    """Image channels: 1 (grayscale shards, the default) or 3."""
    image_arch: str = "vit"
    """The image tower, a name registered in ``mpma_ds.models.registry.IMAGE_ENCODERS``: ``vit`` (MPMA's masked
    ViT) or one a plugin registers (``mpma_ds.models`` entry points)."""

    patch_stem: Literal["linear", "conv"] = "linear"
    """How pixels become patch tokens: "linear" = the ViT's one `patch_size`-strided projection (ViT, M3AE);
    "conv" = a stack of stride-2 3x3 convolutions (GroupNorm + GELU) down to the patch grid, then a 1x1
    projection (Xiao et al. 2021, "Early convolutions help transformers see better"). The stem sees across
    patch borders, so in the masked pass the pixels of masked patches are zeroed before it (nothing of them
    leaks into the visible tokens, as ConvMAE masks its convolutions). "conv" is what makes a 2-layer ViT
    trained from scratch on a few thousand films see findings of one or two patches (`mpma_tiny`, docs/model.md);
    `patch_size` must then be a power of two >= 4. The exported timm folder names the registered architecture
    `mpma_vit_conv_stem` (`import mpma_ds` registers it)."""
    vision_width: int = 768
    """ViT embedding width."""
    vision_layers: int = 12
    """ViT depth (transformer blocks)."""
    vision_heads: int = 12
    """ViT attention heads; must divide `vision_width`."""
    vision_mlp_ratio: float = 4.0
    """ViT MLP hidden width / embedding width."""
    image_mask_ratio: float = 0.75
    """Fraction of image patches masked per sample (MAE); the keep count is exactly
    `int(num_patches * (1 - ratio))`, at least 1."""
    image_init_from: str | None = None
    """Optional timm checkpoint to initialise the ViT from: a timm `local-dir` folder (config.json +
    model.safetensors) or a `.safetensors` file. 3-channel weights loaded into a 1-channel model have
    their patch-embedding weights summed over channels; position embeddings are resized."""

    # ---------------------------------------------------------------- text encoder (transformers)
    text_arch: Literal["bert", "roberta"] = "roberta"
    """`transformers` encoder family: "bert" (`BertModel`) or "roberta" (`RobertaModel`)."""
    vocab_size: int = 50265
    """Text vocabulary size; must be >= the tokenizer's (`check_tokenizer_vocab`)."""
    text_width: int = 768
    """Text encoder hidden size."""
    text_layers: int = 12
    """Text encoder depth."""
    text_heads: int = 12
    """Text encoder attention heads; must divide `text_width`."""
    text_mlp_ratio: float = 4.0
    """Text encoder intermediate size / hidden size."""
    max_text_len: int = 128
    """Longest token sequence (including [CLS]/[SEP]) the position table holds."""
    pad_token_id: int = 0
    """The tokenizer's padding id (our WordPiece tokenizer and BERT-style ones use 0)."""
    text_init_from: str | None = None
    """Optional local Hugging Face model folder to initialise the text encoder from (e.g. a MiniLM or
    RoBERTa folder). When set, the text fields above are taken from that folder's config.json."""

    # ---------------------------------------------------------------- MA-CMF fusion
    fusion_width: int = 768
    """Width of the fusion layers; unimodal features are projected to it."""
    fusion_layers: int = 6
    """Number of MA-CMF co-attention layers."""
    fusion_heads: int = 12
    """Fusion attention heads; must divide `fusion_width`."""
    fusion_mlp_ratio: float = 4.0
    """Fusion FFN hidden width / fusion width."""
    memory_slots: int = 256
    """Learned memory vectors per fusion layer (our reading: one memory per layer). 0 turns the memory
    off: plain co-attention, the M3AE ablation."""
    memory_topk: int = 32
    """Each visual query attends only to its `memory_topk` highest-scoring memory slots."""
    memory_kv: Literal["concat", "gated_sum"] = "concat"
    """How the text stream's cross-attention keys/values combine visual features V with their memory
    responses R (our reading): "concat" = the sequence [V ; g*R] with a learned sigmoid gate
    g = sigma(W[V;R]) (2N keys), "gated_sum" = g*V + (1-g)*R (N keys)."""

    # ---------------------------------------------------------------- heads
    decoder_width: int = 512
    """MAE decoder width."""
    decoder_layers: int = 4
    """MAE decoder depth."""
    decoder_heads: int = 16
    """MAE decoder attention heads; must divide `decoder_width`."""
    norm_pix_loss: bool = True
    """MIM targets are per-patch normalised pixels (MAE `norm_pix_loss`)."""
    tie_mlm_weights: bool = True
    """The MLM output projection shares the text encoder's word-embedding matrix."""
    embed_dim: int = 256
    """Width of the normalised GLA embeddings (`encode_image` / `encode_text` output)."""

    # ---------------------------------------------------------------- GLA alignment
    align_on: Literal["masked", "full", "full_image"] = "masked"
    """Which unimodal features GLA aligns: "masked" = those of the masked pass (no extra cost),
    "full" = an extra pass of both encoders on the unmasked image and report, "full_image" = an extra pass of
    the image encoder only: the unmasked image against the report's features of the masked pass (its [MASK]
    tokens are left out of the local term anyway, `local_exclude_masked_tokens`); saves the second text pass."""
    global_pool: Literal["mean", "cls"] = "mean"
    """How the pooled features of the global loss and `encode_image`/`encode_text` are taken: "mean" =
    mean over the (visible) patch tokens and the attended report tokens, "cls" = the [CLS] token.
    "mean" because encoders trained from scratch give nearly the same [CLS] output for every input at
    initialisation (cosine ~0.9999), and the global InfoNCE then collapses to ln B instead of learning;
    "cls" is the M3AE choice for encoders initialised from pretrained weights."""
    init_temperature: float = 0.07
    """Initial softmax temperature of both InfoNCE losses (learnable, as a log-scale)."""
    max_logit_scale: float = 100.0
    """Upper clamp of the learnable logit scale 1/temperature (CLIP)."""
    local_loss: str = "late_interaction"
    """The local alignment term, a name registered in ``mpma_ds.models.registry.LOCAL_LOSSES``:
    "late_interaction" = token-patch late interaction (FILIP-like, SPEC §5: mean over tokens of the max cosine over
    patches and back), "gloria" = GLoRIA's attention-weighted local loss (each word attends over the patches,
    the attention-weighted context is matched to the word, the matches are aggregated per pair by a
    log-sum-exp; `mpma_ds.models.gloria`)."""
    local_exclude_masked_tokens: bool = True
    """Local alignment ignores [MASK]ed report tokens (they carry no word), besides [CLS]/[SEP]/padding."""

    # ---------------------------------------------------------------- loss weights
    w_mlm: float = 1.0
    """Weight of the masked-token loss."""
    w_mim: float = 1.0
    """Weight of the masked-patch reconstruction loss."""
    w_global: float = 1.0
    """Weight of the global image-report InfoNCE (ITC)."""
    w_local: float = 1.0
    """Weight of the local token-patch InfoNCE."""
    w_itm: float = 0.0
    """Weight of the optional image-text matching loss (0 = off: no ITM head, no extra fusion pass).
    Negatives: each image paired with the next sample's report in the batch."""

    # ---------------------------------------------------------------- regularisation / init
    dropout: float = 0.0
    """Dropout in the text encoder and fusion layers (MAE-style ViT/decoder use none)."""
    drop_path: float = 0.0
    """Stochastic depth rate of the ViT."""

    # ---------------------------------------------------------------- efficiency switches
    attn_impl: Literal["auto", "sdpa", "eager"] = "auto"
    """Attention kernel everywhere: "sdpa" (`torch.nn.functional.scaled_dot_product_attention`), "eager"
    (explicit softmax(QK^T)V) or "auto": SDPA on CUDA, eager on CPU, following the device the model is moved to
    (`MPMA.set_attn_impl`). On CPU SDPA's flash kernel is slower than the explicit matmuls at MPMA's sequence
    lengths (64-325 tokens; docs/model.md, "Step cost"). Same values to rounding."""
    encoder_visible_only: bool = True
    """The ViT runs on visible patches only (MAE). False: it runs on all patches and the visible ones
    are picked afterwards (baseline; more compute, slightly different numbers)."""
    mlm_masked_only: bool = True
    """The MLM head (vocab projection) runs only at masked positions. False: on every position, the
    loss then ignores unmasked ones (same value, the baseline)."""
    mim_masked_only: bool = True
    """The MAE prediction layer runs only on masked patches. False: on all patches (same loss)."""
    grad_checkpointing: bool = False
    """Activation checkpointing per transformer block (non-reentrant); `set_grad_checkpointing` flips it. Off by
    default: recomputing every block's forward costs about a third more step time, and memory needs it only at
    scale (``recipes/pretrain_base.yaml`` turns it on for its GPU batch; ``train.grad_checkpointing``)."""
    kernel_impl: Literal["auto", "reference", "chunked", "triton"] = "auto"
    """Implementation of the local late-interaction scores and the MLM cross-entropy (`mpma_ds.kernels`):
    "auto" = fused Triton kernels on CUDA, the memory-bounded chunked PyTorch path elsewhere; "reference" =
    the plain PyTorch definition (the whole (B, B, L, K) similarity, the whole (M, V) logits); "chunked";
    "triton" (on CPU only under TRITON_INTERPRET=1). Same values to rounding, different memory and speed."""

    def validate(self) -> None:
        errors = []
        if self.image_size % self.patch_size:
            errors.append(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        for width, heads in (
            ("vision_width", "vision_heads"),
            ("text_width", "text_heads"),
            ("fusion_width", "fusion_heads"),
            ("decoder_width", "decoder_heads"),
        ):
            w, h = getattr(self, width), getattr(self, heads)
            if h <= 0 or w % h:
                errors.append(f"{width} {w} is not divisible by {heads} {h}")
        if self.image_arch not in IMAGE_ENCODERS:
            errors.append(f"image_arch {self.image_arch!r} is not an image encoder; {IMAGE_ENCODERS.describe()}")
        if self.patch_stem not in PATCH_STEMS:
            errors.append(f"patch_stem must be one of {', '.join(PATCH_STEMS)}, got {self.patch_stem!r}")
        elif self.patch_stem == "conv" and (self.patch_size < 4 or self.patch_size & (self.patch_size - 1)):
            errors.append(f"patch_stem 'conv' needs a power-of-two patch_size >= 4, got {self.patch_size}")
        if self.in_chans not in (1, 3):
            errors.append(f"in_chans must be 1 or 3, got {self.in_chans}")
        if not 0.0 <= self.image_mask_ratio < 1.0:
            errors.append(f"image_mask_ratio must be in [0, 1), got {self.image_mask_ratio}")
        if self.decoder_width % 4:
            errors.append(f"decoder_width {self.decoder_width} must be divisible by 4 (2-D sin-cos positions)")
        if self.attn_impl not in ATTN_IMPLS:
            errors.append(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {self.attn_impl!r}")
        if self.align_on not in ALIGN_ON:
            errors.append(f"align_on must be one of {', '.join(ALIGN_ON)}, got {self.align_on!r}")
        if self.local_loss not in LOCAL_LOSSES:
            errors.append(
                f"local_loss {self.local_loss!r} is not a local alignment loss; {LOCAL_LOSSES.describe()}"
            )
        if self.kernel_impl not in KERNEL_IMPLS:
            errors.append(f"kernel_impl must be one of {', '.join(KERNEL_IMPLS)}, got {self.kernel_impl!r}")
        if self.memory_slots < 0:
            errors.append(f"memory_slots must be >= 0, got {self.memory_slots}")
        if self.memory_slots > 0 and not 1 <= self.memory_topk <= self.memory_slots:
            errors.append(f"memory_topk must be in [1, memory_slots={self.memory_slots}], got {self.memory_topk}")
        positive = ("patch_size", "image_size", "vision_layers", "vocab_size", "text_layers", "max_text_len")
        positive += ("fusion_layers", "decoder_layers", "embed_dim")
        errors += [f"{n} must be > 0, got {getattr(self, n)}" for n in positive if getattr(self, n) <= 0]
        weights = ("w_mlm", "w_mim", "w_global", "w_local", "w_itm")
        errors += [f"{n} must be >= 0, got {getattr(self, n)}" for n in weights if getattr(self, n) < 0]
        if not 0.0 < self.init_temperature <= 1.0:
            errors.append(f"init_temperature must be in (0, 1], got {self.init_temperature}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.drop_path < 1.0:
            errors.append("dropout and drop_path must be in [0, 1)")
        if errors:
            raise ValueError("invalid MPMAConfig: " + "; ".join(errors))

    # ------------------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """Patches per image side at `image_size`."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def num_visible(self, num_patches: int | None = None) -> int:
        """Exact number of patches kept per sample for `num_patches` patches (default: at `image_size`)."""
        n = self.num_patches if num_patches is None else num_patches
        return max(1, int(n * (1.0 - self.image_mask_ratio)))

    @property
    def build_attn_impl(self) -> str:
        """The attention the sub-modules are built with: `attn_impl`, with "auto" as "eager" (a model is built on
        the CPU; `MPMA` re-decides "auto" whenever it is moved, `MPMA.set_attn_impl`)."""
        return "eager" if self.attn_impl == "auto" else self.attn_impl

    @property
    def init_logit_scale(self) -> float:
        return math.log(1.0 / self.init_temperature)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, context: str | None = None) -> MPMAConfig:
        """Build from a dict (a saved ``config.json``); an unknown key is an error naming it (and ``context``)."""
        return build(cls, values, source=context)

    def replace(self, **overrides: Any) -> MPMAConfig:
        """A copy with `overrides` applied (unknown keys are an error naming the key)."""
        return build(type(self), {**self.to_dict(), **overrides})

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the parameters' names and shapes (and the loss they were trained for): what a
        checkpoint must agree with to be loaded. Efficiency switches and init sources are left out."""
        return {k: v for k, v in self.to_dict().items() if k not in EFFICIENCY_FIELDS}


# Fields that change the computation but not the parameters: weights load across them.
EFFICIENCY_FIELDS = frozenset(
    {
        "grad_checkpointing",
        "attn_impl",
        "encoder_visible_only",
        "mlm_masked_only",
        "mim_masked_only",
        "kernel_impl",
        "image_init_from",
        "text_init_from",
    }
)


def architecture_difference(saved: dict[str, Any], config: MPMAConfig) -> list[str]:
    """Architecture fields in which ``saved`` (an ``architecture()`` dict read back from JSON) and ``config``
    differ; fields ``saved`` does not hold are not compared (older files)."""
    mine = config.architecture()

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    return sorted(k for k, v in saved.items() if k in mine and plain(mine[k]) != plain(v))


def check_same_architecture(saved: dict[str, Any] | None, config: MPMAConfig, *, where: str, fix: str) -> None:
    """Raise ``ValueError`` (one line: ``where`` holds another architecture, which fields, ``fix``) when the
    architecture recorded in ``saved`` differs from ``config``'s. ``None`` / empty: nothing to compare."""
    if not saved:
        return
    differ = architecture_difference(saved, config)
    if differ:
        shown = ", ".join(f"{k}={saved[k]!r} (here {config.architecture()[k]!r})" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ValueError(f"{where} holds another architecture: {shown}{more}; {fix}")


def field_names() -> list[str]:
    return [f.name for f in fields(MPMAConfig)]


def check_known_fields(values: dict[str, Any], *, context: str = "MPMAConfig") -> None:
    """Raise ValueError naming every key of `values` that is not an `MPMAConfig` field."""
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ValueError(
            f"unknown {context} key(s) {unknown}; valid MPMAConfig fields are: {', '.join(field_names())}"
        )
