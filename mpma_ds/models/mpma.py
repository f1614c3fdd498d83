"""MPMA: paired masking, GLA alignment, MA-CMF fusion, MAE + MLM heads (SPEC §5 / §5a)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from mpma_ds.models.config import ATTN_IMPLS, MPMAConfig
from mpma_ds.models.fusion import MACMFFusion, MultiHeadAttention
from mpma_ds.models.heads import MAEDecoder, MLMHead
from mpma_ds.models.image_encoder import build_image_encoder, patchify, random_masking, save_timm_local_dir
from mpma_ds.models.losses import GlobalContrastiveLoss, masked_patch_mse
from mpma_ds.models.registry import LOCAL_LOSSES
from mpma_ds.models.text_encoder import build_text_encoder, resolve_text_init

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


_ENCODER_TOP = 64  # depth above any encoder block index (ViT-B and RoBERTa-base have 12)
_FUSION_TOP = 32  # fusion norms above any fusion layer


def _block_index(inner: str, stacks: tuple[str, ...]) -> int | None:
    """The block index in a parameter name under one of ``stacks`` (``blocks.3.attn.qkv.weight`` -> 3)."""
    parts = inner.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in stacks and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


class AlignmentFeatures(NamedTuple):
    """What ``MPMA.alignment_features`` returns (embeddings L2-normalised, ``embed_dim`` wide)."""

    image: torch.Tensor
    """(B, E) global image embeddings."""
    text: torch.Tensor
    """(B, E) global report embeddings."""
    patches: torch.Tensor | None = None
    """(B, N, E) patch embeddings (``local``)."""
    tokens: torch.Tensor | None = None
    """(B, L, E) token embeddings (``local``)."""
    token_mask: torch.Tensor | None = None
    """(B, L) bool: the tokens of the local alignment (no [CLS], [SEP], padding)."""


class MPMA(nn.Module):
    """The MPMA model. `forward(batch)` returns the pretraining loss dict; see SPEC §5a for the API."""

    def __init__(self, config: MPMAConfig) -> None:
        super().__init__()
        config = resolve_text_init(config)
        self.config = config
        self.rank, self.world_size = 0, 1
        d = config.fusion_width

        self.image_encoder = build_image_encoder(config)
        self.text_encoder = build_text_encoder(config)
        # Projections to the GLA embedding space (shared by the global and local terms) ...
        self.image_proj = nn.Linear(config.vision_width, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim, bias=False)
        self.global_loss = GlobalContrastiveLoss(config.init_temperature, config.max_logit_scale)
        self.local_loss = LOCAL_LOSSES[config.local_loss](
            config.init_temperature, config.max_logit_scale, kernel_impl=config.kernel_impl
        )
        # ... and to the fusion width, plus modality-type embeddings (0 = text, 1 = image).
        self.text_to_fusion = nn.Linear(config.text_width, d)
        self.image_to_fusion = nn.Linear(config.vision_width, d)
        self.modality_embed = nn.Embedding(2, d)
        self.fusion = MACMFFusion(config)
        words = self.text_encoder.get_input_embeddings() if config.tie_mlm_weights else None
        self.mlm_head = MLMHead(config, words)
        self.mae_decoder = MAEDecoder(config)
        self.itm_head = nn.Linear(2 * d, 2) if config.w_itm > 0 else None
        for module in (
            self.image_proj,
            self.text_proj,
            self.text_to_fusion,
            self.image_to_fusion,
            self.fusion,
            self.mlm_head.dense,
            self.itm_head,
        ):
            if module is not None:
                module.apply(_init_linear)
        nn.init.trunc_normal_(self.modality_embed.weight, std=0.02)
        nn.init.zeros_(self.mlm_head.decoder.bias)
        self.set_grad_checkpointing(config.grad_checkpointing)
        self.set_attn_impl(config.attn_impl)

    # ------------------------------------------------------------------------------------------ switches
    def set_distributed(self, rank: int, world_size: int) -> None:
        """Set the data-parallel group the global InfoNCE gathers negatives over (default 1 process)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} / world_size {world_size}")
        self.rank, self.world_size = rank, world_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per transformer block (non-reentrant) in every stack."""
        for stack in (self.image_encoder, self.fusion, self.mae_decoder):
            if stack is not None:  # None: dropped by `retain`
                stack.block_checkpointing = enable
        text = self.text_encoder
        if text is None:
            pass
        elif hasattr(text, "activation_checkpointing_enable"):  # transformers >= 5.x names
            if enable:
                text.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                text.activation_checkpointing_disable()
        elif enable:
            text.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            text.gradient_checkpointing_disable()
        self.grad_checkpointing = enable

    def set_attn_impl(self, impl: str) -> None:
        """Switch every attention in place: "sdpa", "eager" or "auto" (SDPA when the parameters are on CUDA,
        eager elsewhere; re-decided whenever the model is moved, see `_apply`). Same weights, same values to
        rounding."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {impl!r}")
        self._attn_choice = impl
        if impl == "auto":
            param = next(self.parameters(), None)
            impl = "sdpa" if param is not None and param.device.type == "cuda" else "eager"
        for stack in (self.image_encoder, self.mae_decoder):
            if stack is not None:
                stack.set_attn_impl(impl)
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.attn_impl = impl
        if self.text_encoder is not None and self.text_encoder.config._attn_implementation != impl:
            self.text_encoder.set_attn_implementation(impl)
        self.attn_impl = impl

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 -- nn.Module's hook for .to() / .cuda() / .cpu()
        out = super()._apply(fn, recurse)
        if getattr(self, "_attn_choice", None) == "auto":
            self.set_attn_impl("auto")  # follow the device
        return out

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: norms, biases, embeddings, tokens, memory, temperatures."""
        names = set()
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim <= 1 or leaf in ("pos_embed", "cls_token", "mask_token", "memory", "log_scale"):
                names.add(name)
            elif "embeddings" in name or name.startswith("modality_embed"):
                names.add(name)
        return names

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per top-level component (a tied weight counted once, where it is first named) + total."""
        counts: dict[str, int] = {}
        for name, p in self.named_parameters():  # named_parameters() yields a shared Parameter once
            component = name.split(".", 1)[0]
            counts[component] = counts.get(component, 0) + p.numel()
        counts["total"] = sum(counts.values())
        return counts

    # ------------------------------------------------------------------------------------------ encoders
    def _unimodal(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        ids_keep: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if ids_keep is not None and not self.config.encoder_visible_only:
            full = self.image_encoder(images)  # (B, 1+N, Dv), baseline: encode all patches, keep the visible
            idx = ids_keep.unsqueeze(-1).expand(-1, -1, full.shape[-1])
            img = torch.cat([full[:, :1], torch.gather(full[:, 1:], 1, idx)], dim=1)
        else:
            img = self.image_encoder(images, ids_keep)  # (B, 1+K, Dv)
        txt = self.text_encoder(input_ids=input_ids, attention_mask=_mask_or_none(attention_mask))
        return img, txt.last_hidden_state  # (B, 1+K, Dv), (B, L, Dt)

    def _pool_image(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 1+K, Dv) encoder output -> (B, Dv) pooled feature (`config.global_pool`)."""
        return img[:, 1:].mean(dim=1) if self.config.global_pool == "mean" else img[:, 0]

    def _pool_text(self, txt: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, Dt) encoder output -> (B, Dt) pooled feature over attended tokens (`config.global_pool`)."""
        if self.config.global_pool == "cls":
            return txt[:, 0]
        weights = attention_mask.to(txt.dtype).unsqueeze(-1)  # (B, L, 1)
        return (txt * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, embed_dim) L2-normalised embeddings (no masking)."""
        img = self.image_encoder(images)  # (B, 1+N, Dv)
        return F.normalize(self.image_proj(self._pool_image(img)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids + mask -> (B, embed_dim) L2-normalised pooled report embeddings."""
        txt = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(self._pool_text(txt, attention_mask)), dim=-1)

    # ------------------------------------------------------------------------------------------ grounding
    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images, unmasked -> (B, Hp, Wp, embed_dim) L2-normalised patch features: the
        image side of the local alignment (`image_proj` of each patch token, CLS left out, then normalised)."""
        b, _, h, w = images.shape
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
        patches = self.image_encoder(images)[:, 1:]  # (B, N, Dv), N = Hp * Wp in row-major order
        return F.normalize(self.image_proj(patches), dim=-1).reshape(b, h // p, w // p, -1)  # (B, Hp, Wp, E)

    def token_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids + mask -> (B, L, embed_dim) L2-normalised token features: the text side of the local
        alignment (`text_proj` of each token of the text encoder's last layer, then normalised). Every position
        is returned; which ones count (no [CLS]/[SEP]/padding) is the caller's choice."""
        txt = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, Dt)
        return F.normalize(self.text_proj(txt), dim=-1)  # (B, L, E)

    def grounding(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Token x patch cosine similarity of each image with its own text, on UNMASKED images.

        The same features the local alignment loss scores (`late_interaction_scores`, `forward`): patch tokens
        through `image_proj`, text tokens through `text_proj`, each L2-normalised, no temperature; with
        ``align_on: full`` and no masked token they are exactly the loss's inputs. Map ``[b, l]`` says where in
        image ``b`` token ``l`` of its text points to; rows of [CLS], [SEP] and padding are returned too (the
        loss leaves them out: see `_alignment_tokens`). Call it in eval mode (no drop-path).

        Args:
            images: (B, C, H, W) normalised images; H and W divisible by ``patch_size``.
            input_ids: (B, L) token ids of each image's text.
            attention_mask: (B, L) 1 on real tokens.

        Returns:
            (B, L, Hp, Wp) cosine similarities in [-1, 1], Hp = H / patch_size, Wp = W / patch_size.
        """
        patches = self.patch_embeddings(images)  # (B, Hp, Wp, E)
        tokens = self.token_embeddings(input_ids, attention_mask)  # (B, L, E)
        return torch.einsum("ble,bhwe->blhw", tokens, patches)  # (B, L, Hp, Wp)

    # ------------------------------------------------------------------------------------------ alignment
    def alignment_features(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, local: bool = False
    ) -> AlignmentFeatures:
        """Unmasked images and their texts in one pass through both encoders -> the global embeddings (what
        ``global_loss`` scores) and, with ``local``, the patch and token embeddings with the tokens that take
        part in the local alignment (what ``local_loss`` scores). What retrieval-style tasks train on."""
        img, txt = self._unimodal(images, input_ids, attention_mask, None)  # (B, 1+N, Dv), (B, L, Dt)
        image = F.normalize(self.image_proj(self._pool_image(img)), dim=-1)  # (B, E)
        text = F.normalize(self.text_proj(self._pool_text(txt, attention_mask)), dim=-1)  # (B, E)
        if not local:
            return AlignmentFeatures(image, text)
        patches = F.normalize(self.image_proj(img[:, 1:]), dim=-1)  # (B, N, E)
        tokens = F.normalize(self.text_proj(txt), dim=-1)  # (B, L, E)
        token_mask = self._alignment_tokens(attention_mask, torch.full_like(input_ids, -100))  # (B, L)
        return AlignmentFeatures(image, text, patches, tokens, token_mask)

    # ------------------------------------------------------------------------------------------ structure
    def repeated_blocks(self) -> list[nn.Module]:
        """The transformer blocks of every stack the model still holds, bottom up (ViT, text encoder, fusion,
        MAE decoder): what ``torch.compile`` wraps one by one and activation checkpointing splits at."""
        blocks: list[nn.Module] = []
        if self.image_encoder is not None:
            blocks += list(self.image_encoder.blocks)
        if self.text_encoder is not None:
            blocks += list(self.text_encoder.encoder.layer)
        if self.fusion is not None:
            blocks += list(self.fusion.layers)
        if self.mae_decoder is not None:
            blocks += list(self.mae_decoder.blocks)
        return blocks

    def depth_of(self, name: str) -> int:
        """The depth of parameter ``name`` (as ``named_parameters`` gives it) for layer-wise learning-rate decay:
        0 for the embeddings, 1 + block index inside an encoder, the encoders' final norms and the projections
        above every encoder block, the fusion layers above those (their norms on top). Larger is nearer the head.
        """
        component, _, inner = name.partition(".")
        if component in ("image_encoder", "text_encoder"):
            block = _block_index(inner, ("blocks", "layer"))
            if block is None:
                return 0 if any(k in inner for k in ("embed", "cls_token", "pos_embed")) else _ENCODER_TOP
            return 1 + block
        if component == "fusion":
            block = _block_index(inner, ("layers",))
            return _ENCODER_TOP + 1 + (block if block is not None else _FUSION_TOP)
        return _ENCODER_TOP  # projections, modality embeddings, temperatures

    # ------------------------------------------------------------------------------------------ fine-tuning
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, vision_width) pooled encoder features of the whole image (no
        masking, no projection): what classification heads and linear probes read."""
        return self._pool_image(self.image_encoder(images))  # (B, Dv)

    def fused_features(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Unmasked image + text through the encoders and MA-CMF fusion -> (B, 2 * fusion_width): the pooled
        text stream beside the pooled image stream (`config.global_pool`), M3AE's VQA representation."""
        img, txt = self._unimodal(images, input_ids, attention_mask, None)  # (B, 1+N, Dv), (B, L, Dt)
        t_type = torch.zeros_like(input_ids[:, :1])
        t = self.text_to_fusion(txt) + self.modality_embed(t_type)  # (B, L, D)
        v = self.image_to_fusion(img) + self.modality_embed(t_type + 1)  # (B, 1+N, D)
        t, v = self.fusion(t, attention_mask.bool(), v)
        return torch.cat([self._pool_text(t, attention_mask), self._pool_image(v)], dim=-1)  # (B, 2D)

    def masked_token_predictions(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The MLM head's guess at every position, (B, L) token ids, from the whole (unmasked) image fused with
        the (masked) report: what ``mpma_ds.eval.mlm`` scores at the [MASK] positions."""
        img, txt = self._unimodal(images, input_ids, attention_mask, None)  # (B, 1+N, Dv), (B, L, Dt)
        t_type = torch.zeros_like(input_ids[:, :1])
        t = self.text_to_fusion(txt) + self.modality_embed(t_type)  # (B, L, D)
        v = self.image_to_fusion(img) + self.modality_embed(t_type + 1)  # (B, 1+N, D)
        t, _ = self.fusion(t, attention_mask.bool(), v)
        return self.mlm_head.logits(t).argmax(dim=-1)  # (B, L)

    def retain(self, parts: tuple[str, ...]) -> MPMA:
        """Drop every top-level component not in ``parts`` (a fine-tuning module keeps only what its forward
        uses, so every parameter it holds receives a gradient); parameter names stay MPMA's. Returns self."""
        unknown = sorted(set(parts) - set(dict(self.named_children())))
        if unknown:
            raise ValueError(f"MPMA has no component(s) {unknown}; it has {sorted(dict(self.named_children()))}")
        for name in [n for n, _ in self.named_children() if n not in parts]:
            delattr(self, name)
            setattr(self, name, None)
        return self

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Pretraining forward on a batch (SPEC §5a); image masking happens here, drawn from `generator`.

        Returns the weighted "loss" and each term: "loss_mlm", "loss_mim", "loss_global", "loss_local"
        (+ "loss_itm" when `w_itm > 0`). Extra batch keys are ignored.

        ``batch["valid"]`` (B,) bool, optional (absent = all valid), marks the loader's stand-in samples
        (remainder padding, repeats for skipped corrupt samples) as False: they enter no loss term, neither
        as samples nor as contrastive negatives, on this rank or (global InfoNCE) any other. Every rank must
        pass it or none (its flags are gathered with the embeddings).
        """
        cfg = self.config
        images, input_ids = batch["image"], batch["input_ids"]
        attention_mask, mlm_labels = batch["attention_mask"], batch["mlm_labels"]
        b, _, h, w = images.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
        grid = (h // p, w // p)
        n = grid[0] * grid[1]
        ids_keep, ids_masked, _ = random_masking(
            b, n, cfg.num_visible(n), device=images.device, generator=generator
        )
        text_mask = attention_mask.bool()
        valid = batch.get("valid")
        if valid is not None:
            valid = torch.as_tensor(valid, device=images.device).bool().reshape(b)

        img, txt = self._unimodal(images, input_ids, attention_mask, ids_keep)  # (B, 1+K, Dv), (B, L, Dt)

        # GLA on the masked features of this pass, or on an extra unmasked pass.
        if cfg.align_on == "full":
            full_ids = torch.where(mlm_labels != -100, mlm_labels, input_ids)
            img_a, txt_a = self._unimodal(images, full_ids, attention_mask, None)
        elif cfg.align_on == "full_image":  # the unmasked image against the masked pass's report features
            img_a, txt_a = self.image_encoder(images), txt
        else:
            img_a, txt_a = img, txt
        img_emb = F.normalize(self.image_proj(self._pool_image(img_a)), dim=-1)  # (B, E)
        txt_emb = F.normalize(self.text_proj(self._pool_text(txt_a, attention_mask)), dim=-1)  # (B, E)
        loss_global = self.global_loss(img_emb, txt_emb, self.rank, self.world_size, valid)
        patch_feats = F.normalize(self.image_proj(img_a[:, 1:]), dim=-1)  # (B, K|N, E)
        token_feats = F.normalize(self.text_proj(txt_a), dim=-1)  # (B, L, E)
        token_valid = self._alignment_tokens(attention_mask, mlm_labels)  # (B, L)
        loss_local = self.local_loss(token_feats, token_valid, patch_feats, valid)

        # MA-CMF fusion of the masked image and the masked report.
        t_type = torch.zeros_like(input_ids[:, :1])
        t = self.text_to_fusion(txt) + self.modality_embed(t_type)  # (B, L, D)
        v = self.image_to_fusion(img) + self.modality_embed(t_type + 1)  # (B, 1+K, D)
        t, v = self.fusion(t, text_mask, v)

        mlm_targets = mlm_labels if valid is None else mlm_labels.masked_fill(~valid[:, None], -100)
        loss_mlm = self.mlm_head(t, mlm_targets)  # mean over the valid samples' masked tokens
        pred = self.mae_decoder(v, ids_keep, ids_masked, grid)  # (B, N-K, P) or (B, N, P)
        target = patchify(images, p)  # (B, N, P)
        if cfg.mim_masked_only:
            target = torch.gather(target, 1, ids_masked.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        else:
            masked = torch.ones(b, n, dtype=torch.bool, device=images.device).scatter(1, ids_keep, False)
            pred, target = (
                pred[masked].reshape(b, n - ids_keep.shape[1], -1),
                target[masked].reshape(b, -1, pred.shape[-1]),
            )
        loss_mim = masked_patch_mse(pred, target, norm_pix=cfg.norm_pix_loss, valid=valid)

        out = {"loss_mlm": loss_mlm, "loss_mim": loss_mim, "loss_global": loss_global, "loss_local": loss_local}
        total = cfg.w_mlm * loss_mlm + cfg.w_mim * loss_mim + cfg.w_global * loss_global + cfg.w_local * loss_local
        if self.itm_head is not None:
            out["loss_itm"] = self._itm_loss(txt, text_mask, img, t, v, valid)
            total = total + cfg.w_itm * out["loss_itm"]
        out["loss"] = total
        return {"loss": out.pop("loss"), **out}

    def _alignment_tokens(self, attention_mask: torch.Tensor, mlm_labels: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: report tokens that take part in local alignment (not [CLS]/[SEP]/padding/[MASK])."""
        valid = attention_mask.bool().clone()
        valid[:, 0] = False  # [CLS]
        last = attention_mask.long().cumsum(1).argmax(1)  # index of the last attended token = [SEP]
        valid.scatter_(1, last[:, None], False)
        if self.config.local_exclude_masked_tokens:
            valid &= mlm_labels == -100
        return valid

    def _itm_loss(
        self,
        txt: torch.Tensor,
        text_mask: torch.Tensor,
        img: torch.Tensor,
        t_pos: torch.Tensor,
        v_pos: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image-text matching: positives from the main pass, negatives = each image with the previous report;
        a pair with a stand-in sample on either side (``valid`` False) carries no loss."""
        t_type = torch.zeros(txt.shape[0], 1, dtype=torch.long, device=txt.device)
        t = self.text_to_fusion(txt.roll(1, 0)) + self.modality_embed(t_type)
        v = self.image_to_fusion(img) + self.modality_embed(t_type + 1)
        t_neg, v_neg = self.fusion(t, text_mask.roll(1, 0), v)
        feats = torch.cat([torch.cat([t_pos[:, 0], v_pos[:, 0]], -1), torch.cat([t_neg[:, 0], v_neg[:, 0]], -1)])
        labels = torch.cat([torch.ones(txt.shape[0]), torch.zeros(txt.shape[0])]).long().to(txt.device)
        logits = self.itm_head(feats).float()  # (2B, 2)
        if valid is None:
            return F.cross_entropy(logits, labels)
        weight = torch.cat([valid, valid & valid.roll(1, 0)]).float()  # (2B,)
        return (F.cross_entropy(logits, labels, reduction="none") * weight).sum() / weight.sum().clamp(min=1.0)

    # ------------------------------------------------------------------------------------------ save / load
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json + model.safetensors, text_encoder/ (HF layout) and image_encoder/ (timm local-dir)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config["text_init_from"] = None  # the weights below already hold it; loading must not need that folder
        config["image_init_from"] = None
        meta = {"model_type": "mpma", "format_version": FORMAT_VERSION, "config": config}
        (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        save_model(self, str(folder / WEIGHTS_NAME))
        self.text_encoder.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
        save_timm_local_dir(self.image_encoder, folder / "image_encoder", self.image_encoder.state_dict())
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> MPMA:
        """Rebuild a model saved by `save_pretrained` (config + safetensors; no pickle)."""
        folder = Path(folder)
        cfg_file = folder / CONFIG_NAME
        if not cfg_file.is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{folder} is not an MPMA folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        meta = json.loads(cfg_file.read_text())
        if meta.get("model_type") != "mpma":
            raise ValueError(f"{cfg_file}: model_type is {meta.get('model_type')!r}, not 'mpma'")
        model = cls(MPMAConfig.from_dict(meta["config"], context=f"{cfg_file} config"))
        missing, unexpected = load_model(model, str(folder / WEIGHTS_NAME), strict=False, device=str(map_location))
        if missing or unexpected:
            raise ValueError(
                f"{folder / WEIGHTS_NAME} does not match its config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        return model


def _mask_or_none(mask: torch.Tensor) -> torch.Tensor | None:
    """``None`` for a padding mask without padding: attention then runs unmasked, which lets SDPA pick its
    Flash / memory-efficient kernels (a boolean mask rules Flash out) and gives the same values."""
    return None if bool(mask.all()) else mask


def _init_linear(module: nn.Module) -> None:
    """Initialise MPMA's own linear layers (the encoders keep their libraries' init)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
