"""GLA and reconstruction losses as plain functions (+ two tiny modules that own a learnable temperature).

`gather_with_grad` takes rank and world size explicitly (open_clip `loss.py`); with one process it returns
its input and needs no process group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mpma_ds import kernels
from mpma_ds.models.registry import LOCAL_LOSSES


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """All-gather `x` (B, ...) from every rank into (world*B, ...); gradients flow back to each rank."""
    if world_size <= 1:
        return x
    import torch.distributed.nn.functional as dist_fn  # only needed (and only importable usefully) when distributed

    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather_flags(flags: torch.Tensor, world_size: int) -> torch.Tensor:
    """All-gather a (B,) bool tensor (no gradient) into (world*B,), rank order; with one process, as is."""
    if world_size <= 1:
        return flags
    import torch.distributed as dist

    parts = [torch.empty_like(flags, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(parts, flags.to(torch.uint8))
    return torch.cat(parts).bool()


def _fp32_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype == torch.float32 else logits.float()


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, row_valid: torch.Tensor | None, col_valid: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy of (R, C) ``logits`` averaged over the valid rows, invalid columns left out of every
    softmax (they are neither positives nor negatives). ``None`` masks mean all valid; no valid row gives a
    zero that still touches ``logits`` (every rank keeps the same graph)."""
    logits = _fp32_logits(logits)
    if col_valid is not None:
        logits = logits.masked_fill(~col_valid[None, :], torch.finfo(logits.dtype).min)
    if row_valid is None:
        return F.cross_entropy(logits, targets)
    per_row = F.cross_entropy(logits, targets, reduction="none")  # (R,)
    weight = row_valid.to(per_row.dtype)
    return (per_row * weight).sum() / weight.sum().clamp(min=1.0)


def symmetric_infonce(
    logits: torch.Tensor, targets: torch.Tensor | None = None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of row-wise and column-wise cross-entropy of a square (B, B) logit matrix (diagonal = positives),
    in fp32; ``valid`` (B,) bool drops rows and columns (stand-in samples): the loss of the kept sub-matrix."""
    logits = _fp32_logits(logits)
    targets = torch.arange(logits.shape[0], device=logits.device) if targets is None else targets
    return 0.5 * (
        masked_cross_entropy(logits, targets, valid, valid)
        + masked_cross_entropy(logits.t(), targets, valid, valid)
    )


def global_infonce(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    rank: int = 0,
    world_size: int = 1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP loss between L2-normalised (B, E) embeddings, negatives gathered over all ranks.

    Each rank scores its local rows against the gathered columns (open_clip `local_loss`), so the value at
    initialisation is about ln(world_size * B). The similarities are computed in fp32 even under autocast
    (a bf16 cosine carries ~3 significant digits; times a logit scale of up to 100 that is an error of
    ~0.4 in a logit). ``valid`` (B,) bool marks this rank's real samples: invalid rows carry no loss and
    invalid columns, gathered from every rank, are no one's negatives. ``valid`` must be given on every rank
    or on none (the flags are gathered collectively).
    """
    all_image = gather_with_grad(image_emb, world_size)  # (W*B, E)
    all_text = gather_with_grad(text_emb, world_size)  # (W*B, E)
    all_valid = None if valid is None else gather_flags(valid, world_size)  # (W*B,)
    b = image_emb.shape[0]
    targets = torch.arange(b, device=image_emb.device) + rank * b
    with torch.autocast(image_emb.device.type, enabled=False):
        scale = logit_scale.float()
        logits_i2t = scale * image_emb.float() @ all_text.float().t()  # (B, W*B)
        logits_t2i = scale * text_emb.float() @ all_image.float().t()  # (B, W*B)
    return 0.5 * (
        masked_cross_entropy(logits_i2t, targets, valid, all_valid)
        + masked_cross_entropy(logits_t2i, targets, valid, all_valid)
    )


def late_interaction_scores(
    tokens: torch.Tensor, token_valid: torch.Tensor, patches: torch.Tensor, *, impl: str = "auto"
) -> torch.Tensor:
    """Token-patch late-interaction similarity of every (report i, image j) pair.

    Args:
        tokens: (Bt, L, E) L2-normalised token features.
        token_valid: (Bt, L) bool, the tokens that count (non-special, non-padding).
        patches: (Bi, K, E) L2-normalised patch features.
        impl: the `mpma_ds.kernels` implementation (``auto``, ``reference``, ``chunked``, ``triton``).

    Returns:
        (Bt, Bi): 0.5 * (mean over valid tokens of the max cosine over patches
                        + mean over patches of the max cosine over valid tokens).
    """
    t2p, p2t = kernels.late_interaction_scores(tokens, token_valid, patches, None, impl=impl)  # (Bt, Bi) each
    return 0.5 * (t2p + p2t)


def masked_patch_mse(
    pred: torch.Tensor, target: torch.Tensor, *, norm_pix: bool = True, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error between predicted and (per-patch normalised) target pixels of masked patches.

    Args:
        pred: (B, M, P) predictions of the M masked patches.
        target: (B, M, P) the pixels of those patches.
        valid: optional (B,) bool; the mean runs over the valid samples only (all masked-patch counts are
            equal, so this is the loss of the batch without the invalid rows).
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6).sqrt()
    err = (pred.float() - target).pow(2)
    if valid is None:
        return err.mean()
    weight = valid.to(err.dtype)
    return (err.flatten(1).mean(dim=1) * weight).sum() / weight.sum().clamp(min=1.0)


class LogitScale(nn.Module):
    """A learnable log inverse temperature, clamped to [0, ln(max_scale)] when read."""

    def __init__(self, init_temperature: float, max_scale: float) -> None:
        super().__init__()
        # Shape (1,), not a 0-dim tensor: DeepSpeed's initial parameter broadcast views params as bytes,
        # which a 0-dim tensor cannot do.
        self.log_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.max_log = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(0.0, self.max_log).exp().squeeze(0)  # () scalar


class GlobalContrastiveLoss(nn.Module):
    """Global ITC: symmetric InfoNCE of pooled image/report embeddings, gathered across ranks."""

    def __init__(self, init_temperature: float, max_scale: float) -> None:
        super().__init__()
        self.logit_scale = LogitScale(init_temperature, max_scale)

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        rank: int,
        world_size: int,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return global_infonce(
            image_emb, text_emb, self.logit_scale(), rank=rank, world_size=world_size, valid=valid
        )


@LOCAL_LOSSES.register("late_interaction")
class LocalAlignmentLoss(nn.Module):
    """Local token-patch alignment: late-interaction scores -> symmetric InfoNCE over the local batch. Another
    local loss (`gloria.GloriaLocalLoss`) subclasses it and overrides `scores`."""

    def __init__(self, init_temperature: float, max_scale: float, *, kernel_impl: str = "auto") -> None:
        super().__init__()
        self.logit_scale = LogitScale(init_temperature, max_scale)
        self.kernel_impl = kernel_impl

    def scores(self, tokens: torch.Tensor, token_valid: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(Bt, Bi) similarity of every (report, image) pair of the batch."""
        return late_interaction_scores(tokens, token_valid, patches, impl=self.kernel_impl)

    def forward(
        self,
        tokens: torch.Tensor,
        token_valid: torch.Tensor,
        patches: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``valid`` (B,) bool: stand-in samples are left out of both directions (not even as negatives)."""
        scores = self.scores(tokens, token_valid, patches)  # (B, B)
        return symmetric_infonce(self.logit_scale().float() * scores.float(), valid=valid)
