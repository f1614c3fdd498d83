"""Reconstruction heads: the MLM head (masked positions only) and the MAE pixel decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from mpma_ds.kernels import linear_cross_entropy
from mpma_ds.models.config import MPMAConfig


class VocabProjection(nn.Linear):
    """The MLM vocabulary projection (an ``nn.Linear``: same parameters, same state-dict names) whose
    ``loss(h, labels)`` is the mean cross-entropy of its logits without materialising them
    (`mpma_ds.kernels.linear_cross_entropy`). The loss runs inside this module's own call, so ZeRO-3's
    per-module hooks gather its (tied) weight around it as they do for a plain linear layer."""

    def __init__(self, in_features: int, out_features: int, *, kernel_impl: str = "auto") -> None:
        super().__init__(in_features, out_features)
        self.kernel_impl = kernel_impl

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``labels`` None: the logits (..., V); else the mean CE against ``labels`` (-100 = ignored)."""
        if labels is None:
            return super().forward(h)
        return linear_cross_entropy(h, self.weight, self.bias, labels, impl=self.kernel_impl, ignore_index=-100)


class MLMHead(nn.Module):
    """BERT-style MLM head: dense -> GELU -> LayerNorm -> vocabulary projection (optionally tied)."""

    def __init__(self, cfg: MPMAConfig, word_embeddings: nn.Embedding | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.fusion_width, cfg.text_width)
        self.norm = nn.LayerNorm(cfg.text_width)
        self.decoder = VocabProjection(cfg.text_width, cfg.vocab_size, kernel_impl=cfg.kernel_impl)
        if word_embeddings is not None:
            # The same Parameter object: one tensor in the state dict, gathered once under ZeRO-3.
            self.decoder.weight = word_embeddings.weight
        self.masked_only = cfg.mlm_masked_only

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) fused text features -> (..., V) vocabulary logits."""
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D) fused text stream, labels (B, L) with -100 where not masked -> mean CE."""
        if self.masked_only:
            selected = labels != -100  # (B, L)
            h, y = hidden[selected], labels[selected]  # (M, D), (M,)
        else:
            h, y = hidden, labels
        # the (M, V) logits are never held whole outside kernel_impl="reference"; no masked token gives a
        # zero loss that still touches the head
        return self.decoder(self.norm(F.gelu(self.dense(h))), y)  # scalar fp32


class MAEDecoder(nn.Module):
    """MAE decoder: embed visible tokens, insert mask tokens, unshuffle, transformer, predict pixels.

    Positions are fixed 2-D sin-cos embeddings built for the actual grid, so any image size works.
    """

    def __init__(self, cfg: MPMAConfig) -> None:
        super().__init__()
        d = cfg.decoder_width
        self.embed = nn.Linear(cfg.fusion_width, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList(
            Block(d, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(cfg.decoder_layers)
        )
        self.set_attn_impl(cfg.build_attn_impl)
        self.norm = nn.LayerNorm(d)
        self.pred = nn.Linear(d, cfg.patch_size**2 * cfg.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        # Small output init: at initialisation predictions are ~0, so the MIM loss on normalised pixels ~1.
        nn.init.trunc_normal_(self.pred.weight, std=0.02)
        nn.init.zeros_(self.pred.bias)
        self.masked_only = cfg.mim_masked_only
        self.block_checkpointing = False

    def set_attn_impl(self, impl: str) -> None:
        for blk in self.blocks:
            blk.attn.fused_attn = impl == "sdpa"

    def forward(
        self, x: torch.Tensor, ids_keep: torch.Tensor, ids_masked: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """x (B, 1+K, Df) fused image stream (CLS + visible, shuffle order) -> predictions.

        Returns (B, N-K, p*p*C) for the masked patches in `ids_masked` order, or (B, N, p*p*C) for all
        patches in raster order when `mim_masked_only` is off.
        """
        b = x.shape[0]
        x = self.embed(x)  # (B, 1+K, d)
        d = x.shape[-1]
        n = ids_keep.shape[1] + ids_masked.shape[1]
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, ids_masked.shape[1], d)], dim=1)  # (B, N, d)
        order = torch.cat([ids_keep, ids_masked], dim=1)  # (B, N) patch index of each token
        unshuffled = torch.empty_like(tokens).scatter(1, order.unsqueeze(-1).expand(-1, -1, d), tokens)
        pos = build_sincos2d_pos_embed(list(grid), d, device=x.device, dtype=x.dtype)  # (N, d)
        x = torch.cat([x[:, :1], unshuffled + pos.reshape(1, n, d)], dim=1)  # (B, 1+N, d)
        for blk in self.blocks:
            if self.block_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = self.norm(x)[:, 1:]  # (B, N, d)
        if self.masked_only:
            x = torch.gather(x, 1, ids_masked.unsqueeze(-1).expand(-1, -1, d))  # (B, N-K, d)
        return self.pred(x)
