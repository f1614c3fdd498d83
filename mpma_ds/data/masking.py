"""Report text → ``input_ids``, ``attention_mask``, ``mlm_labels``: tokenise, truncate, pad, whole-word mask.

Whole-word masking relies only on the fast tokenizer's ``word_ids()`` (special and padding tokens have
no word), ``mask_token_id``, ``pad_token_id`` and ``all_special_ids``, so any Hugging Face fast
tokenizer folder works.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

IGNORE_INDEX = -100

# The words of a report that only the image can supply, by class (CheXpert's findings as reports write them, sides,
# extent and severity, zones; `mpma_ds.eval.mlm` scores the MLM head on them, each class apart too):
# `ReportEncoder(finding_probability=...)` masks them (or the classes it is given) at their own rate.
FINDING_CLASSES: dict[str, frozenset[str]] = {
    # findings (CheXpert's 13 pathologies as reports name them)
    "finding": frozenset({
        "atelectasis", "atelectatic", "cardiomegaly", "enlarged", "enlargement", "widened", "widening",
        "mediastinum", "mediastinal", "consolidation", "consolidative", "edema", "haziness", "perihilar",
        "pleural", "effusion", "effusions", "meniscus", "blunting", "costophrenic", "pneumothorax", "pneumothoraces",
        "nodule", "nodules", "mass", "lesion", "opacity", "opacities", "opacification", "pneumonia",
        "fracture", "fractures", "displaced", "thickening", "cap", "bibasilar", "basilar", "plate",
    }),
    "side": frozenset({"right", "left", "bilateral", "sided", "unilateral"}),
    # extent and severity
    "extent": frozenset({
        "small", "moderate", "large", "mild", "mildly", "moderately", "severe", "severely", "trace", "focal",
        "patchy", "dense", "linear",
    }),
    "zone": frozenset({"upper", "middle", "lower", "apical", "apex", "base", "bases", "lingula"}),
}  # fmt: skip
FINDING_WORDS: frozenset[str] = frozenset().union(*FINDING_CLASSES.values())


def finding_words_of(classes: list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """The finding words of ``classes`` (names of `FINDING_CLASSES`); none named = every class (`FINDING_WORDS`)."""
    unknown = sorted(set(classes) - set(FINDING_CLASSES))
    if unknown:
        raise ValueError(f"unknown finding-word class(es) {unknown}; known: {sorted(FINDING_CLASSES)}")
    return frozenset().union(*(FINDING_CLASSES[c] for c in classes)) if classes else FINDING_WORDS


def whole_word_mask(
    input_ids: torch.Tensor,
    word_ids: torch.Tensor,
    *,
    probability: float,
    mask_token_id: int,
    random_token_ids: torch.Tensor,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    whole_word: bool = True,
    generator: torch.Generator | None = None,
    token_probability: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose tokens for MLM by whole words and corrupt them BERT-style.

    Each word is chosen with ``probability`` (so the expected fraction of maskable tokens chosen equals
    ``probability``); a row with maskable tokens but no word chosen gets one random word, so every
    sequence contributes to the MLM loss. Of the chosen tokens, ``mask_fraction`` become ``[MASK]``,
    ``random_fraction`` a random token from ``random_token_ids``, the rest stay as they are.
    ``probability == 0`` (fine-tuning) masks nothing: the ids come back unchanged, every label -100.

    Args:
        input_ids: (B, L) token ids.
        word_ids: (B, L) word index of each token, -1 for special and padding tokens (never chosen).
        random_token_ids: (V',) ids random replacements are drawn from (the non-special vocabulary).
        token_probability: optional (B, L) probability of each token's word (every piece of a word the same):
            some words chosen at another rate than ``probability`` (e.g. finding words).

    Returns:
        ``(corrupted_ids, mlm_labels)``, both (B, L) int64; labels are -100 where a token was not chosen.
    """
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"MLM probability must be in [0, 1), got {probability}")
    if probability == 0.0:  # no MLM at all: not even the one-word-per-row fallback
        return input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)
    bsz, length = input_ids.shape
    # Every draw has a fixed shape, so a row's masking depends only on its own tokens and its row index
    # (not on the other rows of the batch, e.g. padding repeats that differ between backends).
    word_draw = torch.rand(bsz, length, generator=generator)  # (B, L): per word (whole_word) or per token
    fallback_draw = torch.rand(bsz, length, generator=generator)  # (B, L)
    action = torch.rand(bsz, length, generator=generator)  # (B, L)
    replacement = random_token_ids[torch.randint(len(random_token_ids), (bsz, length), generator=generator)]
    maskable = word_ids >= 0  # (B, L)
    unit = word_ids.clamp(min=0) if whole_word else torch.arange(length).expand(bsz, length)  # (B, L)
    rate = probability if token_probability is None else token_probability
    chosen = (word_draw.gather(1, unit) < rate) & maskable
    empty = maskable.any(dim=1) & ~chosen.any(dim=1)  # (B,)
    if empty.any():
        # a row with maskable tokens but nothing chosen: take the unit of its highest fallback draw
        pick = torch.where(maskable, fallback_draw, torch.full_like(fallback_draw, -1.0)).argmax(dim=1)  # (B,)
        picked_unit = unit.gather(1, pick.unsqueeze(1))  # (B, 1)
        chosen |= empty.unsqueeze(1) & (unit == picked_unit) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    to_mask = chosen & (action < mask_fraction)
    to_random = chosen & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    corrupted = torch.where(to_random, replacement, corrupted)
    return corrupted, labels


class ReportEncoder:
    """Tokenise a batch of reports, apply whole-word MLM masking, pad to ``max_len`` or (``pad_to_multiple`` >
    0) only to the batch's longest report rounded up to a multiple of ``pad_to_multiple`` (at most ``max_len``).

    Dynamic padding cuts the columns after the masking, which always draws at the fixed ``max_len`` shape: a
    batch's kept columns hold exactly the ids, mask and labels fixed padding gives (the cut ones are padding
    only), so the masking, and a resumed run, do not depend on the padding mode.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        max_len: int,
        *,
        probability: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        whole_word: bool = True,
        pad_to_multiple: int = 0,
        finding_probability: float | None = None,
        finding_words: frozenset[str] = FINDING_WORDS,
    ) -> None:
        if pad_to_multiple < 0:
            raise ValueError(f"pad_to_multiple must be >= 0 (0 = pad to max_len), got {pad_to_multiple}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("whole-word masking needs a fast tokenizer (word_ids()); load it with load_tokenizer")
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no [MASK] or [PAD] token; MLM needs both")
        if not 0.0 <= probability < 1.0:
            raise ValueError(f"MLM probability must be in [0, 1), got {probability}")
        if finding_probability is not None and not 0.0 <= finding_probability < 1.0:
            raise ValueError(f"MLM probability of finding words must be in [0, 1), got {finding_probability}")
        self.finding_probability, self.finding_words = finding_probability, finding_words
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.probability = probability
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction
        self.whole_word = whole_word
        self.pad_to_multiple = pad_to_multiple
        special = set(tokenizer.all_special_ids)
        self.special_ids = torch.tensor(sorted(special), dtype=torch.long)
        self.random_token_ids = torch.tensor(
            [i for i in range(len(tokenizer)) if i not in special], dtype=torch.long
        )

    def __call__(self, texts: list[str], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Encode ``texts`` → ``input_ids``, ``attention_mask``, ``mlm_labels`` (each (B, L) int64)."""
        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_len,
            padding="max_length",
            return_tensors="pt",
        )
        input_ids = enc["input_ids"].long()  # (B, L)
        attention_mask = enc["attention_mask"].long()  # (B, L)
        word_ids = torch.tensor(
            [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(texts))], dtype=torch.long
        )  # (B, L)
        # belt and braces: a special id never counts as a word, whatever the post-processor reports
        word_ids[torch.isin(input_ids, self.special_ids) | (attention_mask == 0)] = -1
        rates = None
        if self.finding_probability is not None and self.probability > 0:
            rates = torch.full(input_ids.shape, self.probability)  # (B, L)
            rates[self._finding_tokens(enc, texts, word_ids)] = self.finding_probability
        corrupted, labels = whole_word_mask(
            input_ids,
            word_ids,
            probability=self.probability,
            mask_token_id=self.tokenizer.mask_token_id,
            random_token_ids=self.random_token_ids,
            mask_fraction=self.mask_fraction,
            random_fraction=self.random_fraction,
            whole_word=self.whole_word,
            generator=generator,
            token_probability=rates,
        )
        out = {"input_ids": corrupted, "attention_mask": attention_mask, "mlm_labels": labels}
        if self.pad_to_multiple:
            longest = int(attention_mask.sum(dim=1).max()) if len(texts) else 0
            width = min(self.max_len, -(-max(longest, 1) // self.pad_to_multiple) * self.pad_to_multiple)
            out = {k: v[:, :width].contiguous() for k, v in out.items()}  # (B, width) each
        return out

    def _finding_tokens(self, enc: Any, texts: list[str], word_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: tokens of a word (its characters in the report, lower-cased) in ``finding_words``."""
        out = torch.zeros(word_ids.shape, dtype=torch.bool)
        for row, text in enumerate(texts):
            seen: dict[int, bool] = {}
            for col, w in enumerate(word_ids[row].tolist()):
                if w < 0:
                    continue
                if w not in seen:
                    span = enc.word_to_chars(row, w)
                    seen[w] = span is not None and text[span.start : span.end].lower() in self.finding_words
                out[row, col] = seen[w]
        return out


def batch_generator(*seed_parts: int) -> torch.Generator:
    """A torch generator seeded from several integers (seed, epoch, rank, batch ...), independent of workers."""
    value = int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in seed_parts]).generate_state(1)[0])
    return torch.Generator().manual_seed(value)
