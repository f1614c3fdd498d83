"""GLoRIA-style attention-weighted local alignment (Huang et al., "GLoRIA: A Multimodal Global-Local
Representation Learning Framework for Label-efficient Medical Image Recognition", ICCV 2021), the
``local_loss: gloria`` alternative to the token-patch late interaction (`losses.LocalAlignmentLoss`).

For a report i and an image j, with L2-normalised word features w_il and region (patch) features v_jk:

- word -> region attention ``a_ijlk = softmax_k(attn_scale * w_il . v_jk)`` (GLoRIA's temperature 4);
- the attention-weighted region context ``c_ijl = sum_k a_ijlk v_jk``;
- the word-level match ``R_ijl = cos(c_ijl, w_il)``;
- per pair, aggregated over the report's valid words, ``Z_ij = log(sum_l exp(agg_scale * R_ijl)) /
  agg_scale`` (GLoRIA's 5);
- a symmetric InfoNCE over the batch of ``logit_scale * Z`` (report -> image and image -> report; the logit
  scale is learnable like the other InfoNCE terms, GLoRIA's fixed 10 being one value of it).

`word_region_attention` returns the attention of each report over its *own* image: the ``gloria_attention``
grounding map (`mpma_ds.eval.attribution`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpma_ds.models.losses import LocalAlignmentLoss
from mpma_ds.models.registry import LOCAL_LOSSES

ATTN_SCALE = 4.0
"""GLoRIA's word -> region attention temperature (gamma_1)."""
AGG_SCALE = 5.0
"""GLoRIA's word aggregation temperature (gamma_2)."""


def word_region_attention(
    tokens: torch.Tensor, patches: torch.Tensor, attn_scale: float = ATTN_SCALE
) -> torch.Tensor:
    """(B, L, K) attention of each report's words over the regions of its own image.

    Args:
        tokens: (B, L, E) L2-normalised word features.
        patches: (B, K, E) L2-normalised region features.
    """
    return (attn_scale * torch.einsum("ble,bke->blk", tokens.float(), patches.float())).softmax(dim=-1)


def gloria_scores(
    tokens: torch.Tensor,
    token_valid: torch.Tensor,
    patches: torch.Tensor,
    *,
    attn_scale: float = ATTN_SCALE,
    agg_scale: float = AGG_SCALE,
    chunk: int = 16,
) -> torch.Tensor:
    """(Bt, Bi) aggregated word-level match ``Z_ij`` of every (report i, image j) pair, in fp32.

    Images are taken ``chunk`` at a time, so memory is bounded by (Bt, chunk, L, K). A report without a valid
    word scores 0 against every image (it carries no local signal).

    Args:
        tokens: (Bt, L, E) L2-normalised word features.
        token_valid: (Bt, L) bool, the words that count (non-special, non-padding).
        patches: (Bi, K, E) L2-normalised region features.
    """
    tokens, patches = tokens.float(), patches.float()
    valid = token_valid.bool()  # (Bt, L)
    rows = []
    for start in range(0, patches.shape[0], chunk):
        v = patches[start : start + chunk]  # (C, K, E)
        attn = (attn_scale * torch.einsum("ile,jke->ijlk", tokens, v)).softmax(dim=-1)  # (Bt, C, L, K)
        context = torch.einsum("ijlk,jke->ijle", attn, v)  # (Bt, C, L, E)
        match = F.cosine_similarity(context, tokens[:, None], dim=-1)  # (Bt, C, L)
        match = (agg_scale * match).masked_fill(~valid[:, None], float("-inf"))
        rows.append(torch.logsumexp(match, dim=-1) / agg_scale)  # (Bt, C)
    scores = torch.cat(rows, dim=1)  # (Bt, Bi)
    return torch.where(valid.any(dim=1, keepdim=True), scores, torch.zeros_like(scores))


@LOCAL_LOSSES.register("gloria")
class GloriaLocalLoss(LocalAlignmentLoss):
    """GLoRIA's local loss: attention-weighted region context per word, word-level matches aggregated per pair
    (`gloria_scores`), symmetric InfoNCE over the local batch with a learnable logit scale (as the late
    interaction's, `losses.LocalAlignmentLoss`). ``kernel_impl`` is accepted and unused: one PyTorch path."""

    def __init__(self, init_temperature: float, max_scale: float, *, kernel_impl: str = "auto") -> None:
        super().__init__(init_temperature, max_scale, kernel_impl=kernel_impl)
        self.attn_scale, self.agg_scale = ATTN_SCALE, AGG_SCALE

    def scores(self, tokens: torch.Tensor, token_valid: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(Bt, Bi) GLoRIA's aggregated word-level match of every (report, image) pair."""
        return gloria_scores(tokens, token_valid, patches, attn_scale=self.attn_scale, agg_scale=self.agg_scale)

    def attention(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, K) word -> region attention of each report over its own image (the grounding map)."""
        return word_region_attention(tokens, patches, self.attn_scale)
