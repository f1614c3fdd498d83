"""MA-CMF: memory-augmented cross-modal fusion (co-attention layers with a learned visual memory).

Each layer has a text stream (self-attention -> cross-attention -> FFN) and an image stream (the same,
attending the other way), pre-norm. The text stream's cross-attention keys/values are the visual
features together with their responses from a learned memory (top-k slot attention), mixed by a learned
gate (`MPMAConfig.memory_kv`). `memory_slots = 0` gives plain co-attention (the M3AE ablation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mpma_ds.models.config import MPMAConfig


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention through SDPA, or an explicit softmax for the baseline."""

    def __init__(self, dim: int, heads: int, *, dropout: float = 0.0, attn_impl: str = "sdpa") -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout
        self.attn_impl = attn_impl

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, Lq, D) attends to `context` (B, Lk, D) (default: x); key_mask (B, Lk) bool, True = attend."""
        context = x if context is None else context
        b, lq, d = x.shape
        q = self.q(x).view(b, lq, self.heads, self.head_dim).transpose(1, 2)  # (B, H, Lq, hd)
        k, v = self.kv(context).view(b, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, Lk, hd)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Lk)
        p = self.dropout if self.training else 0.0
        if self.attn_impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, Lq, Lk)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            o = F.dropout(scores.softmax(dim=-1), p) @ v
        return self.out(o.transpose(1, 2).reshape(b, lq, d))  # (B, Lq, D)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class VisualMemory(nn.Module):
    """A learned memory M (S, D) queried by visual features; each query reads its top-k slots."""

    def __init__(self, dim: int, slots: int, topk: int, kv_mode: str) -> None:
        super().__init__()
        self.memory = nn.Parameter(torch.randn(slots, dim) * 0.02)  # (S, D)
        self.query = nn.Linear(dim, dim)
        self.gate = nn.Linear(2 * dim, dim)
        self.topk, self.kv_mode = topk, kv_mode

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """v (B, N, D) visual features -> keys/values for the text stream: (B, 2N, D) or (B, N, D)."""
        scores = self.query(v) @ self.memory.t() / math.sqrt(v.shape[-1])  # (B, N, S)
        top, idx = scores.topk(self.topk, dim=-1)  # (B, N, k)
        sparse = torch.full_like(scores, float("-inf")).scatter(-1, idx, top)
        r = sparse.softmax(dim=-1) @ self.memory  # (B, N, D) memory responses
        g = torch.sigmoid(self.gate(torch.cat([v, r], dim=-1)))  # (B, N, D)
        if self.kv_mode == "concat":
            return torch.cat([v, g * r], dim=1)  # (B, 2N, D)
        return g * v + (1.0 - g) * r  # (B, N, D)


class FusionLayer(nn.Module):
    """One MA-CMF co-attention layer over a text stream and an image stream."""

    def __init__(self, cfg: MPMAConfig) -> None:
        super().__init__()
        d, h, p = cfg.fusion_width, cfg.fusion_heads, cfg.dropout
        impl = cfg.build_attn_impl
        hidden = int(d * cfg.fusion_mlp_ratio)
        self.t_norm1, self.t_self = nn.LayerNorm(d), MultiHeadAttention(d, h, dropout=p, attn_impl=impl)
        self.t_norm2, self.t_cross = nn.LayerNorm(d), MultiHeadAttention(d, h, dropout=p, attn_impl=impl)
        self.t_norm3, self.t_ffn = nn.LayerNorm(d), FeedForward(d, hidden, p)
        self.v_norm1, self.v_self = nn.LayerNorm(d), MultiHeadAttention(d, h, dropout=p, attn_impl=impl)
        self.v_norm2, self.v_cross = nn.LayerNorm(d), MultiHeadAttention(d, h, dropout=p, attn_impl=impl)
        self.v_norm3, self.v_ffn = nn.LayerNorm(d), FeedForward(d, hidden, p)
        self.memory = (
            VisualMemory(d, cfg.memory_slots, cfg.memory_topk, cfg.memory_kv) if cfg.memory_slots > 0 else None
        )
        self.drop = nn.Dropout(p)

    def forward(
        self, t: torch.Tensor, text_mask: torch.Tensor | None, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B, L, D) text, text_mask (B, L) bool or None, v (B, N, D) image -> updated (t, v)."""
        t = t + self.drop(self.t_self(self.t_norm1(t), key_mask=text_mask))
        v = v + self.drop(self.v_self(self.v_norm1(v)))
        tn, vn = self.t_norm2(t), self.v_norm2(v)
        visual_kv = self.memory(vn) if self.memory is not None else vn  # (B, 2N | N, D)
        t = t + self.drop(self.t_cross(tn, visual_kv))
        v = v + self.drop(self.v_cross(vn, tn, key_mask=text_mask))
        t = t + self.drop(self.t_ffn(self.t_norm3(t)))
        v = v + self.drop(self.v_ffn(self.v_norm3(v)))
        return t, v


class MACMFFusion(nn.Module):
    """A stack of `FusionLayer`s with a final LayerNorm per stream."""

    def __init__(self, cfg: MPMAConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FusionLayer(cfg) for _ in range(cfg.fusion_layers))
        self.t_norm = nn.LayerNorm(cfg.fusion_width)
        self.v_norm = nn.LayerNorm(cfg.fusion_width)
        self.block_checkpointing = False

    def forward(
        self, t: torch.Tensor, text_mask: torch.Tensor | None, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B, L, D), text_mask (B, L) bool or None (no padding), v (B, N, D) -> the two streams, normed."""
        if text_mask is not None and bool(text_mask.all()):
            text_mask = None  # no padding: unmasked attention, so SDPA may use its Flash kernel
        for layer in self.layers:
            if self.block_checkpointing and torch.is_grad_enabled():
                t, v = checkpoint(layer, t, text_mask, v, use_reentrant=False)
            else:
                t, v = layer(t, text_mask, v)
        return self.t_norm(t), self.v_norm(v)  # (B, L, D), (B, N, D)
