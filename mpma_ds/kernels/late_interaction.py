"""Token-patch late interaction of every (report, image) pair of a batch: the scores the local loss uses.

``late_interaction_scores(text, text_mask, patches, patch_mask)`` returns two (Bt, Bi) matrices:

- ``t2p[i, j]``: mean over report i's valid tokens of the highest cosine with image j's valid patches;
- ``p2t[i, j]``: mean over image j's valid patches of the highest cosine with report i's valid tokens
  (0 when report i has no valid token; with a patch mask, ``t2p`` is 0 for an image without a valid patch).

The local loss (``mpma_ds.models.losses``) scores pairs with ``0.5 * (t2p + p2t)``. Three implementations:

- ``reference``: the plain definition — the whole (Bt, Bi, L, K) similarity in memory (and a masked copy of
  it), so memory and time grow with B²·L·K, forward and backward;
- ``chunked``: pure PyTorch, a custom autograd Function over square blocks of pairs: the forward keeps only
  the (Bt, Bi) results, the backward recomputes each block's similarity and its arg-maxima, so beside the
  inputs, their gradients and the B² scores it never holds more than one block (``CHUNK_ELEMS`` floats);
  while the arg-maxima of all pairs fit in that budget (small batches) they are kept instead of recomputed;
- ``triton``: fused kernels (``_triton_late``): one program per pair computes the max over patches (and,
  called with the roles swapped, over tokens) tile by tile without writing the similarity, saving the
  arg-max indices (Bt, Bi, L) and (Bi, Bt, K) for a backward that scatters the gradient with them.
"""

from __future__ import annotations

import math

import torch

from mpma_ds.kernels._dispatch import resolve_impl

CHUNK_ELEMS = 1 << 22
"""Similarity elements (fp32) the chunked implementation holds per block (16 MiB; its backward holds two)."""


def late_interaction_scores(
    text: torch.Tensor,
    text_mask: torch.Tensor,
    patches: torch.Tensor,
    patch_mask: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token→patch and patch→token late-interaction scores of every (report i, image j) pair.

    Args:
        text: (Bt, L, E) token features (the local loss passes L2-normalised ones).
        text_mask: (Bt, L) bool, the tokens that count (non-special, non-padding, non-[MASK]).
        patches: (Bi, K, E) patch features.
        patch_mask: (Bi, K) bool, the patches that count; ``None`` = all of them.
        impl: ``auto`` (Triton on CUDA, chunked elsewhere), ``reference``, ``chunked`` or ``triton``.

    Returns:
        ``(t2p, p2t)``, each (Bt, Bi) in ``text``'s dtype (see the module docstring).
    """
    if text.ndim != 3 or patches.ndim != 3 or text.shape[-1] != patches.shape[-1]:
        raise ValueError(
            f"late_interaction_scores: text (Bt, L, E) and patches (Bi, K, E) must share E, got "
            f"{tuple(text.shape)} and {tuple(patches.shape)}"
        )
    if text_mask.shape != text.shape[:2]:
        raise ValueError(f"late_interaction_scores: text_mask {tuple(text_mask.shape)} != {tuple(text.shape[:2])}")
    if patch_mask is not None and patch_mask.shape != patches.shape[:2]:
        raise ValueError(
            f"late_interaction_scores: patch_mask {tuple(patch_mask.shape)} != {tuple(patches.shape[:2])}"
        )
    patches = patches.to(text.dtype)
    text_mask = text_mask.bool()
    patch_mask = None if patch_mask is None else patch_mask.bool()
    impl = resolve_impl(impl, text.device, what="late_interaction_scores")
    if impl == "reference":
        return late_interaction_reference(text, text_mask, patches, patch_mask)
    if impl == "chunked":
        return _ChunkedLateInteraction.apply(text, text_mask, patches, patch_mask)
    from mpma_ds.kernels._triton_late import TritonLateInteraction  # imports triton: optional, GPU only

    return TritonLateInteraction.apply(text, text_mask, patches, patch_mask)


def late_interaction_reference(
    text: torch.Tensor, text_mask: torch.Tensor, patches: torch.Tensor, patch_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain PyTorch definition (the code the local loss ran before ``mpma_ds.kernels``)."""
    sim = torch.einsum("ild,jkd->ijlk", text, patches)  # (Bt, Bi, L, K)
    neg = torch.finfo(sim.dtype).min
    valid = text_mask[:, None, :]  # (Bt, 1, L)
    n_valid = valid.sum(-1).clamp(min=1)  # (Bt, 1)
    sim_t = sim if patch_mask is None else sim.masked_fill(~patch_mask[None, :, None, :], neg)
    t2p = (sim_t.amax(dim=-1) * valid).sum(-1) / n_valid  # (Bt, Bi)
    if patch_mask is not None:  # an image with no valid patch scores 0
        t2p = torch.where(patch_mask.any(-1)[None, :], t2p, torch.zeros_like(t2p))
    p2t_max = sim.masked_fill(~valid[..., None], neg).amax(dim=-2)  # (Bt, Bi, K)
    has_valid = (valid.sum(-1) > 0)[..., None]  # (Bt, 1, 1): a report with no valid token scores 0
    p2t_max = torch.where(has_valid, p2t_max, torch.zeros_like(p2t_max))
    if patch_mask is None:
        p2t = p2t_max.mean(-1)  # (Bt, Bi)
    else:
        p2t = (p2t_max * patch_mask[None]).sum(-1) / patch_mask.sum(-1).clamp(min=1)[None]
    return t2p, p2t


def _block(l_len: int, k_len: int) -> int:
    """Side of a square block of pairs whose (b, b, L, K) similarity fits in ``CHUNK_ELEMS``."""
    return max(1, math.isqrt(max(1, CHUNK_ELEMS // max(1, l_len * k_len))))


def _block_maxima(
    t: torch.Tensor, tm: torch.Tensor, p: torch.Tensor, pm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's maxima and arg-maxima: over valid patches per token (bi, bj, L) and over valid tokens per
    patch (bi, bj, K), in fp32."""
    sim = torch.einsum("ild,jkd->ijlk", t.float(), p.float())  # (bi, bj, L, K)
    neg = torch.finfo(sim.dtype).min
    t_max, t_arg = sim.masked_fill(~pm[None, :, None, :], neg).max(dim=-1)  # (bi, bj, L)
    p_max, p_arg = sim.masked_fill_(~tm[:, None, :, None], neg).max(dim=-2)  # (bi, bj, K), sim reused in place
    return t_max, t_arg, p_max, p_arg


class _ChunkedLateInteraction(torch.autograd.Function):
    """Blocks of pairs; the backward recomputes each block (nothing of size B²·L·K is ever saved)."""

    @staticmethod
    def forward(ctx, text, text_mask, patches, patch_mask):  # noqa: ANN001, ANN205 -- autograd signature
        bt, l_len, _ = text.shape
        bi, k_len, _ = patches.shape
        pm = torch.ones(bi, k_len, dtype=torch.bool, device=text.device) if patch_mask is None else patch_mask
        n_t = text_mask.sum(-1).float()  # (Bt,)
        n_p = pm.sum(-1).float()  # (Bi,)
        t2p = torch.zeros(bt, bi, dtype=torch.float32, device=text.device)
        p2t = torch.zeros_like(t2p)
        step = _block(l_len, k_len)
        # the arg-maxima of every pair, kept for the backward only while they fit in one block's budget (small
        # batches then skip the backward's recomputation; large ones recompute, so memory stays bounded)
        keep_args = 2 * bt * bi * (l_len + k_len) <= CHUNK_ELEMS  # int64: two fp32 slots each
        t_args = torch.empty(bt, bi, l_len, dtype=torch.long, device=text.device) if keep_args else None
        p_args = torch.empty(bt, bi, k_len, dtype=torch.long, device=text.device) if keep_args else None
        for i0 in range(0, bt, step):
            ti, tmi = text[i0 : i0 + step], text_mask[i0 : i0 + step]
            for j0 in range(0, bi, step):
                t_max, t_arg, p_max, p_arg = _block_maxima(ti, tmi, patches[j0 : j0 + step], pm[j0 : j0 + step])
                t2p[i0 : i0 + step, j0 : j0 + step] = torch.where(tmi[:, None, :], t_max, 0.0).sum(-1)
                p2t[i0 : i0 + step, j0 : j0 + step] = torch.where(pm[None, j0 : j0 + step], p_max, 0.0).sum(-1)
                if keep_args:
                    t_args[i0 : i0 + step, j0 : j0 + step] = t_arg
                    p_args[i0 : i0 + step, j0 : j0 + step] = p_arg
        # the empty-side rules: no valid patch -> t2p 0, no valid token -> p2t 0
        t2p = torch.where((n_p > 0)[None, :], t2p / n_t.clamp(min=1)[:, None], 0.0)
        p2t = torch.where((n_t > 0)[:, None], p2t / n_p.clamp(min=1)[None, :], 0.0)
        ctx.save_for_backward(text, text_mask, patches, pm, t_args, p_args)
        return t2p.to(text.dtype), p2t.to(text.dtype)

    @staticmethod
    def backward(ctx, g_t2p, g_p2t):  # noqa: ANN001, ANN205
        text, text_mask, patches, pm, t_args, p_args = ctx.saved_tensors
        bt, l_len, _ = text.shape
        bi, k_len, _ = patches.shape
        n_t = text_mask.sum(-1).float()
        n_p = pm.sum(-1).float()
        # per-pair weights of each token's / patch's maximum in the two means (the empty-side rules give 0)
        w_t2p = g_t2p.float() * (n_p > 0)[None, :] / n_t.clamp(min=1)[:, None]  # (Bt, Bi)
        w_p2t = g_p2t.float() * (n_t > 0)[:, None] / n_p.clamp(min=1)[None, :]  # (Bt, Bi)
        d_text = torch.zeros(text.shape, dtype=torch.float32, device=text.device)
        d_patches = torch.zeros(patches.shape, dtype=torch.float32, device=text.device)
        step = _block(l_len, k_len)
        for i0 in range(0, bt, step):
            ti, tmi = text[i0 : i0 + step], text_mask[i0 : i0 + step]
            for j0 in range(0, bi, step):
                pj, pmj = patches[j0 : j0 + step], pm[j0 : j0 + step]
                if t_args is not None:
                    t_arg = t_args[i0 : i0 + step, j0 : j0 + step]
                    p_arg = p_args[i0 : i0 + step, j0 : j0 + step]
                else:
                    _, t_arg, _, p_arg = _block_maxima(ti, tmi, pj, pmj)
                wt = w_t2p[i0 : i0 + step, j0 : j0 + step, None] * tmi[:, None, :]  # (bi, bj, L)
                wp = w_p2t[i0 : i0 + step, j0 : j0 + step, None] * pmj[None, :, :]  # (bi, bj, K)
                # d score / d sim: one weight at each token's arg-max patch and each patch's arg-max token
                dsim = torch.zeros(*t_arg.shape, k_len, dtype=torch.float32, device=text.device)  # (bi,bj,L,K)
                dsim.scatter_add_(-1, t_arg[..., None], wt[..., None])
                dsim.scatter_add_(-2, p_arg[:, :, None, :], wp[:, :, None, :])
                d_text[i0 : i0 + step] += torch.einsum("ijlk,jkd->ild", dsim, pj.float())
                d_patches[j0 : j0 + step] += torch.einsum("ijlk,ild->jkd", dsim, ti.float())
        return d_text.to(text.dtype), None, d_patches.to(patches.dtype), None
