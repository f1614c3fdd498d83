"""``compile_blocks``: ``torch.compile`` per transformer block (the recipe's ``train.compile``).

Per block, not the whole model: each block is one small graph that every layer of its stack reuses (the
layers share their code, so a stack compiles once), graph breaks stay inside a block, and the hooks around a
block — ZeRO-3's parameter gather / release, activation checkpointing's ``checkpoint(block, ...)`` — run
outside the compiled code, as they do in eager mode. The blocks are the ViT's and MAE decoder's timm
``Block``, MA-CMF's ``FusionLayer`` and the text encoder's BERT / RoBERTa layers, wherever they sit in the
module (MPMA itself or a fine-tuning task around it).
"""

from __future__ import annotations

from torch import nn

from mpma_ds.models.fusion import FusionLayer

COMPILE_KWARGS: dict = {}
"""Default ``torch.compile`` options of ``compile_blocks`` (empty: inductor, the default mode)."""

BLOCK_CLASS_NAMES = ("Block", "FusionLayer", "BertLayer", "RobertaLayer")
"""Class names of the transformer blocks ``compile_blocks`` compiles (timm ViT / MAE decoder, MA-CMF, HF)."""


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of ``model``: the ``repeated_blocks()`` of each backbone it holds (the backbone
    interface: ``MPMA.repeated_blocks``), else — for a module that does not declare its blocks — the blocks
    found by class name, outermost first (a block inside a block is not listed)."""
    declared = [m for m in model.modules() if callable(getattr(m, "repeated_blocks", None))]
    if declared:
        return [block for m in declared for block in m.repeated_blocks()]
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, FusionLayer) or type(module).__name__ in BLOCK_CLASS_NAMES:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def compile_blocks(model: nn.Module, enable: bool, **compile_kwargs) -> int:
    """``torch.compile`` each transformer block's ``forward`` in place when ``enable``; returns how many.

    Parameter names, the state dict and checkpoints are unchanged (only ``forward`` is replaced); a block
    already compiled is left as it is. ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode``).
    """
    if not enable:
        return 0
    import torch

    count = 0
    for block in transformer_blocks(model):
        if getattr(block, "_mpma_compiled", False):
            continue
        block.forward = torch.compile(block.forward, **{**COMPILE_KWARGS, **compile_kwargs})
        block._mpma_compiled = True
        count += 1
    return count
