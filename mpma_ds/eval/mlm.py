"""Masked-token accuracy of the fused text stream, overall and on *finding words*: the words of a report that
only the image can supply (what is seen, on which side, how large or severe). MA-CMF's memory shapes the fused
text stream only, so this is where its effect (or its absence) shows.

``FINDING_WORDS`` (defined beside the masking, `data.masking`, which can mask them at their own rate) is the
one list: the CheXpert finding vocabulary as radiology reports write it (and as
``data_tools.synth.reports`` writes it), plus side, extent and zone words. Negation words ("no", "without")
are left out on purpose: they are frequent function words the report's syntax half-predicts, and they would
swamp the count. A masked token counts as a finding-word token when the whole word it belongs to (WordPiece
``##`` pieces joined, lower-cased) is in the list.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from mpma_ds.data.masking import FINDING_CLASSES, FINDING_WORDS

__all__ = [
    "FINDING_CLASSES",
    "FINDING_WORDS",
    "MaskedTokenAccuracy",
    "finding_token_mask",
    "token_words",
    "word_ids",
]


def word_ids(tokens: list[str]) -> list[int]:
    """Word index of each WordPiece token (a ``##`` piece belongs to the word before it); -1 for special tokens."""
    out, word = [], -1
    for tok in tokens:
        if tok.startswith("[") and tok.endswith("]"):
            out.append(-1)
            continue
        if not (tok.startswith("##") and word >= 0):
            word += 1
        out.append(word)
    return out


def token_words(ids: torch.Tensor, tokenizer) -> list[list[str | None]]:
    """The lower-cased whole word (``##`` pieces joined) each token of ``ids`` (B, L) belongs to; None for special
    tokens."""
    out = []
    for seq in ids.tolist():
        tokens = tokenizer.convert_ids_to_tokens(seq)
        index = word_ids(tokens)
        text: dict[int, str] = {}
        for tok, w in zip(tokens, index):
            if w >= 0:
                text[w] = text.get(w, "") + (tok[2:] if tok.startswith("##") else tok)
        out.append([text[w].lower() if w >= 0 else None for w in index])
    return out


def finding_token_mask(ids: torch.Tensor, tokenizer, words: frozenset[str] = FINDING_WORDS,
                       *, words_of: list[list[str | None]] | None = None) -> torch.Tensor:  # fmt: skip
    """(B, L) bool: tokens of ``ids`` (the unmasked report token ids) that belong to a word in ``words``
    (``words_of``: `token_words` of ``ids`` when already computed)."""
    words_of = token_words(ids, tokenizer) if words_of is None else words_of
    return torch.tensor(
        [[w is not None and w in words for w in row] for row in words_of], dtype=torch.bool
    ).reshape(ids.shape)


class MaskedTokenAccuracy:
    """Counts correct masked-token predictions of a model's fused text stream over a pass of loader batches.

    Wrap the evaluation's batch stream with ``stream`` (every batch is scored as it goes by, so the pass is
    read once); ``result()`` gives ``mlm_acc`` (all masked tokens), ``mlm_acc_findings`` (masked tokens of
    finding words), ``mlm_tokens`` and ``mlm_tokens_findings``. Rows with ``valid`` False are left out.
    Under ZeRO-3 every rank must score the same batches (each forward gathers parameters).

    With ``image_control`` the same masked reports are also read beside *another* study's image (the batch's
    images rolled by one): ``mlm_acc_findings_shuffled``. What the head gets right there it got from the
    report's text alone; only ``mlm_acc_findings`` above it was read off the image.

    With ``classes`` (e.g. `data.masking.FINDING_CLASSES`: finding names, sides, extent, zones) the finding words
    are also counted per class: ``mlm_acc_findings_<class>`` (and ``mlm_acc_findings_shuffled_<class>`` with the
    image control), ``mlm_tokens_findings_<class>``; side words can only come from the image, so their gain is the
    clearest. ``mlm_image_changed``: the fraction of all masked tokens whose guess the other image changes at
    all, right or wrong (how much the head listens to the image).
    """

    def __init__(self, model: Any, tokenizer, device: torch.device | str, words: frozenset[str] = FINDING_WORDS,
                 *, image_control: bool = False, classes: Mapping[str, frozenset[str]] | None = None):  # fmt: skip
        self.model = model if hasattr(model, "masked_token_predictions") else model.module
        self.tokenizer, self.device, self.words = tokenizer, device, words
        self.image_control = image_control
        self.classes = dict(classes or {})
        reads = ("findings", "findings_shuffled") if image_control else ("findings",)
        kinds = ("all", *reads, *(f"{r}_{c}" for c in self.classes for r in reads))
        self.counts = {k: [0, 0] for k in kinds}  # [correct, total]
        # per evaluated sample, in pass order: (correct, total) of each kind; what a paired bootstrap of two
        # models on the same masked tokens resamples (`per_sample`)
        self.rows: dict[str, list[tuple[int, int]]] = {k: [] for k in kinds}
        self.changed = [0, 0]  # with image_control: masked tokens whose guess the other image changes, of all

    def _predict(self, images: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        net = self.model
        dtype = next(net.parameters()).dtype
        return net.masked_token_predictions(
            images.to(device=self.device, dtype=dtype),
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
        ).cpu()  # (B, L)

    @torch.no_grad()
    def update(self, batch: Mapping[str, Any]) -> None:
        labels = batch["mlm_labels"]
        keep = torch.as_tensor(batch.get("valid", [True] * labels.shape[0]), dtype=torch.bool).cpu()
        masked = (labels != -100).cpu() & keep[:, None]  # (B, L)
        if not masked.any():
            for key in self.rows:
                self.rows[key] += [(0, 0)] * int(keep.sum())
            return
        net = self.model
        was_training = net.training
        net.eval()
        try:
            pred = self._predict(batch["image"], batch)  # (B, L)
            other = self._predict(batch["image"].roll(1, 0), batch) if self.image_control else None
        finally:
            net.train(was_training)
        truth = torch.where(labels != -100, labels, batch["input_ids"]).cpu()  # the unmasked report
        words_of = token_words(truth, self.tokenizer)
        groups = {"findings": finding_token_mask(truth, self.tokenizer, self.words, words_of=words_of) & masked}
        for name, words in self.classes.items():
            groups[f"findings_{name}"] = (
                finding_token_mask(truth, self.tokenizer, words, words_of=words_of) & masked
            )
        if other is not None and len(pred) > 1:
            self.changed[0] += int((pred != other)[masked].sum())
            self.changed[1] += int(masked.sum())
        kinds = [("all", pred, masked)]
        for key, sel in groups.items():
            kinds.append((key, pred, sel))
            if other is not None:  # a batch of one has no other image: its control counts nothing
                shuffled = key.replace("findings", "findings_shuffled", 1)
                kinds.append((shuffled, other, sel if len(pred) > 1 else torch.zeros_like(sel)))
        for key, guess, sel in kinds:
            correct = guess == truth
            self.counts[key][0] += int(correct[sel].sum())
            self.counts[key][1] += int(sel.sum())
            hits, total = (correct & sel).sum(dim=1), sel.sum(dim=1)  # (B,) each
            self.rows[key] += [(int(hits[i]), int(total[i])) for i in keep.nonzero().flatten().tolist()]

    def stream(self, batches: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        for batch in batches:
            if "mlm_labels" in batch:
                self.update(batch)
            yield batch

    def per_sample(self, kind: str = "findings") -> np.ndarray:
        """(N, 2) int64 (correct, masked) counts of ``kind`` ("all", "findings" or, with ``image_control``,
        "findings_shuffled"; with ``classes`` also "findings_<class>", "findings_shuffled_<class>") per evaluated sample, in pass order (a deterministic eval pass masks the same tokens
        for every model: rows pair up across models)."""
        return np.asarray(self.rows[kind], dtype=np.int64).reshape(-1, 2)

    def result(self) -> dict[str, float]:
        """Accuracies (NaN when no token of that kind was masked) and the token counts behind them."""
        out = {}
        for key in self.counts:
            suffix = "" if key == "all" else f"_{key}"
            right, total = self.counts[key]
            out[f"mlm_acc{suffix}"] = right / total if total else float("nan")
            out[f"mlm_tokens{suffix}"] = float(total)
        if self.image_control:
            out["mlm_image_changed"] = self.changed[0] / self.changed[1] if self.changed[1] else float("nan")
        return out
