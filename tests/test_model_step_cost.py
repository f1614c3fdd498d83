"""The step-cost switches of issue 15: ``attn_impl: auto`` follows the device and computes SDPA's values,
``align_on: full_image`` is ``full`` without the second text pass, checkpointing is off unless asked for, the
patch embedding's matmul is timm's convolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from model_testdata import gen, make_batch

from mpma_ds.models import create_model, get_model_config
from mpma_ds.models.fusion import MultiHeadAttention
from mpma_ds.models.image_encoder import PatchConv2d

REPO = Path(__file__).resolve().parents[1]


def _attention_impls(model) -> set[str]:
    """Every attention's implementation: the ViT's and the decoder's blocks, the fusion's, the text encoder's."""
    impls = {
        "sdpa" if b.attn.fused_attn else "eager" for b in [*model.image_encoder.blocks, *model.mae_decoder.blocks]
    }
    impls |= {m.attn_impl for m in model.modules() if isinstance(m, MultiHeadAttention)}
    impls.add(model.text_encoder.config._attn_implementation)
    return impls


def test_attn_auto_is_eager_on_cpu_and_switches_everywhere():
    model = create_model("mpma_tiny")
    assert model.config.attn_impl == "auto" and model.attn_impl == "eager"
    assert _attention_impls(model) == {"eager"}
    model.to(torch.float32)  # a move that stays on the CPU keeps it
    assert _attention_impls(model) == {"eager"}
    model.set_attn_impl("sdpa")
    assert model.attn_impl == "sdpa" and _attention_impls(model) == {"sdpa"}
    model.to(torch.float32)  # an explicit choice is not re-decided by a move
    assert _attention_impls(model) == {"sdpa"}
    assert _attention_impls(create_model("mpma_tiny", attn_impl="sdpa")) == {"sdpa"}
    with pytest.raises(ValueError, match="attn_impl must be one of auto, sdpa, eager"):
        model.set_attn_impl("flash")


def test_attn_auto_gives_sdpa_losses_and_gradients():
    """With padding in the reports (masked attention in the text encoder and the fusion)."""
    torch.manual_seed(0)
    auto = create_model("mpma_tiny", dropout=0.0)
    sdpa = create_model("mpma_tiny", attn_impl="sdpa")
    sdpa.load_state_dict(auto.state_dict())
    batch = make_batch(4, 24, seed=5)
    assert not batch["attention_mask"].bool().all()
    out = {}
    for name, model in (("auto", auto), ("sdpa", sdpa)):
        losses = model(batch, generator=gen(2))
        losses["loss"].backward()
        out[name] = losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for k in out["sdpa"][0]:
        torch.testing.assert_close(out["auto"][0][k], out["sdpa"][0][k], rtol=1e-4, atol=1e-5)
    assert out["auto"][1].keys() == out["sdpa"][1].keys()
    for n, g in out["sdpa"][1].items():
        # + 1e-6: the attention key biases' gradients are 0 in exact arithmetic (a softmax ignores a shift
        # shared by every key), rounding noise in both
        diff = (out["auto"][1][n] - g).norm()
        assert diff <= 1e-3 * g.norm() + 1e-6, (n, diff.item(), g.norm().item())


@pytest.mark.gpu
def test_attn_auto_is_sdpa_on_cuda():
    model = create_model("mpma_tiny").cuda()
    assert model.attn_impl == "sdpa" and _attention_impls(model) == {"sdpa"}
    assert _attention_impls(model.cpu()) == {"eager"}


def _losses(align_on: str, batch: dict) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model("mpma_tiny", align_on=align_on)
    with torch.no_grad():
        return {k: v.item() for k, v in model(batch, generator=gen(3)).items()}


def test_align_full_image_is_full_without_the_second_text_pass():
    batch = make_batch(4, 24, seed=6)
    # no masked token: the report of the masked pass is the full report, so full_image == full exactly
    unmasked = {**batch, "mlm_labels": torch.full_like(batch["mlm_labels"], -100)}
    unmasked["input_ids"] = torch.where(batch["mlm_labels"] != -100, batch["mlm_labels"], batch["input_ids"])
    assert _losses("full_image", unmasked) == _losses("full", unmasked)
    # with masked tokens: the fusion terms are those of every align_on (same masked pass), the alignment terms
    # differ from "masked" (the image is whole) and from "full" (the report keeps its [MASK]s)
    got, full, masked = (_losses(a, batch) for a in ("full_image", "full", "masked"))
    assert got["loss_mlm"] == full["loss_mlm"] == masked["loss_mlm"]
    assert got["loss_mim"] == full["loss_mim"] == masked["loss_mim"]
    assert got["loss_global"] not in (full["loss_global"], masked["loss_global"])


def test_checkpointing_is_off_by_default_and_on_in_the_base_recipe():
    for name in ("mpma_base", "mpma_small", "mpma_tiny"):
        assert get_model_config(name).grad_checkpointing is False
    recipe = yaml.safe_load((REPO / "mpma_ds" / "recipes" / "pretrain_base.yaml").read_text())
    assert recipe["train"]["grad_checkpointing"] is True  # the GPU recipe at batch scale turns it on


@pytest.mark.parametrize(("chans", "size"), [(1, 32), (3, 48), (3, 40)])  # 40: not divisible, the conv itself
def test_patch_matmul_is_the_convolution(chans, size):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(chans, 24, 16, stride=16)
    patch = PatchConv2d.from_conv(conv)
    assert isinstance(patch, PatchConv2d) and patch.weight is conv.weight and patch.bias is conv.bias
    x = torch.randn(2, chans, size, size)
    want = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=16)
    got = patch(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (g_want,) = torch.autograd.grad((want * want).sum(), conv.weight)
    (g_got,) = torch.autograd.grad((got * got).sum(), patch.weight)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-4)
    assert PatchConv2d.from_conv(torch.nn.Conv2d(chans, 8, 3, padding=1)).__class__ is torch.nn.Conv2d


def test_image_encoder_state_dict_is_timms():
    model = create_model("mpma_tiny", patch_stem="linear")
    assert isinstance(model.image_encoder.patch_embed.proj, PatchConv2d)
    assert model.image_encoder.state_dict()["patch_embed.proj.weight"].ndim == 4
