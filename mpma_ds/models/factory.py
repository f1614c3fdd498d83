"""Named MPMA architectures (data, not code) and the `create_model` / `list_models` factory."""

from __future__ import annotations

from typing import Any

from mpma_ds.models.config import MPMAConfig, check_known_fields
from mpma_ds.models.mpma import MPMA
from mpma_ds.models.registry import MODELS, register_architecture

# Each architecture is a set of overrides of the `MPMAConfig` defaults (which are `mpma_base`).
_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # Paper scale (M3AE's setting): ViT-B/16 at 288 px, RoBERTa-base-sized text encoder, 6 MA-CMF layers
    # at 768, MAE decoder 512 wide x 4 blocks.
    "mpma_base": {},
    # A CPU-benchmarkable middle size: ViT-S/16-like at 224 px, a MiniLM-sized BERT.
    "mpma_small": dict(
        image_size=224,
        vision_width=384,
        vision_layers=6,
        vision_heads=6,
        text_arch="bert",
        vocab_size=30522,
        text_width=384,
        text_layers=6,
        text_heads=6,
        max_text_len=128,
        fusion_width=384,
        fusion_layers=3,
        fusion_heads=6,
        memory_slots=128,
        memory_topk=16,
        decoder_width=256,
        decoder_layers=2,
        decoder_heads=8,
        embed_dim=256,
    ),
    # Trains at several steps/s on 2 CPU cores; expects a tokenizer of <= 4096 tokens
    # (`data_tools.train_tokenizer --vocab-size 4096`).
    "mpma_tiny": dict(
        image_size=128,
        patch_size=16,
        vision_width=128,
        vision_layers=2,
        vision_heads=4,
        text_arch="bert",
        vocab_size=4096,
        text_width=128,
        text_layers=2,
        text_heads=4,
        max_text_len=64,
        fusion_width=128,
        fusion_layers=2,
        fusion_heads=4,
        memory_slots=32,
        memory_topk=8,
        decoder_width=128,
        decoder_layers=1,
        decoder_heads=4,
        embed_dim=128,
    ),
}
# The M3AE ablation of each size: plain co-attention, no memory.
_ARCHITECTURES.update({f"{k}_nomem": {**v, "memory_slots": 0} for k, v in list(_ARCHITECTURES.items())})


for _name, _overrides in _ARCHITECTURES.items():
    register_architecture(_name, **_overrides)


def list_models() -> list[str]:
    """Names accepted by `create_model` (plugins' architectures included)."""
    return sorted(MODELS.names())


def get_model_config(name: str, **overrides: Any) -> MPMAConfig:
    """The `MPMAConfig` of architecture `name` with `overrides` applied (unknown keys are an error)."""
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; choose one of {list_models()}")
    check_known_fields(overrides, context=f"{name} override")
    return MPMAConfig(**{**MODELS[name], **overrides})


def create_model(name: str, **overrides: Any) -> MPMA:
    """Build architecture `name` (see `list_models()`), e.g. `create_model("mpma_tiny", vocab_size=8000)`."""
    return MPMA(get_model_config(name, **overrides))
