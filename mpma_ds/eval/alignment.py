"""Evaluate a model's image-report alignment on a validation pass: retrieval R@K (all studies and abnormal ones,
identical reports merged) and zero-shot AUROC (prompt ensembles; the synthetic truth as the reference when the
samples carry it), each with a bootstrap 95 % interval when asked. The protocol: docs/tracking_export_demo.md
("Evaluation protocol")."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from data_tools.shard_format import CHEXPERT_LABELS
from mpma_ds.eval.bootstrap import with_intervals
from mpma_ds.eval.retrieval import DEFAULT_KS, retrieval_metrics
from mpma_ds.eval.zeroshot import (
    DEFAULT_MIN_COUNT,
    abnormal_rows,
    ensemble_embeddings,
    prompt_scores,
    prompts_for,
    reference_targets,
    truths_of,
    zero_shot_auroc,
)

DEFAULT_RESAMPLES = 1000
"""Bootstrap resamples of the evaluation's 95 % intervals (launch/evaluate.py --bootstrap)."""


def _module(model: Any) -> Any:
    """The object carrying ``encode_image``/``encode_text`` (a DeepSpeed engine's ``.module``)."""
    return model if hasattr(model, "encode_image") else model.module


@torch.no_grad()
def encode_texts(model: Any, texts: Sequence[str], *, tokenizer, device, max_text_len: int, batch_size: int = 64):
    """(N, D) float32 CPU embeddings of ``texts`` (tokenised with [CLS]/[SEP], cut to ``max_text_len``)."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_text_len,
            return_tensors="pt",
        )
        emb = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device))  # (b, D)
        out.append(emb.float().cpu())
    return torch.cat(out)


def alignment_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    texts: Sequence[str],
    *,
    scores: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    truths: Sequence[Mapping[str, Any] | None] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    label_names: Sequence[str] = CHEXPERT_LABELS,
    min_count: int = DEFAULT_MIN_COUNT,
    n_resamples: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """The alignment metrics of embedded validation samples (pure: no model), with intervals when asked.

    Args:
        image_emb: (N, D) image embeddings; text_emb: (N, D) their reports' embeddings; texts: the N reports.
        scores: (N, C) zero-shot scores (``prompt_scores``); labels: (N, C) report labels, NaN blank;
            truths: per sample its ``truth`` or None. Without scores and labels there is no zero-shot AUROC.
        min_count: a label's fewest positives and negatives for the zero-shot AUROC.
        n_resamples: bootstrap resamples (0 = no intervals); the same resampled rows for every metric.
    Returns:
        ``retrieval_metrics`` (with ``*_abnormal`` when labels are known) + ``zero_shot_auroc``'s keys, each
        metric followed by ``<metric>_ci95: [low, high]`` when ``n_resamples`` > 0, and ``bootstrap_resamples``.
    """
    abnormal = abnormal_rows(labels, truths, label_names) if labels is not None else None
    kw = dict(ks=ks, texts=list(texts), abnormal=abnormal)
    if n_resamples:
        metrics = with_intervals(retrieval_metrics, image_emb, text_emb, n_resamples=n_resamples, seed=seed, **kw)
        metrics.pop("bootstrap_skipped", None)
    else:
        metrics = retrieval_metrics(image_emb, text_emb, **kw)
    if scores is not None and labels is not None:
        targets, reference = reference_targets(labels, truths, label_names)
        zkw = dict(label_names=label_names, min_count=min_count, reference=reference)
        if n_resamples:
            zs = with_intervals(zero_shot_auroc, scores, targets, n_resamples=n_resamples, seed=seed, **zkw)
            zs.pop("bootstrap_skipped", None)
            zs.pop("bootstrap_resamples", None)
        else:
            zs = zero_shot_auroc(scores, targets, **zkw)
        metrics.update(zs)
    return metrics


@torch.no_grad()
def evaluate_alignment(
    model: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    tokenizer,
    device: torch.device | str,
    max_text_len: int,
    ks: Sequence[int] = DEFAULT_KS,
    label_names: Sequence[str] = CHEXPERT_LABELS,
    prompts: Mapping[str, Any] | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
    n_resamples: int = 0,
    keep_embeddings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Retrieval R@K (both directions, identical reports merged; also on abnormal studies) and zero-shot AUROC
    (prompt ensembles, labels with >= ``min_count`` positives and negatives) on ``batches``.

    Pure over ``encode_image``/``encode_text``. Under ZeRO-3 the parameters are partitioned and every
    forward is collective, so EVERY rank must call this with the same batches (each rank runs the whole,
    small validation pass); only rank 0 should log the result.

    Args:
        model: an MPMA (or a DeepSpeed engine wrapping one).
        batches: one pass of loader batches with ``image`` (B, C, H, W), ``text`` list[str] and optionally
            ``labels`` (B, 14) float with NaN for blank, ``meta`` (sample jsons: their ``truth`` becomes the
            zero-shot reference when every sample has one) and ``valid`` (B,) bool (False rows are padding and
            are left out).
        tokenizer: the model's tokenizer; reports are re-tokenised unmasked from ``text``.
        device: where the model runs.
        max_text_len: token budget of the text encoder.
        prompts: overrides of `mpma_ds.eval.zeroshot.CHEXPERT_PROMPTS` entries.
        min_count: see `alignment_metrics`.
        n_resamples: bootstrap resamples of the 95 % intervals (0 = none).
        keep_embeddings: a dict that receives what the metrics were computed from: ``"image"``, ``"text"``
            (N, D) each, ``"texts"``, and with labels ``"scores"`` (N, C), ``"labels"``, ``"truths"``.
    Returns:
        `alignment_metrics`'s dict plus ``eval_samples`` (N).
    """
    net = _module(model)
    was_training = net.training
    net.eval()
    try:
        dtype = next(net.parameters()).dtype
        image_embs, texts, labels, metas = [], [], [], []
        for batch in batches:
            images = batch["image"].to(device=device, dtype=dtype)
            emb = net.encode_image(images).float().cpu()  # (B, D)
            # the loader pads a rank's last batch with repeats flagged valid=False: count each sample once
            keep = torch.as_tensor(batch.get("valid", [True] * len(emb)), dtype=torch.bool).cpu()  # (B,)
            image_embs.append(emb[keep])
            texts.extend(t for t, ok in zip(batch["text"], keep.tolist()) if ok)
            metas.extend(m for m, ok in zip(batch.get("meta") or [{}] * len(emb), keep.tolist()) if ok)
            if "labels" in batch:
                labels.append(torch.as_tensor(batch["labels"], dtype=torch.float32).cpu()[keep])
        if not image_embs:
            raise ValueError("the evaluation split yielded no batches")
        image_emb = torch.cat(image_embs)  # (N, D)

        def encode(strings: list[str]) -> torch.Tensor:
            return encode_texts(net, strings, tokenizer=tokenizer, device=device, max_text_len=max_text_len)

        distinct = list(dict.fromkeys(texts))  # identical texts embed identically: encode each once
        where = {t: i for i, t in enumerate(distinct)}
        text_emb = encode(distinct)[torch.tensor([where[t] for t in texts])]  # (N, D)
        scores = label_tensor = truths = None
        if labels:
            label_tensor = torch.cat(labels)  # (N, C)
            ensembles = prompts_for(label_names, prompts)
            pos = ensemble_embeddings(encode, [p for p, _ in ensembles])  # (C, D)
            neg = ensemble_embeddings(encode, [n for _, n in ensembles])  # (C, D)
            scores = prompt_scores(image_emb, pos, neg)  # (N, C)
            truths = truths_of(metas)
        metrics = alignment_metrics(
            image_emb,
            text_emb,
            texts,
            scores=scores,
            labels=label_tensor,
            truths=truths,
            ks=ks,
            label_names=label_names,
            min_count=min_count,
            n_resamples=n_resamples,
        )
        if keep_embeddings is not None:
            keep_embeddings.update(image=image_emb, text=text_emb, texts=texts)
            if labels:
                keep_embeddings.update(scores=scores, labels=label_tensor, truths=truths)
        metrics["eval_samples"] = int(image_emb.shape[0])
        return metrics
    finally:
        net.train(was_training)
