"""Text encoder: a `transformers` BERT/RoBERTa encoder built from `MPMAConfig` or a local folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from transformers import AutoModel, BertConfig, BertModel, PreTrainedModel, RobertaConfig, RobertaModel

from mpma_ds.models.config import MPMAConfig

_ARCH_CLASSES = {"bert": (BertConfig, BertModel), "roberta": (RobertaConfig, RobertaModel)}


def text_hf_config(cfg: MPMAConfig) -> BertConfig | RobertaConfig:
    """The `transformers` config of the text encoder described by `cfg`."""
    config_cls, _ = _ARCH_CLASSES[cfg.text_arch]
    # RoBERTa numbers positions from pad_token_id + 1, so its table needs two extra rows.
    extra_positions = cfg.pad_token_id + 1 if cfg.text_arch == "roberta" else 0
    return config_cls(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.text_width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        intermediate_size=int(cfg.text_width * cfg.text_mlp_ratio),
        max_position_embeddings=cfg.max_text_len + extra_positions,
        pad_token_id=cfg.pad_token_id,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        type_vocab_size=2 if cfg.text_arch == "bert" else 1,
    )


def text_fields_from_folder(folder: str | Path) -> dict[str, Any]:
    """Read a local HF model folder's config.json into the `MPMAConfig` text fields it determines."""
    path = Path(folder)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"text_init_from={folder}: no config.json there; give a local HF model folder")
    hf = json.loads(cfg_file.read_text())
    model_type = hf.get("model_type")
    if model_type not in _ARCH_CLASSES:
        raise ValueError(
            f"text_init_from={folder}: model_type {model_type!r} is not supported; use a BERT or RoBERTa folder"
        )
    pad = int(hf.get("pad_token_id") or 0)
    max_len = int(hf["max_position_embeddings"]) - (pad + 1 if model_type == "roberta" else 0)
    return {
        "text_arch": model_type,
        "vocab_size": int(hf["vocab_size"]),
        "text_width": int(hf["hidden_size"]),
        "text_layers": int(hf["num_hidden_layers"]),
        "text_heads": int(hf["num_attention_heads"]),
        "text_mlp_ratio": float(hf["intermediate_size"]) / float(hf["hidden_size"]),
        "max_text_len": max_len,
        "pad_token_id": pad,
    }


def resolve_text_init(cfg: MPMAConfig) -> MPMAConfig:
    """When `cfg.text_init_from` is set, take the text architecture fields from that folder."""
    if not cfg.text_init_from:
        return cfg
    return dataclasses.replace(cfg, **text_fields_from_folder(cfg.text_init_from))


def build_text_encoder(cfg: MPMAConfig) -> PreTrainedModel:
    """A pooler-less BERT/RoBERTa encoder, random or loaded from `cfg.text_init_from`."""
    _, model_cls = _ARCH_CLASSES[cfg.text_arch]
    if cfg.text_init_from:
        model = AutoModel.from_pretrained(
            cfg.text_init_from,
            add_pooling_layer=False,
            local_files_only=True,
            attn_implementation=cfg.build_attn_impl,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
        )
        if not isinstance(model, model_cls):
            raise ValueError(f"text_init_from={cfg.text_init_from} built {type(model).__name__}, not {model_cls}")
        return model
    return model_cls._from_config(
        text_hf_config(cfg), attn_implementation=cfg.build_attn_impl, add_pooling_layer=False
    )


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Number of distinct ids the tokenizer can emit (base vocabulary + added tokens)."""
    return len(tokenizer)


def check_tokenizer_vocab(model_config_or_model: Any, tokenizer: Any) -> None:
    """Raise ValueError when the tokenizer can emit ids the model's embedding table does not hold.

    Args:
        model_config_or_model: an `MPMAConfig` or a model with a `.config` that is one.
        tokenizer: a `transformers` tokenizer (anything with `len()`).
    """
    cfg = getattr(model_config_or_model, "config", model_config_or_model)
    if not isinstance(cfg, MPMAConfig):
        raise TypeError(f"expected an MPMAConfig or MPMA model, got {type(model_config_or_model).__name__}")
    n_tok = tokenizer_vocab_size(tokenizer)
    if n_tok > cfg.vocab_size:
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ValueError(
            f"tokenizer {name} has {n_tok} tokens but the model's vocab_size is {cfg.vocab_size}: "
            f"use a model with vocab_size >= {n_tok} or a tokenizer of <= {cfg.vocab_size} tokens"
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None and cfg.text_arch == "roberta" and pad != cfg.pad_token_id:
        raise ValueError(
            f"tokenizer pad id {pad} differs from the model's pad_token_id {cfg.pad_token_id} "
            f"(RoBERTa position ids depend on it): set model pad_token_id={pad}"
        )
