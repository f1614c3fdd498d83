"""MAE-style image encoder: a timm `VisionTransformer` that runs on the visible patches + CLS.

The class only adds a masked `forward` to timm's ViT (and runs its patch embedding as one matmul, `PatchConv2d`),
so its state dict is exactly a timm ViT's and the weights export to a timm `local-dir:` folder
(`save_timm_local_dir`). With `patch_stem: conv` the ViT's patch projection is a small convolutional stem
(`ConvStemPatchEmbed`, a timm `PatchEmbed`); that ViT is registered with timm as `mpma_vit_conv_stem`, so its
exported folder loads with `timm.create_model("local-dir:...")` too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models import VisionTransformer, build_model_with_cfg, register_model
from timm.models._manipulate import adapt_input_conv
from torch import nn
from torch.utils.checkpoint import checkpoint

from mpma_ds.models.config import MPMAConfig
from mpma_ds.models.registry import IMAGE_ENCODERS

# timm architecture name recorded in the exported config.json; `model_args` override its sizes.
TIMM_ARCHITECTURE = "vit_base_patch16_224"
# ... and the one of a ViT whose patches come from the convolutional stem (registered below).
TIMM_CONV_STEM_ARCHITECTURE = "mpma_vit_conv_stem"


class ConvStem(nn.Sequential):
    """Pixels -> patch grid by log2(patch_size) stride-2 3x3 convolutions (GroupNorm, GELU), widths doubling up to
    `embed_dim`, then a 1x1 projection: (B, C, H, W) -> (B, embed_dim, H / patch, W / patch)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        steps = int(math.log2(patch_size))
        widths = [max(embed_dim >> (steps - 1 - i), 8) for i in range(steps)]
        layers: list[nn.Module] = []
        for width in widths:
            layers += [
                nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(1, width),
                nn.GELU(),
            ]
            in_chans = width
        super().__init__(*layers, nn.Conv2d(in_chans, embed_dim, 1))


class ConvStemPatchEmbed(PatchEmbed):
    """timm's `PatchEmbed` (same arguments, grid, output formats) with `ConvStem` as its projection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"the conv stem needs square patches, got {self.patch_size}")
        self.proj = ConvStem(self.proj.in_channels, self.proj.out_channels, self.patch_size[0])


@register_model
def mpma_vit_conv_stem(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm entry of a ViT with MPMA's convolutional patch stem (`patch_stem: conv`); sizes come in `kwargs`."""
    kwargs.setdefault("pretrained_cfg", {"input_size": (kwargs.get("in_chans", 3), 224, 224)})
    return build_model_with_cfg(VisionTransformer, TIMM_CONV_STEM_ARCHITECTURE, pretrained,
                                embed_layer=ConvStemPatchEmbed, **kwargs)  # fmt: skip


def visible_pixels(ids_keep: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(B, K) visible patch indices -> (B, 1, gh * p, gw * p) float mask, 1 on the pixels of visible patches."""
    keep = torch.zeros(ids_keep.shape[0], grid[0] * grid[1], device=ids_keep.device)
    keep.scatter_(1, ids_keep, 1.0)
    return F.interpolate(keep.view(-1, 1, *grid), scale_factor=patch_size, mode="nearest")


def random_masking(
    batch_size: int,
    num_patches: int,
    num_keep: int,
    *,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random patch masking with an exact keep count (MAE).

    Returns:
        ids_keep (B, K) indices of visible patches, ids_masked (B, N-K) indices of masked patches (both in
        shuffle order), mask (B, N) bool, True where a patch is masked.
    """
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, num_patches, generator=generator, device=gen_device).to(device)  # (B, N)
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, N)
    ids_keep, ids_masked = ids_shuffle[:, :num_keep], ids_shuffle[:, num_keep:]
    mask = torch.ones(batch_size, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_keep, False)
    return ids_keep, ids_masked, mask


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C) in the ViT's row-major patch order."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch_size * patch_size * c)


class PatchConv2d(nn.Conv2d):
    """The ViT's patch embedding convolution (kernel = stride, no padding) computed as one matmul over the patches:
    the same parameters (the 4-D ``weight``, ``bias``) and values, but its backward is a plain GEMM, not
    ``convolution_backward`` (on our CPU the conv's fwd + bwd at 8 x 288 px, 1 channel, took 8x the matmul's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        kh, kw = self.kernel_size
        if h % kh or w % kw:
            return super().forward(x)
        gh, gw = h // kh, w // kw
        patches = x.reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh, gw, c * kh * kw)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)  # (B, gh, gw, D)
        return out.permute(0, 3, 1, 2)  # (B, D, gh, gw), the conv's layout (a view of channels-last memory)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> nn.Conv2d:
        """A `PatchConv2d` holding ``conv``'s own parameters, or ``conv`` itself where it is no patch embedding."""
        patchwise = conv.stride == conv.kernel_size and conv.padding == (0, 0) and conv.dilation == (1, 1)
        if not patchwise or conv.groups != 1 or conv.padding_mode != "zeros":
            return conv
        out = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, bias=conv.bias is not None
        )
        out.weight, out.bias = conv.weight, conv.bias
        return out


class MaskedVisionTransformer(VisionTransformer):
    """timm ViT whose `forward(images, ids_keep)` encodes only the visible patches (+ CLS).

    Position embeddings are added before masking and resampled when the image size differs from the
    configured one (timm `dynamic_img_size`). The masked forward is this module's own `forward`, so a
    ZeRO-3 engine gathers `pos_embed` / `cls_token` through the usual module hooks.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timm_model_args = dict(kwargs)
        self.block_checkpointing = False
        if isinstance(self.patch_embed.proj, nn.Conv2d):  # the linear stem (the conv stem is no patch conv)
            self.patch_embed.proj = PatchConv2d.from_conv(self.patch_embed.proj)

    def set_attn_impl(self, impl: str) -> None:
        for blk in self.blocks:
            blk.attn.fused_attn = impl == "sdpa"

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Encode (B, C, H, W) images; with `ids_keep` (B, K) only those patches. Returns (B, 1+K, D)."""
        if ids_keep is not None and isinstance(self.patch_embed, ConvStemPatchEmbed):
            # the stem's receptive field crosses patch borders: masked patches' pixels must not reach visible tokens
            p = self.patch_embed.patch_size[0]
            grid = (images.shape[-2] // p, images.shape[-1] // p)
            images = images * visible_pixels(ids_keep, grid, p).to(images.dtype)
        x = self.patch_embed(images)  # (B, gh, gw, D)
        x = self._pos_embed(x)  # (B, 1+N, D) with CLS, positions added
        if ids_keep is not None:
            idx = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x = torch.cat([x[:, :1], torch.gather(x[:, 1:], 1, idx)], dim=1)  # (B, 1+K, D)
        x = self.norm_pre(x)
        for blk in self.blocks:
            if self.block_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)  # (B, 1+K, D)


def build_image_encoder(cfg: MPMAConfig) -> nn.Module:
    """The image tower ``cfg.image_arch`` names (``IMAGE_ENCODERS``)."""
    return IMAGE_ENCODERS[cfg.image_arch](cfg)


@IMAGE_ENCODERS.register("vit")
def build_vit(cfg: MPMAConfig) -> MaskedVisionTransformer:
    """MPMA's masked ViT (timm's ``VisionTransformer``; linear or convolutional patch stem)."""
    model_args = dict(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.vision_width,
        depth=cfg.vision_layers,
        num_heads=cfg.vision_heads,
        mlp_ratio=cfg.vision_mlp_ratio,
        num_classes=0,
        global_pool="token",
        dynamic_img_size=True,
        drop_path_rate=cfg.drop_path,
    )
    if cfg.patch_stem == "conv":
        model_args["embed_layer"] = ConvStemPatchEmbed
    vit = MaskedVisionTransformer(**model_args)
    vit.set_attn_impl(cfg.build_attn_impl)
    if cfg.image_init_from:
        load_timm_weights(vit, cfg.image_init_from)
    return vit


def load_timm_weights(vit: MaskedVisionTransformer, source: str | Path) -> None:
    """Load a timm ViT checkpoint (local-dir folder or .safetensors file) into `vit`.

    3-channel patch-embedding weights are adapted to `vit`'s channel count with timm's `adapt_input_conv`
    (summed over channels for 1-channel input); position embeddings are resampled to `vit`'s grid.
    """
    path = Path(source)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"image_init_from={source}: no model.safetensors there; give a timm local-dir")
    state = load_file(str(file))
    in_chans = vit.timm_model_args["in_chans"]
    for key in (
        "patch_embed.proj.weight",
        "patch_embed.proj.0.weight",
    ):  # the linear stem's, the conv stem's first
        if key in state and state[key].shape[1] != in_chans:
            state[key] = adapt_input_conv(in_chans, state[key])
    if "pos_embed" in state and state["pos_embed"].shape != vit.pos_embed.shape:
        old_tokens = state["pos_embed"].shape[1] - vit.num_prefix_tokens
        old = int(round(old_tokens**0.5))
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=vit.patch_embed.grid_size, old_size=(old, old), num_prefix_tokens=1
        )
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(
            f"image_init_from={source} does not fit this ViT: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def save_timm_local_dir(vit: MaskedVisionTransformer, folder: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Write `folder/config.json` + `model.safetensors` so `timm.create_model("local-dir:folder")` rebuilds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = {k: v for k, v in vit.timm_model_args.items() if k not in ("drop_path_rate", "embed_layer")}
    in_chans, size = args["in_chans"], args["img_size"]
    conv_stem = vit.timm_model_args.get("embed_layer") is ConvStemPatchEmbed
    config = {
        "architecture": TIMM_CONV_STEM_ARCHITECTURE if conv_stem else TIMM_ARCHITECTURE,
        "num_classes": 0,
        "num_features": args["embed_dim"],
        "global_pool": "token",
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [in_chans, size, size],
            "fixed_input_size": False,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [0.5] * in_chans,
            "std": [0.5] * in_chans,
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj.0" if conv_stem else "patch_embed.proj",
            "classifier": "head",
        },
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / "model.safetensors"))
