"""Fused / memory-bounded kernels of MPMA's losses, one stable API the model and the benchmarks call.

- ``late_interaction_scores(text, text_mask, patches, patch_mask, *, impl)`` → ``(t2p, p2t)``, each (B, B):
  the token-patch scores of the local alignment loss;
- ``linear_cross_entropy(hidden, weight, bias, labels, *, impl, ignore_index)`` → the mean MLM loss of a
  vocabulary projection without the full logits.

``impl``: ``"auto"`` (Triton on CUDA, chunked elsewhere), ``"reference"`` (the plain PyTorch definition),
``"chunked"`` (pure PyTorch, memory bounded by a block), ``"triton"`` (fused kernels; on CPU only under
``TRITON_INTERPRET=1``). The model picks one with ``MPMAConfig.kernel_impl``. Triton is imported only when a
``triton`` implementation runs, so this package (and ``mpma_ds.models``) imports without it.
"""

from mpma_ds.kernels._dispatch import IMPLS, resolve_impl, triton_available
from mpma_ds.kernels.late_interaction import late_interaction_reference, late_interaction_scores
from mpma_ds.kernels.linear_ce import linear_cross_entropy, linear_cross_entropy_reference

__all__ = [
    "IMPLS",
    "late_interaction_reference",
    "late_interaction_scores",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "resolve_impl",
    "triton_available",
]
