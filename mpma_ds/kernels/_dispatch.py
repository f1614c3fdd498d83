"""Which implementation a kernel call runs: ``impl`` names, ``"auto"`` resolution, Triton availability."""

from __future__ import annotations

import functools
import os

import torch

IMPLS = ("auto", "reference", "chunked", "triton")
"""Every ``impl`` a kernel accepts: ``auto`` (Triton on CUDA, chunked otherwise), ``reference`` (the plain
PyTorch definition), ``chunked`` (pure PyTorch, bounded memory) and ``triton`` (fused kernels)."""


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works (a CUDA build on a GPU machine, or any build under
    ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import time
        return False
    return True


def interpreting() -> bool:
    """Triton runs kernels in its NumPy interpreter (``TRITON_INTERPRET=1``): CPU tensors are allowed."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, device: torch.device, *, what: str) -> str:
    """The concrete implementation for ``impl`` on ``device``; a bad name or an impossible choice is a
    ``ValueError`` naming ``what`` (the kernel) and what to do instead."""
    if impl not in IMPLS:
        raise ValueError(f"{what}: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "chunked"
    if impl == "triton":
        if not triton_available():
            raise ValueError(f"{what}: impl='triton' needs the triton package; install it or use impl='chunked'")
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"{what}: impl='triton' on {device.type} tensors needs a CUDA device (or TRITON_INTERPRET=1 "
                "for the slow CPU interpreter); use impl='chunked' on CPU"
            )
    return impl
