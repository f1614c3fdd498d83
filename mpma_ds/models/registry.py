"""The model registries: named architectures (data) and image towers (code), each registered where it is defined.

- ``MODELS``: architecture name -> its ``MPMAConfig`` overrides of the ``mpma_base`` defaults
  (``register_architecture("mpma_tiny", image_size=128, ...)``); ``create_model(name)`` builds one.
- ``IMAGE_ENCODERS``: ``MPMAConfig.image_arch`` -> a builder ``(cfg) -> nn.Module`` whose forward takes
  ``(images, ids_keep=None)`` and returns ``(B, 1+K, vision_width)`` tokens (a pooled/[CLS] token first), with
  ``blocks`` (its repeated blocks), ``block_checkpointing`` and ``set_attn_impl``; the ViT is ``vit``.
- ``LOCAL_LOSSES``: ``MPMAConfig.local_loss`` -> an ``nn.Module`` class built as ``(init_temperature, max_scale,
  kernel_impl=...)`` whose forward ``(tokens, token_valid, patches, valid=None)`` returns the local alignment loss
  (``late_interaction``: `losses.LocalAlignmentLoss`; ``gloria``: `gloria.GloriaLocalLoss`).

Another package adds either through the ``mpma_ds.models`` entry-point group (importing its module registers).
"""

from __future__ import annotations

from typing import Any

from data_tools.registry import Registry

__all__ = ["IMAGE_ENCODERS", "LOCAL_LOSSES", "MODELS", "register_architecture"]

MODELS: Registry[dict[str, Any]] = Registry("model", "mpma_ds.models", builtins=("mpma_ds.models.factory",))
"""Named architectures: name -> ``MPMAConfig`` overrides."""

IMAGE_ENCODERS: Registry = Registry("image encoder", "mpma_ds.models", builtins=("mpma_ds.models.image_encoder",))
"""Image towers by ``MPMAConfig.image_arch``."""

LOCAL_LOSSES: Registry = Registry(
    "local alignment loss", "mpma_ds.models", builtins=("mpma_ds.models.losses", "mpma_ds.models.gloria")
)
"""Local alignment losses by ``MPMAConfig.local_loss``."""


def register_architecture(name: str, **overrides: Any) -> None:
    """Register architecture ``name`` as ``MPMAConfig`` overrides (checked when it is built)."""
    MODELS.add(name, dict(overrides))
