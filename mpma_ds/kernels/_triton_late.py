"""Triton kernels of the late interaction (imported only when ``impl="triton"`` runs).

Both directions are one generic "max-mean": for rows ``a`` of A (Ba, La, E) and ``b`` of B (Bb, Lb, E),

    out[a, b] = sum over valid l of  max over valid k of <A[a, l], B[b, k]>  /  max(#valid l, 1)

(0 when B[b] has no valid row). ``t2p`` is max-mean(text, patches); ``p2t`` is max-mean(patches, text)
transposed. The forward program of one pair walks La in tiles and Lb in tiles, computes each similarity tile
with ``tl.dot`` and keeps a running max + arg-max per row: the (B, B, L, K) similarity is never written. The
arg-max (Ba, Bb, La) int32 is saved; the backward turns it into one-hot tiles and multiplies them with
``tl.dot`` (deterministic, no atomics): dA[a, l] = sum_b w[a, b, l] B[b, arg[a, b, l]] and
dB[b, k] = sum_{a, l: arg[a, b, l] = k} w[a, b, l] A[a, l].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpma_ds.kernels._dispatch import interpreting


def _pow2(n: int, low: int = 16, high: int = 64) -> int:
    return max(low, min(high, triton.next_power_of_2(n)))


@triton.jit
def _maxmean_fwd(
    A, AM, B, BM, OUT, ARG,
    Ba, Bb, La, Lb, E,
    s_aa, s_al, s_ae, s_bb, s_bl, s_be,
    BLOCK_LA: tl.constexpr, BLOCK_LB: tl.constexpr, BLOCK_E: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    a = tl.program_id(0)
    b = tl.program_id(1)
    offs_la = tl.arange(0, BLOCK_LA)
    offs_lb = tl.arange(0, BLOCK_LB)
    offs_e = tl.arange(0, BLOCK_E)
    n_a = 0.0
    n_b = 0.0
    for l0 in range(0, La, BLOCK_LA):
        n_a += tl.sum(tl.load(AM + a * La + l0 + offs_la, mask=l0 + offs_la < La, other=0).to(tl.float32))
    for k0 in range(0, Lb, BLOCK_LB):
        n_b += tl.sum(tl.load(BM + b * Lb + k0 + offs_lb, mask=k0 + offs_lb < Lb, other=0).to(tl.float32))
    total = 0.0
    for l0 in range(0, La, BLOCK_LA):
        rows = l0 + offs_la
        row_in = rows < La
        best = tl.full((BLOCK_LA,), float("-inf"), tl.float32)
        best_k = tl.zeros((BLOCK_LA,), tl.int32)
        for k0 in range(0, Lb, BLOCK_LB):
            cols = k0 + offs_lb
            col_in = cols < Lb
            sim = tl.zeros((BLOCK_LA, BLOCK_LB), tl.float32)
            for e0 in range(0, E, BLOCK_E):
                e = e0 + offs_e
                e_in = e < E
                at = tl.load(
                    A + a * s_aa + rows[:, None] * s_al + e[None, :] * s_ae,
                    mask=row_in[:, None] & e_in[None, :], other=0.0,
                )  # fmt: skip
                bt = tl.load(
                    B + b * s_bb + cols[:, None] * s_bl + e[None, :] * s_be,
                    mask=col_in[:, None] & e_in[None, :], other=0.0,
                )  # fmt: skip
                if UPCAST:  # Triton 3.8's interpreter multiplies bf16 tiles wrongly; a GPU uses them as they are
                    at = at.to(tl.float32)
                    bt = bt.to(tl.float32)
                if IEEE:
                    sim += tl.dot(at, tl.trans(bt), input_precision="ieee")
                else:
                    sim += tl.dot(at, tl.trans(bt))
            col_ok = tl.load(BM + b * Lb + cols, mask=col_in, other=0) != 0
            sim = tl.where(col_ok[None, :], sim, float("-inf"))
            tile_max = tl.max(sim, axis=1)
            tile_arg = tl.argmax(sim, axis=1).to(tl.int32) + k0
            better = tile_max > best
            best_k = tl.where(better, tile_arg, best_k)
            best = tl.where(better, tile_max, best)
        row_ok = (tl.load(AM + a * La + rows, mask=row_in, other=0) != 0) & row_in
        tl.store(ARG + (a * Bb + b) * La + rows, best_k, mask=row_in)
        total += tl.sum(tl.where(row_ok, best, 0.0))
    out = tl.where(n_b > 0, total / tl.maximum(n_a, 1.0), 0.0)
    tl.store(OUT + a * Bb + b, out)


@triton.jit
def _maxmean_bwd_a(
    W, ARG, AM, B, DA,
    Ba, Bb, La, Lb, E,
    s_bb, s_bl, s_be,
    BLOCK_LA: tl.constexpr, BLOCK_LB: tl.constexpr, BLOCK_E: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """dA[a, rows, e-tile] = sum_b w[a, b] * valid[a, l] * B[b, arg[a, b, l], e-tile]."""
    a = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_LA + tl.arange(0, BLOCK_LA)
    e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_in = rows < La
    e_in = e < E
    row_w = tl.load(AM + a * La + rows, mask=row_in, other=0).to(tl.float32)
    offs_lb = tl.arange(0, BLOCK_LB)
    acc = tl.zeros((BLOCK_LA, BLOCK_E), tl.float32)
    for b in range(0, Bb):
        w = tl.load(W + a * Bb + b)
        arg = tl.load(ARG + (a * Bb + b) * La + rows, mask=row_in, other=-1)
        for k0 in range(0, Lb, BLOCK_LB):
            cols = k0 + offs_lb
            onehot = tl.where(arg[:, None] == cols[None, :], (row_w * w)[:, None], 0.0)  # (BLOCK_LA, BLOCK_LB)
            bt = tl.load(
                B + b * s_bb + cols[:, None] * s_bl + e[None, :] * s_be,
                mask=(cols < Lb)[:, None] & e_in[None, :], other=0.0,
            ).to(tl.float32)  # fmt: skip
            if IEEE:
                acc += tl.dot(onehot, bt, input_precision="ieee")
            else:
                acc += tl.dot(onehot, bt)
    tl.store(DA + (a * La + rows[:, None]) * E + e[None, :], acc, mask=row_in[:, None] & e_in[None, :])


@triton.jit
def _maxmean_bwd_b(
    W, ARG, AM, A, DB,
    Ba, Bb, La, Lb, E,
    s_aa, s_al, s_ae,
    BLOCK_LA: tl.constexpr, BLOCK_LB: tl.constexpr, BLOCK_E: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """dB[b, cols, e-tile] = sum_a sum_{l: arg[a, b, l] in cols} w[a, b] * valid[a, l] * A[a, l, e-tile]."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_LB + tl.arange(0, BLOCK_LB)
    e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_in = e < E
    offs_la = tl.arange(0, BLOCK_LA)
    acc = tl.zeros((BLOCK_LB, BLOCK_E), tl.float32)
    for a in range(0, Ba):
        w = tl.load(W + a * Bb + b)
        for l0 in range(0, La, BLOCK_LA):
            rows = l0 + offs_la
            row_in = rows < La
            row_w = tl.load(AM + a * La + rows, mask=row_in, other=0).to(tl.float32) * w
            arg = tl.load(ARG + (a * Bb + b) * La + rows, mask=row_in, other=-1)
            onehot_t = tl.where(cols[:, None] == arg[None, :], row_w[None, :], 0.0)  # (BLOCK_LB, BLOCK_LA)
            at = tl.load(
                A + a * s_aa + rows[:, None] * s_al + e[None, :] * s_ae,
                mask=row_in[:, None] & e_in[None, :], other=0.0,
            ).to(tl.float32)  # fmt: skip
            if IEEE:
                acc += tl.dot(onehot_t, at, input_precision="ieee")
            else:
                acc += tl.dot(onehot_t, at)
    tl.store(DB + (b * Lb + cols[:, None]) * E + e[None, :], acc, mask=(cols < Lb)[:, None] & e_in[None, :])


def _blocks(la: int, lb: int, e: int) -> tuple[int, int, int]:
    return _pow2(la), _pow2(lb), _pow2(e)


def maxmean_forward(
    a: torch.Tensor, a_mask: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (Ba, Bb) fp32, arg (Ba, Bb, La) int32)`` of max-mean(A, B) (module docstring)."""
    ba, la, e = a.shape
    bb, lb, _ = b.shape
    out = torch.empty(ba, bb, dtype=torch.float32, device=a.device)
    arg = torch.empty(ba, bb, la, dtype=torch.int32, device=a.device)
    bla, blb, be = _blocks(la, lb, e)
    _maxmean_fwd[(ba, bb)](
        a, a_mask, b, b_mask, out, arg, ba, bb, la, lb, e, *a.stride(), *b.stride(),
        BLOCK_LA=bla, BLOCK_LB=blb, BLOCK_E=be, IEEE=a.dtype == torch.float32, UPCAST=interpreting(),
    )  # fmt: skip
    return out, arg


def maxmean_backward(
    grad: torch.Tensor,
    arg: torch.Tensor,
    a: torch.Tensor,
    a_mask: torch.Tensor,
    b: torch.Tensor,
    b_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dA, dB)`` fp32 of max-mean(A, B) for the output gradient ``grad`` (Ba, Bb)."""
    ba, la, e = a.shape
    bb, lb, _ = b.shape
    n_a = a_mask.sum(-1).float()
    n_b = b_mask.sum(-1).float()
    w = (grad.float() * (n_b > 0)[None, :] / n_a.clamp(min=1)[:, None]).contiguous()  # (Ba, Bb)
    da = torch.empty(ba, la, e, dtype=torch.float32, device=a.device)
    db = torch.empty(bb, lb, e, dtype=torch.float32, device=a.device)
    bla, blb, be = _blocks(la, lb, e)
    ieee = a.dtype == torch.float32
    _maxmean_bwd_a[(ba, triton.cdiv(la, bla), triton.cdiv(e, be))](
        w, arg, a_mask, b, da, ba, bb, la, lb, e, *b.stride(),
        BLOCK_LA=bla, BLOCK_LB=blb, BLOCK_E=be, IEEE=ieee,
    )  # fmt: skip
    _maxmean_bwd_b[(bb, triton.cdiv(lb, blb), triton.cdiv(e, be))](
        w, arg, a_mask, a, db, ba, bb, la, lb, e, *a.stride(),
        BLOCK_LA=bla, BLOCK_LB=blb, BLOCK_E=be, IEEE=ieee,
    )  # fmt: skip
    return da, db


class TritonLateInteraction(torch.autograd.Function):
    """``(t2p, p2t)`` = (max-mean(text, patches), max-mean(patches, text).T) with saved arg-maxima."""

    @staticmethod
    def forward(ctx, text, text_mask, patches, patch_mask):  # noqa: ANN001, ANN205 -- autograd signature
        text = text.contiguous()
        patches = patches.contiguous()
        tm = text_mask.to(torch.int8).contiguous()
        pm = (
            torch.ones(patches.shape[:2], dtype=torch.int8, device=patches.device)
            if patch_mask is None
            else patch_mask.to(torch.int8).contiguous()
        )
        t2p, arg_t = maxmean_forward(text, tm, patches, pm)  # (Bt, Bi), (Bt, Bi, L)
        p2t_t, arg_p = maxmean_forward(patches, pm, text, tm)  # (Bi, Bt), (Bi, Bt, K)
        ctx.save_for_backward(text, tm, patches, pm, arg_t, arg_p)
        return t2p.to(text.dtype), p2t_t.t().contiguous().to(text.dtype)

    @staticmethod
    def backward(ctx, g_t2p, g_p2t):  # noqa: ANN001, ANN205
        text, tm, patches, pm, arg_t, arg_p = ctx.saved_tensors
        dt1, dp1 = maxmean_backward(g_t2p.contiguous(), arg_t, text, tm, patches, pm)
        dp2, dt2 = maxmean_backward(g_p2t.t().contiguous(), arg_p, patches, pm, text, tm)
        return (dt1 + dt2).to(text.dtype), None, (dp1 + dp2).to(patches.dtype), None
