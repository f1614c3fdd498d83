"""Load a tokenizer from a local Hugging Face tokenizer folder; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from ``folder`` (ours from `data_tools.train_tokenizer`, or any HF folder).

    Raises:
        FileNotFoundError: the folder does not exist or holds no tokenizer files.
        ValueError: the tokenizer is not a fast tokenizer or lacks the special tokens MLM needs.
    """
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {path} does not exist; build one with data_tools.train_tokenizer"
        )
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"{path} holds no tokenizer (no tokenizer.json, vocab.txt or tokenizer_config.json)"
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ValueError(f"{path}: a fast tokenizer is needed (word_ids() drives whole-word masking)")
    for attr in ("mask_token_id", "pad_token_id", "cls_token_id", "sep_token_id"):
        if getattr(tok, attr) is None:
            raise ValueError(f"{path}: tokenizer has no {attr.removesuffix('_id')} token; MLM needs it")
    return tok
