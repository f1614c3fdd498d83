"""Build-once test data for the training tests (test_train*.py, test_distributed*.py).

A tiny synthetic MIMIC-CXR-JPG corpus → shards (data_tools.build_shards) → a WordPiece tokenizer
(data_tools.train_tokenizer), made once per pytest process (``lru_cache``) under pytest's base temp folder.
"""

from __future__ import annotations

import functools
from pathlib import Path

from data_tools.build_shards import build_shards
from data_tools.synth_corpus import generate_corpus
from data_tools.train_tokenizer import train_tokenizer

STUDIES = 48
SEED = 5
IMAGE_SIZE = 64  # the tiny recipe's crops are 64 px in tests
VOCAB = 1024


@functools.cache
def tiny_shards(base: str) -> Path:
    """``<base>/train-data/shards`` with train/validate/test splits of a small synthetic corpus."""
    root = Path(base) / "train-data"
    corpus = root / "corpus"
    generate_corpus(corpus, STUDIES, SEED, min_size=96, max_size=128, lateral_fraction=0.0)
    out = root / "shards"
    build_shards(
        "mimic-cxr", corpus, out, shard_size=16, image_size=IMAGE_SIZE, workers=1, progress=False,
        val_fraction=0.2, test_fraction=0.05,
    )  # fmt: skip
    return out


@functools.cache
def tiny_tokenizer(base: str) -> Path:
    """A WordPiece tokenizer folder trained on the tiny shards' reports (vocabulary <= ``VOCAB``)."""
    out = Path(base) / "train-data" / "tokenizer"
    train_tokenizer(tiny_shards(base), out, VOCAB, min_frequency=1)
    return out
