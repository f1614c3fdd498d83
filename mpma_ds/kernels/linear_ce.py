"""Mean cross-entropy of a linear layer's logits without the (N, V) logits in memory: the MLM loss.

``linear_cross_entropy(hidden, weight, bias, labels)`` = ``F.cross_entropy(hidden @ weight.T + bias, labels,
ignore_index=...)`` over the rows whose label is not ``ignore_index`` (logits in fp32, as the MLM head always
computed them). Three implementations:

- ``reference``: ``F.linear`` + ``F.cross_entropy`` on the whole (N, V) matrix — its fp32 copy, the saved
  log-softmax and the logits' gradient are each N x V floats;
- ``chunked``: pure PyTorch, a custom autograd Function over vocabulary chunks with an online log-sum-exp;
  the forward keeps one (N, chunk) block and the per-row log-sum-exp (and under autocast the weight, cast once
  to the compute dtype for every chunk of both passes), the backward recomputes each chunk's
  logits (unless one chunk holds the whole vocabulary: then it keeps that one), turns them into the softmax gradient in place and multiplies it out (dh, dW, db per chunk);
- ``triton``: the same chunks, the logits' matmul left to cuBLAS, the online log-sum-exp + target pick and
  the softmax-gradient of a chunk each one fused Triton kernel (``_triton_ce``), instead of five passes.

Rows whose label is ``ignore_index`` are projected like the others and weigh 0 (the MLM head drops them
before the call unless ``mlm_masked_only`` is off, the baseline that projects every position). When every label
is ignored the loss is 0 (not ``F.cross_entropy``'s NaN), still connected to ``hidden``, ``weight`` and
``bias`` so every parameter receives a (zero) gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpma_ds.kernels._dispatch import resolve_impl

CE_CHUNK_ELEMS = 1 << 20
"""Logit elements (fp32) one vocabulary chunk holds: the chunk width is this over the number of rows, in
[512, 8192] (4 MiB; the backward holds the chunk and its gradient)."""


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    impl: str = "auto",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, ignoring ``ignore_index``.

    Args:
        hidden: (..., D) features (any leading shape).
        weight: (V, D) output projection (the MLM head passes the tied word-embedding matrix).
        bias: (V,) or ``None``.
        labels: (...) int64 class ids in [0, V) or ``ignore_index``, ``hidden``'s leading shape.
        impl: ``auto`` (Triton on CUDA, chunked elsewhere), ``reference``, ``chunked`` or ``triton``.

    Returns:
        The scalar mean loss over non-ignored rows, fp32 (0 when every row is ignored).
    """
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[-1] or weight.ndim != 2:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels "
            f"{tuple(labels.shape)} do not fit (hidden (..., D), weight (V, D), labels (...))"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_cross_entropy: bias {tuple(bias.shape)} != ({weight.shape[0]},)")
    impl = resolve_impl(impl, hidden.device, what="linear_cross_entropy")
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    labels = labels.reshape(-1)  # (N,)
    if impl == "reference":
        return linear_cross_entropy_reference(hidden, weight, bias, labels, ignore_index=ignore_index)
    keep = labels != ignore_index  # (N,)
    if not bool(keep.any()):
        return _zero_touching(hidden, weight, bias)
    if bool((keep & ((labels < 0) | (labels >= weight.shape[0]))).any()):
        raise ValueError(f"linear_cross_entropy: a label is outside [0, {weight.shape[0]}) and not ignore_index")
    labels = torch.where(keep, labels, -1)  # an ignored row matches no vocabulary column
    return _ChunkedLinearCE.apply(hidden, weight, bias, labels, impl == "triton")


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The whole (N, V) logits, ``F.cross_entropy`` in fp32 (the MLM head's code before ``mpma_ds.kernels``)."""
    logits = F.linear(hidden, weight, bias)  # (N, V)
    if not bool((labels != ignore_index).any()):
        return logits.sum().float() * 0.0  # no target: zero loss that still touches the head
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


def _zero_touching(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    zero = (hidden.sum() + weight.sum()).float() * 0.0
    return zero if bias is None else zero + bias.sum().float() * 0.0


def _autocast_on(t: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(t.device.type)


def _chunk_width(rows: int, vocab: int) -> int:
    return min(vocab, max(512, min(8192, CE_CHUNK_ELEMS // max(1, rows))))


class _ChunkedLinearCE(torch.autograd.Function):
    """Vocabulary chunks, online log-sum-exp; the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, use_triton):  # noqa: ANN001, ANN205 -- autograd signature
        rows, vocab = hidden.shape[0], weight.shape[0]
        width = _chunk_width(rows, vocab)
        run_max = torch.full((rows,), float("-inf"), dtype=torch.float32, device=hidden.device)
        run_sum = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        target = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        if use_triton:
            from mpma_ds.kernels._triton_ce import lse_update  # imports triton: optional, GPU only
        saved_logits = None
        # Under autocast F.linear runs in the autocast dtype (bf16 inputs, whatever `weight` is). The operands are
        # cast to it here once — not per chunk by autocast, and twice more per chunk in the backward, which runs
        # outside autocast — and the backward reuses the cast weight (V x D in bf16 beside the fp32 one).
        cd = torch.get_autocast_dtype(hidden.device.type) if _autocast_on(hidden) else hidden.dtype
        w_mm, h_mm = weight.to(cd), hidden.to(cd)  # no copy outside autocast
        b_mm = None if bias is None else bias.to(cd)
        for v0 in range(0, vocab, width):
            v1 = min(vocab, v0 + width)
            logits = F.linear(h_mm, w_mm[v0:v1], None if b_mm is None else b_mm[v0:v1]).float()  # (N, C)
            if width >= vocab:  # one chunk holds the whole vocabulary: keep it, the backward needs no recompute
                saved_logits = logits
            if use_triton:
                lse_update(logits, labels, v0, run_max, run_sum, target)
                continue
            local = labels - v0
            inside = (local >= 0) & (local < v1 - v0)
            target += torch.where(inside, logits.gather(1, local.clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
            run_max = new_max
        lse = run_max + torch.log(run_sum)  # (N,)
        keep = labels >= 0
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.mm_operands = (w_mm, h_mm, b_mm)  # the inputs themselves when no cast was needed
        ctx.saved_logits = saved_logits
        ctx.use_triton = use_triton
        return torch.where(keep, lse - target, 0.0).sum() / keep.sum()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        rows, vocab = hidden.shape[0], weight.shape[0]
        width = _chunk_width(rows, vocab)
        keep = labels >= 0
        scale = (grad.float() / keep.sum()) * keep  # (N,): 0 on ignored rows
        need_w, need_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        d_weight = torch.empty_like(weight) if need_w else None
        d_bias = torch.empty_like(bias) if need_b else None
        if ctx.use_triton:
            from mpma_ds.kernels._triton_ce import softmax_grad  # imports triton: optional, GPU only
        w_mm, h_mm, b_mm = ctx.mm_operands
        ctx.mm_operands = None
        for v0 in range(0, vocab, width):
            v1 = min(vocab, v0 + width)
            w_c = w_mm[v0:v1]
            if ctx.saved_logits is not None:
                logits, ctx.saved_logits = ctx.saved_logits, None  # used (and changed in place) once
            else:
                b_c = None if b_mm is None else b_mm[v0:v1]
                logits = F.linear(h_mm, w_c, b_c).float()  # (N, C), as the forward computed it
            if ctx.use_triton:
                g = softmax_grad(logits, labels, v0, lse, scale, hidden.dtype)  # (N, C) in hidden's dtype
            else:
                g = logits.sub_(lse[:, None]).exp_().mul_(scale[:, None])  # softmax * scale, in place
                local = labels - v0
                inside = keep & (local >= 0) & (local < v1 - v0)
                rows_in = inside.nonzero()[:, 0]
                g[rows_in, local[rows_in]] -= scale[rows_in]
                g = g.to(hidden.dtype)
            w_g = w_c if w_c.dtype == g.dtype else weight[v0:v1].to(g.dtype)  # fp32 hidden: the fp32 weight
            d_hidden += (g @ w_g).float()
            h_g = h_mm if h_mm.dtype == g.dtype else hidden.to(g.dtype)
            if need_w and g.dtype == weight.dtype:
                torch.mm(g.t(), h_g, out=d_weight[v0:v1])  # straight into the gradient
            elif need_w:
                d_weight[v0:v1].copy_(g.t() @ h_g)  # cast while copying, not into a temporary first
            if need_b:
                d_bias[v0:v1] = g.float().sum(0).to(bias.dtype)
        return d_hidden.to(hidden.dtype), d_weight, d_bias, None, None
