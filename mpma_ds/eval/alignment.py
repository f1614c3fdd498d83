"""Evaluate a model's image-report alignment on a validation pass: retrieval R@K and zero-shot AUROC."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from data_tools.shard_format import CHEXPERT_LABELS
from mpma_ds.eval.retrieval import DEFAULT_KS, first_pair_per_report, retrieval_metrics
from mpma_ds.eval.zeroshot import prompt_scores, prompts_for, zero_shot_auroc


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
    prompts: Mapping[str, tuple[str, str]] | None = None,
    keep_embeddings: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Retrieval R@K (both directions, one image per distinct report) and zero-shot AUROC on ``batches``.

    Pure over ``encode_image``/``encode_text``. Under ZeRO-3 the parameters are partitioned and every
    forward is collective, so EVERY rank must call this with the same batches (each rank runs the whole,
    small validation pass); only rank 0 should log the result.

    Args:
        model: an MPMA (or a DeepSpeed engine wrapping one).
        batches: one pass of loader batches with ``image`` (B, C, H, W), ``text`` list[str] and optionally
            ``labels`` (B, 14) float with NaN for blank and ``valid`` (B,) bool (False rows are padding and
            are left out).
        tokenizer: the model's tokenizer; reports are re-tokenised unmasked from ``text``.
        device: where the model runs.
        max_text_len: token budget of the text encoder.
        keep_embeddings: a dict that receives the retrieval pairs' embeddings, ``"image"`` and ``"text"``
            (N_unique, D) each (for bootstrap intervals over queries).
    Returns:
        ``i2t_R@k``, ``t2i_R@k`` (fractions), ``zeroshot_auroc/<label>``, ``zeroshot_auroc_mean``,
        ``eval_samples``, ``retrieval_pairs``, ``zeroshot_labels``.
    """
    net = _module(model)
    was_training = net.training
    net.eval()
    try:
        dtype = next(net.parameters()).dtype
        image_embs, texts, labels = [], [], []
        for batch in batches:
            images = batch["image"].to(device=device, dtype=dtype)
            emb = net.encode_image(images).float().cpu()  # (B, D)
            # the loader pads a rank's last batch with repeats flagged valid=False: count each sample once
            keep = torch.as_tensor(batch.get("valid", [True] * len(emb)), dtype=torch.bool).cpu()  # (B,)
            image_embs.append(emb[keep])
            texts.extend(t for t, ok in zip(batch["text"], keep.tolist()) if ok)
            if "labels" in batch:
                labels.append(torch.as_tensor(batch["labels"], dtype=torch.float32).cpu()[keep])
        if not image_embs:
            raise ValueError("the evaluation split yielded no batches")
        image_emb = torch.cat(image_embs)  # (N, D)
        keep = first_pair_per_report(texts)
        text_emb = encode_texts(
            net, [texts[i] for i in keep], tokenizer=tokenizer, device=device, max_text_len=max_text_len
        )  # (N_unique, D)
        metrics = retrieval_metrics(image_emb[keep], text_emb, ks)
        if keep_embeddings is not None:
            keep_embeddings.update(image=image_emb[keep], text=text_emb)
        metrics["eval_samples"] = float(image_emb.shape[0])
        if labels:
            pairs = prompts_for(label_names, prompts)
            pos = encode_texts(
                net, [p for p, _ in pairs], tokenizer=tokenizer, device=device, max_text_len=max_text_len
            )  # (C, D)
            neg = encode_texts(
                net, [n for _, n in pairs], tokenizer=tokenizer, device=device, max_text_len=max_text_len
            )  # (C, D)
            metrics.update(zero_shot_auroc(prompt_scores(image_emb, pos, neg), torch.cat(labels), label_names))
        return metrics
    finally:
        net.train(was_training)
