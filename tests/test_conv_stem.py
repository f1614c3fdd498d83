"""`patch_stem: conv`: the convolutional patch stem of the ViT — masking without leaks, timm export, validation."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from model_testdata import gen, make_batch

from mpma_ds import MPMA, create_model
from mpma_ds.models import get_model_config
from mpma_ds.models.image_encoder import ConvStem, random_masking, visible_pixels


def test_stem_reaches_the_patch_grid():
    stem = ConvStem(in_chans=1, embed_dim=128, patch_size=16)
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 1]  # four halvings = 16 px, then the 1x1 projection
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 128]
    assert stem(torch.randn(2, 1, 128, 96)).shape == (2, 128, 8, 6)


def test_visible_pixels_marks_whole_patches():
    ids_keep = torch.tensor([[0, 5], [3, 4]])  # a 2 x 3 grid of 4-px patches
    pix = visible_pixels(ids_keep, (2, 3), 4)
    assert pix.shape == (2, 1, 8, 12)
    assert pix[0, 0, :4, :4].eq(1).all() and pix[0, 0, 4:, 8:].eq(1).all()
    assert pix[0].sum() == 2 * 16 and pix[1].sum() == 2 * 16
    assert pix[1, 0, 4:, :4].eq(1).all() and pix[1, 0, 4:, 4:8].eq(1).all() and pix[1, 0, :4].eq(0).all()


def test_masked_pixels_do_not_reach_visible_tokens():
    """The stem's 3x3 convolutions see across patch borders: in the masked pass the masked patches' pixels are
    zeroed first, so whatever they hold, the visible tokens are the same (MAE's targets stay unseen)."""
    model = create_model("mpma_tiny", patch_stem="conv").eval()
    vit = model.image_encoder
    images = make_batch(2, 8, seed=1)["image"]
    ids_keep, _, mask = random_masking(2, 64, 16, device=torch.device("cpu"), generator=gen(3))
    masked_pixels = F.interpolate(mask.float().view(2, 1, 8, 8), scale_factor=16)
    noisy = images + 10.0 * masked_pixels * torch.randn_like(images)
    with torch.no_grad():
        torch.testing.assert_close(vit(noisy, ids_keep), vit(images, ids_keep), rtol=0, atol=0)
        # ... while the full pass does see them (the receptive field is wider than a patch)
        assert not torch.allclose(vit(noisy), vit(images))
    # the linear stem needs no zeroing: a patch's token only ever saw its own pixels
    linear = create_model("mpma_tiny", patch_stem="linear").eval().image_encoder
    with torch.no_grad():
        torch.testing.assert_close(linear(noisy, ids_keep), linear(images, ids_keep), rtol=0, atol=0)


def test_conv_stem_trains():
    torch.manual_seed(0)
    model = create_model("mpma_tiny", patch_stem="conv", align_on="full")
    out = model(make_batch(4, 24, seed=2), generator=gen(4))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in model.image_encoder.patch_embed.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_conv_stem_exports_to_timm_and_back(tmp_path):
    torch.manual_seed(0)
    model = create_model("mpma_tiny", patch_stem="conv").eval()
    model.save_pretrained(tmp_path / "export")
    vit = timm.create_model(f"local-dir:{tmp_path / 'export' / 'image_encoder'}", pretrained=True).eval()
    assert type(vit).__name__ == "VisionTransformer"
    images = make_batch(2, 8, seed=2)["image"]
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images), model.image_encoder(images))
        other = torch.randn(2, 1, 96, 160)  # other sizes: position embeddings interpolated, the stem is size-free
        torch.testing.assert_close(vit.forward_features(other), model.image_encoder(other))
    loaded = MPMA.from_pretrained(tmp_path / "export").eval()
    assert loaded.config.patch_stem == "conv"
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"patch_stem": "resnet"}, "patch_stem must be one of linear, conv"),
        ({"patch_stem": "conv", "patch_size": 12, "image_size": 120}, "power-of-two patch_size >= 4"),
        ({"patch_stem": "conv", "patch_size": 2, "image_size": 128}, "power-of-two patch_size >= 4"),
    ],
)
def test_bad_stem_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_model_config("mpma_tiny", **overrides)
