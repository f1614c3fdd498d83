"""Attribution maps of a finding phrase read off the model itself (no local-alignment similarity): the fusion's
text -> image cross-attention (averaged, or rolled out through the fusion), the GLoRIA loss's word -> region
attention and Grad-CAM of the contrastive / ITM score. `grounding_maps` scores them beside the local
similarity; `grounding.evaluate_grounding(map=...)` plays the pointing game with them. This module imports
nothing from `grounding` (that one imports it).

Each map registers in `GROUNDING_MAPS` where it is defined here: ``name -> fn(net, images, ids, mask, own) ->
(B, Hp, Wp)`` (``own``: the phrase's own tokens), with ``available`` (``net -> bool``) in its entry's meta when
only some models can give it, and ``tokenizer=True`` when it needs the tokenizer (passed as ``tokenizer=``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from data_tools.registry import Registry


def _module(model: Any) -> Any:
    return model if hasattr(model, "grounding") else model.module


GROUNDING_MAPS: Registry[Callable[..., torch.Tensor]] = Registry(
    "grounding map", "mpma_ds.grounding_maps", builtins=("mpma_ds.eval.prior_maps",)
)
"""Maps read off the model (every map but ``similarity``, which `grounding_maps` computes from the local
alignment's features): name -> ``fn(net, images, ids, mask, own) -> (B, Hp, Wp)``. `eval.prior_maps` adds the
similarity with the location prior taken out (``similarity_contrast``, ``similarity_zscore``,
``similarity_neutral``, ``similarity_findings``)."""


def _has_itm(net: Any) -> bool:
    return getattr(net, "itm_head", None) is not None


def _has_word_attention(net: Any) -> bool:
    return callable(getattr(getattr(net, "local_loss", None), "attention", None))


def available_maps(model: Any) -> tuple[str, ...]:
    """The maps ``model`` can give (``gradcam_itm`` needs an ITM head, ``gloria_attention`` the GLoRIA loss)."""
    net = _module(model)
    return ("similarity",) + tuple(
        e.name for e in GROUNDING_MAPS if e.meta.get("available") is None or e.meta["available"](net)
    )


def text_limit(net: Any) -> int | None:
    """The longest text (tokens, [CLS]/[SEP] included) ``net`` reads: its config's ``max_text_len``; None for a
    model that declares none (a hand-made model in a test)."""
    return getattr(getattr(net, "config", None), "max_text_len", None)


def _tokenise(
    tokenizer: Any, phrases: Sequence[str], device: Any, *, max_len: int | None = None, allow_empty: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, L) ids, attention mask and the bool mask of the phrase's own tokens (no [CLS]/[SEP]/padding, no
    [UNK]: special). A phrase with none is refused unless ``allow_empty`` (its row of the mask is then empty);
    one longer than ``max_len`` tokens ([CLS]/[SEP] included: the model's ``max_text_len``) is refused."""
    enc = tokenizer(list(phrases), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if max_len is not None:
        lengths = mask.sum(dim=1).tolist()
        for phrase, n in zip(phrases, lengths):
            if n > max_len:
                short = phrase if len(phrase) <= 60 else phrase[:57] + "..."
                raise ValueError(f"phrase {short!r} is {n} tokens long with [CLS]/[SEP]; this model reads at most "
                                 f"{max_len} (its max_text_len): shorten the phrase")  # fmt: skip
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    own = mask.bool() & ~torch.isin(ids, special)  # (P, L)
    if not allow_empty and not own.any(dim=1).all():
        empty = phrases[int((~own.any(dim=1)).nonzero()[0])]
        raise ValueError(f"phrase {empty!r} has no token besides the special ones ([CLS], [SEP], [UNK])")
    return ids.to(device), mask.to(device), own.to(device)


def attention_probs(
    module: torch.nn.Module, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, H, Lq, Lk) softmax(QK^T / sqrt(d)) of a `MultiHeadAttention` on its inputs; ``key_mask`` (B, Lk) bool,
    True = attended, as the module takes it (the text stream's cross-attention has none)."""
    b, lq, _ = x.shape
    h, hd = module.heads, module.head_dim
    q = module.q(x).view(b, lq, h, hd).transpose(1, 2)  # (B, H, Lq, hd)
    k = module.kv(context).view(b, -1, 2, h, hd)[:, :, 0].transpose(1, 2)  # (B, H, Lk, hd)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)  # (B, H, Lq, Lk)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)


def _fusion_inputs(
    net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fusion's text and image streams of unmasked images and phrases: (B, L, D), (B, 1+N, D)."""
    img = net.image_encoder(images)  # (B, 1+N, Dv)
    txt = net.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, Dt)
    t_type = torch.zeros_like(ids[:, :1])
    t = net.text_to_fusion(txt) + net.modality_embed(t_type)  # (B, L, D)
    v = net.image_to_fusion(img) + net.modality_embed(t_type + 1)  # (B, 1+N, D)
    return t, v


def _visual_keys(a: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) or (..., 2n) weights of the text stream's cross-attention over [V] or [V ; g*R] -> (..., n): the
    weight on patch i's memory response is added to patch i's (both are read off patch i)."""
    return a[..., :n] + a[..., n:] if a.shape[-1] == 2 * n else a


def _phrase_grid(per_token: torch.Tensor, own: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, L, N) per-token maps -> (B, h, w) CPU: their mean over each phrase's own tokens."""
    weights = own.float().unsqueeze(-1)  # (B, L, 1)
    grid = (per_token.float() * weights).sum(1) / weights.sum(1)  # (B, N)
    return grid.reshape(-1, h, w).cpu()


@GROUNDING_MAPS.register("cross_attention")
@torch.no_grad()
def cross_attention_grids(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                          own: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) text -> image cross-attention of each image's phrase (row b of ``ids``) over its patches,
    averaged over heads, layers and the phrase's tokens ([CLS] key left out)."""
    b, _, h, w = images.shape
    p = net.config.patch_size
    t, v = _fusion_inputs(net, images, ids, mask)
    probs: list[torch.Tensor] = []

    def keep(module, args, output):  # noqa: ANN001, ANN202, ARG001
        probs.append(attention_probs(module, args[0], args[1]).mean(dim=1).float())  # (B, L, Lk)

    hooks = [layer.t_cross.register_forward_hook(keep) for layer in net.fusion.layers]
    try:
        net.fusion(t, mask.bool(), v)
    finally:
        for hook in hooks:
            hook.remove()
    n = v.shape[1]  # 1 + N keys of the image stream
    attn = torch.stack([_visual_keys(a, n)[..., 1:] for a in probs]).mean(0)  # (B, L, N): [CLS] key left out
    return _phrase_grid(attn, own, h // p, w // p)


@GROUNDING_MAPS.register("attention_rollout")
@torch.no_grad()
def attention_rollout_grids(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                            own: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) attention rollout (Abnar & Zuidema 2020) of each phrase token over the image's input patches,
    through every fusion layer, averaged over the phrase's tokens.

    Each token's relevance over the fusion's inputs (L text + 1+N image tokens) starts as the identity and is
    carried through each layer's four attentions, heads averaged, each with its residual as an identity of
    equal weight (``0.5 * R + 0.5 * A @ R``): the text self-attention, the image self-attention, then the two
    cross-attentions on the streams both read before either is updated (text -> image [V ; g*R] with a memory
    response counted as its patch's, image -> text). The FFNs mix no tokens. The map is the text tokens'
    relevance over the image's patch inputs ([CLS] left out).
    """
    b, _, h, w = images.shape
    p = net.config.patch_size
    t, v = _fusion_inputs(net, images, ids, mask)
    probs: dict[str, list[torch.Tensor]] = {"t_self": [], "v_self": [], "t_cross": [], "v_cross": []}

    def keeper(name: str) -> Callable[..., None]:
        def keep(module, args, kwargs, output):  # noqa: ANN001, ARG001
            context = args[1] if len(args) > 1 else kwargs.get("context")
            key_mask = kwargs.get("key_mask", args[2] if len(args) > 2 else None)
            context = args[0] if context is None else context
            probs[name].append(attention_probs(module, args[0], context, key_mask).mean(dim=1).float())

        return keep

    hooks = [
        getattr(layer, name).register_forward_hook(keeper(name), with_kwargs=True)
        for layer in net.fusion.layers
        for name in probs
    ]
    try:
        net.fusion(t, mask.bool(), v)
    finally:
        for hook in hooks:
            hook.remove()
    lt, n = t.shape[1], v.shape[1]
    eye = torch.eye(lt + n, device=t.device).expand(b, -1, -1)
    r_t, r_v = eye[:, :lt], eye[:, lt:]  # (B, L, L+n), (B, n, L+n): relevance over the fusion's inputs
    for a_tt, a_vv, a_tv, a_vt in zip(probs["t_self"], probs["v_self"], probs["t_cross"], probs["v_cross"]):
        r_t = 0.5 * r_t + 0.5 * a_tt @ r_t
        r_v = 0.5 * r_v + 0.5 * a_vv @ r_v
        r_t, r_v = 0.5 * r_t + 0.5 * _visual_keys(a_tv, n) @ r_v, 0.5 * r_v + 0.5 * a_vt @ r_t
    return _phrase_grid(r_t[:, :, lt + 1 :], own, h // p, w // p)  # (B, L, N): the image's patch inputs


@GROUNDING_MAPS.register("gloria_attention", available=_has_word_attention)
@torch.no_grad()
def gloria_attention_grids(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                           own: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) the GLoRIA local loss's word -> region attention (`models.gloria.word_region_attention`) of
    each phrase token over its image's patches, averaged over the phrase's tokens (``local_loss: gloria``)."""
    if not _has_word_attention(net):
        raise ValueError("gloria_attention needs a model trained with local_loss: gloria")
    patches = net.patch_embeddings(images)  # (B, Hp, Wp, E)
    tokens = net.token_embeddings(ids, mask)  # (B, L, E)
    attn = net.local_loss.attention(tokens, patches.flatten(1, 2))  # (B, L, N)
    return _phrase_grid(attn, own, patches.shape[1], patches.shape[2])


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
                if not _has_itm(net):
                    raise ValueError("gradcam_itm needs a model with an ITM head (w_itm > 0)")
                t, v = _fusion_inputs(net, images, ids, mask)
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


@GROUNDING_MAPS.register("gradcam_itc")
def gradcam_itc_grids(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                      own: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Grad-CAM of the global contrastive score (`gradcam_grids`, ``score="itc"``)."""
    return gradcam_grids(net, images, ids, mask, score="itc")


@GROUNDING_MAPS.register("gradcam_itm", available=_has_itm)
def gradcam_itm_grids(net: Any, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                      own: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Grad-CAM of the ITM logit (`gradcam_grids`, ``score="itm"``); only with an ITM head."""
    return gradcam_grids(net, images, ids, mask, score="itm")


def __getattr__(name: str) -> tuple[str, ...]:
    """``MAPS``: every map `grounding_maps.phrase_grids` computes — the local similarity, then the registered
    ones (``gradcam_itm`` only for a model with an ITM head, ``gloria_attention`` only with ``local_loss:
    gloria``, the `prior_maps` only with a fitted prior). Computed when first asked for, not at import: the
    registry's builtin `prior_maps` imports this module, so a tuple built here could miss its maps."""
    if name == "MAPS":
        return ("similarity", *GROUNDING_MAPS.names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_grids(model: Any, tokenizer: Any, images: torch.Tensor, phrases: Sequence[str], *, map: str,
                device: Any = "cpu") -> torch.Tensor:  # fmt: skip
    """(B, Hp, Wp) float32 CPU ``map`` (a `GROUNDING_MAPS` name) of ``phrases[b]`` on image ``b``, in eval mode."""
    net = _module(model)
    if map not in GROUNDING_MAPS:
        raise ValueError(f"map must be one of {', '.join(GROUNDING_MAPS.names())}, got {map!r}")
    dtype = next(net.parameters()).dtype
    images = images.to(device=device, dtype=dtype)
    was_training = net.training
    net.eval()
    try:
        ids, mask, own = _tokenise(tokenizer, phrases, device, max_len=text_limit(net))
        entry = GROUNDING_MAPS.get(map)
        extra = {"tokenizer": tokenizer} if entry.meta.get("tokenizer") else {}  # a map that tokenises more text
        return entry.obj(net, images, ids, mask, own, **extra).float().cpu()
    finally:
        net.train(was_training)
