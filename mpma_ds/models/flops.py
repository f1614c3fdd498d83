"""Model FLOPs of one training step, counted by `torch.utils.flop_counter.FlopCounterMode`.

The count is measured, not analytic: the real forward and backward run once on the given batch under
`FlopCounterMode`, which adds up matmul / convolution / attention FLOPs (2 per multiply-add) of every aten
op, backward included. Element-wise work (norms, softmax, GELU) is not counted, as in the usual MFU
convention. The backward goes through `torch.autograd.grad`, so parameters' `.grad` are left untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def training_flops_per_sample(model: nn.Module, batch: dict[str, Any], *, seed: int = 0) -> float:
    """Forward + backward FLOPs of one sample of `batch` for `model` (an unwrapped `MPMA`).

    Call it on the plain module (not a ZeRO-3 engine: partitioned parameters would read as empty). The
    result depends on the batch shapes (image size, text length) and on the masked-token count.
    """
    images = batch["image"]
    generator = torch.Generator(device=images.device).manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    with FlopCounterMode(display=False) as counter:
        with torch.enable_grad():
            loss = model(batch, generator=generator)["loss"]
            torch.autograd.grad(loss, params, allow_unused=True)
    return float(counter.get_total_flops()) / images.shape[0]
