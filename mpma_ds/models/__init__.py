"""The MPMA model: plain PyTorch on timm + transformers (never imports deepspeed, mlflow or DALI)."""

from mpma_ds.models.config import MPMAConfig
from mpma_ds.models.factory import create_model, get_model_config, list_models
from mpma_ds.models.mpma import MPMA
from mpma_ds.models.text_encoder import check_tokenizer_vocab

__all__ = ["MPMA", "MPMAConfig", "check_tokenizer_vocab", "create_model", "get_model_config", "list_models"]
