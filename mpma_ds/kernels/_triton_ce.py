"""Triton kernels of the chunked linear cross-entropy (imported only when ``impl="triton"`` runs).

One program per row of a (N, C) logit chunk (columns ``v0 .. v0 + C`` of the vocabulary): ``_lse_update``
folds the chunk into the row's running max / sum-of-exp and picks the target logit when the label falls in
the chunk (one read of the chunk instead of max, sub, exp, sum and gather passes); ``_softmax_grad`` writes
``(softmax - onehot) * scale`` of the chunk in the matmul dtype (one read, one write).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lse_update(Z, LAB, M, S, T, C, v0, s_zn, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    label = tl.load(LAB + row) - v0
    m = tl.load(M + row)
    s = tl.load(S + row)
    t = tl.load(T + row)
    for c0 in range(0, C, BLOCK):
        cols = c0 + offs
        z = tl.load(Z + row * s_zn + cols, mask=cols < C, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
        m = new_m
        t += tl.sum(tl.where((cols == label) & (cols < C), z, 0.0), axis=0)
    tl.store(M + row, m)
    tl.store(S + row, s)
    tl.store(T + row, t)


@triton.jit
def _softmax_grad(Z, LAB, LSE, G, SCALE, C, v0, s_zn, s_gn, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    label = tl.load(LAB + row) - v0
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    for c0 in range(0, C, BLOCK):
        cols = c0 + offs
        z = tl.load(Z + row * s_zn + cols, mask=cols < C, other=float("-inf")).to(tl.float32)
        g = (tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(G + row * s_gn + cols, g.to(G.dtype.element_ty), mask=cols < C)


def lse_update(
    logits: torch.Tensor,
    labels: torch.Tensor,
    v0: int,
    run_max: torch.Tensor,
    run_sum: torch.Tensor,
    target: torch.Tensor,
) -> None:
    """Fold the (N, C) fp32 chunk starting at vocabulary column ``v0`` into the running statistics in place."""
    rows, width = logits.shape
    _lse_update[(rows,)](logits, labels, run_max, run_sum, target, width, v0, logits.stride(0), BLOCK=1024)


def softmax_grad(
    logits: torch.Tensor, labels: torch.Tensor, v0: int, lse: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``(softmax(chunk) - onehot(labels)) * scale[:, None]`` of the (N, C) fp32 chunk, in ``dtype``."""
    rows, width = logits.shape
    out = torch.empty(rows, width, dtype=dtype, device=logits.device)
    _softmax_grad[(rows,)](logits, labels, lse, out, scale, width, v0, logits.stride(0), out.stride(0), BLOCK=1024)
    return out
