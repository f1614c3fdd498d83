"""Attribution maps of a finding phrase read off the model itself (no local-alignment features): the fusion's
text -> image cross-attention and Grad-CAM of the contrastive / ITM score. `grounding_maps` scores them beside
the local similarity; `grounding.evaluate_grounding(map=...)` plays the pointing game with them. This module
imports nothing from `grounding` (that one imports it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def _module(model: Any) -> Any:
    return model if hasattr(model, "grounding") else model.module


MAPS: tuple[str, ...] = ("similarity", "cross_attention", "gradcam_itc", "gradcam_itm")
"""Every map `phrase_grids` computes (``gradcam_itm`` only for a model with an ITM head)."""


def available_maps(model: Any) -> tuple[str, ...]:
    """The maps ``model`` can give (``gradcam_itm`` needs an ITM head)."""
    net = _module(model)
    return tuple(m for m in MAPS if m != "gradcam_itm" or getattr(net, "itm_head", None) is not None)


def _tokenise(
    tokenizer: Any, phrases: Sequence[str], device: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, L) ids, attention mask and the bool mask of the phrase's own tokens (no [CLS]/[SEP]/padding)."""
    enc = tokenizer(list(phrases), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    own = mask.bool() & ~torch.isin(ids, special)  # (P, L)
    if not own.any(dim=1).all():
        raise ValueError(f"a phrase of {list(phrases)} has no token besides the special ones")
    return ids.to(device), mask.to(device), own.to(device)


def attention_probs(module: torch.nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq, Lk) softmax(QK^T / sqrt(d)) of a `MultiHeadAttention` on its inputs (the text stream's
    cross-attention takes no key mask: every visual key is attended)."""
    b, lq, _ = x.shape
    h, hd = module.heads, module.head_dim
    q = module.q(x).view(b, lq, h, hd).transpose(1, 2)  # (B, H, Lq, hd)
    k = module.kv(context).view(b, -1, 2, h, hd)[:, :, 0].transpose(1, 2)  # (B, H, Lk, hd)
    return ((q @ k.transpose(-2, -1)) / math.sqrt(hd)).softmax(dim=-1)


@torch.no_grad()
def cross_attention_grids(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                          own: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) text -> image cross-attention of each image's phrase (row b of ``ids``) over its patches."""
    b, _, h, w = images.shape
    p = net.config.patch_size
    img = net.image_encoder(images)  # (B, 1+N, Dv)
    txt = net.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, Dt)
    t_type = torch.zeros_like(ids[:, :1])
    t = net.text_to_fusion(txt) + net.modality_embed(t_type)  # (B, L, D)
    v = net.image_to_fusion(img) + net.modality_embed(t_type + 1)  # (B, 1+N, D)
    probs: list[torch.Tensor] = []

    def keep(module, args, output):  # noqa: ANN001, ANN202, ARG001
        probs.append(attention_probs(module, args[0], args[1]).mean(dim=1).float())  # (B, L, Lk)

    hooks = [layer.t_cross.register_forward_hook(keep) for layer in net.fusion.layers]
    try:
        net.fusion(t, mask.bool(), v)
    finally:
        for hook in hooks:
            hook.remove()
    n = img.shape[1]  # 1 + N keys of the image stream
    per_layer = []
    for a in probs:  # (B, L, 1+N) or (B, L, 2(1+N)) with the memory's responses concatenated
        if a.shape[-1] == 2 * n:
            a = a[..., :n] + a[..., n:]
        per_layer.append(a[..., 1:])  # (B, L, N): the [CLS] key left out
    attn = torch.stack(per_layer).mean(0)  # (B, L, N)
    weights = own.float().unsqueeze(-1)  # (B, L, 1)
    grid = (attn * weights).sum(1) / weights.sum(1)  # (B, N)
    return grid.reshape(b, h // p, w // p).cpu()


def gradcam_grids(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  score: str = "itc") -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) Grad-CAM of each image's score with its phrase on the last ViT block's patch tokens.

    ``score``: ``"itc"`` = the cosine of the global embeddings (`encode_image` . `encode_text`), ``"itm"`` = the
    ITM head's positive-minus-negative logit of the fused pair. Gradients are taken with respect to the
    activations only (`torch.autograd.grad`): no parameter's ``.grad`` is touched.
    """
    b, _, h, w = images.shape
    p = net.config.patch_size
    acts: list[torch.Tensor] = []

    def keep(module, args, output):  # noqa: ANN001, ANN202, ARG001
        acts.append(output)

    hook = net.image_encoder.blocks[-1].register_forward_hook(keep)
    try:
        with torch.enable_grad():
            images = images.detach().requires_grad_(True)  # so the graph reaches the blocks even if frozen
            if score == "itc":
                img = net.encode_image(images)  # (B, E)
                txt = net.encode_text(ids, mask)  # (B, E)
                value = (img * txt).sum(-1)  # (B,)
            elif score == "itm":
                if getattr(net, "itm_head", None) is None:
                    raise ValueError("gradcam_itm needs a model with an ITM head (w_itm > 0)")
                feats = net.image_encoder(images)  # (B, 1+N, Dv)
                txt = net.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                t_type = torch.zeros_like(ids[:, :1])
                t = net.text_to_fusion(txt) + net.modality_embed(t_type)
                v = net.image_to_fusion(feats) + net.modality_embed(t_type + 1)
                t, v = net.fusion(t, mask.bool(), v)
                logits = net.itm_head(torch.cat([t[:, 0], v[:, 0]], -1)).float()  # (B, 2)
                value = logits[:, 1] - logits[:, 0]
            else:
                raise ValueError(f"score must be 'itc' or 'itm', got {score!r}")
            act = acts[0]  # (B, 1+N, Dv)
            (grad,) = torch.autograd.grad(value.sum(), act)  # each image's score depends on its own image only
    finally:
        hook.remove()
    act, grad = act[:, 1:].detach().float(), grad[:, 1:].float()  # (B, N, Dv): patch tokens
    cam = torch.relu((act * grad.mean(dim=1, keepdim=True)).sum(-1))  # (B, N)
    return cam.reshape(b, h // p, w // p).cpu()


def model_grids(model: Any, tokenizer: Any, images: torch.Tensor, phrases: Sequence[str], *, map: str,
                device: Any = "cpu") -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) float32 CPU ``map`` ("cross_attention", "gradcam_itc", "gradcam_itm") of ``phrases[b]`` on
    image ``b``, in eval mode."""
    net = _module(model)
    if map not in MAPS or map == "similarity":
        raise ValueError(f"map must be one of {', '.join(MAPS[1:])}, got {map!r}")
    dtype = next(net.parameters()).dtype
    images = images.to(device=device, dtype=dtype)
    was_training = net.training
    net.eval()
    try:
        ids, mask, own = _tokenise(tokenizer, phrases, device)
        if map == "cross_attention":
            return cross_attention_grids(net, images, ids, mask, own)
        return gradcam_grids(net, images, ids, mask, score=map.removeprefix("gradcam_"))
    finally:
        net.train(was_training)
