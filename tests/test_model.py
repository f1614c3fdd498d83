"""MPMA model: shapes, exact masking, losses at initialisation, gradients, checkpointing, bad configs."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from model_testdata import gen, make_batch, minilm_folder

import mpma_ds
from mpma_ds.models import MPMAConfig, check_tokenizer_vocab, create_model, list_models
from mpma_ds.models.flops import training_flops_per_sample
from mpma_ds.models.image_encoder import patchify, random_masking


@pytest.fixture(scope="module")
def minilm_dir():
    return minilm_folder()


@pytest.fixture(scope="module")
def tiny() -> mpma_ds.MPMA:
    torch.manual_seed(0)
    return create_model("mpma_tiny")


def test_list_models_and_api():
    names = list_models()
    for name in ("mpma_base", "mpma_small", "mpma_tiny", "mpma_tiny_nomem", "mpma_base_nomem"):
        assert name in names
    assert mpma_ds.list_models() == names
    assert isinstance(mpma_ds.create_model("mpma_tiny_nomem"), mpma_ds.MPMA)
    cfg = mpma_ds.models.get_model_config("mpma_tiny_nomem")
    assert cfg.memory_slots == 0 and cfg.vocab_size == 4096 and cfg.in_chans == 1


@pytest.mark.parametrize(
    ("batch_size", "num_patches", "ratio"), [(1, 64, 0.75), (3, 64, 0.75), (5, 49, 0.5), (2, 36, 0.9)]
)
def test_random_masking_exact_counts(batch_size, num_patches, ratio):
    keep = max(1, int(num_patches * (1 - ratio)))
    ids_keep, ids_masked, mask = random_masking(
        batch_size, num_patches, keep, device=torch.device("cpu"), generator=gen(3)
    )
    assert ids_keep.shape == (batch_size, keep) and ids_masked.shape == (batch_size, num_patches - keep)
    assert mask.sum(1).tolist() == [num_patches - keep] * batch_size
    # keep + masked is a permutation of all patches, and the mask agrees with the kept ids
    both = torch.cat([ids_keep, ids_masked], 1).sort(1).values
    assert torch.equal(both, torch.arange(num_patches).expand(batch_size, -1))
    assert not mask.gather(1, ids_keep).any() and mask.gather(1, ids_masked).all()
    # per-sample masks differ, and the generator makes them reproducible
    again = random_masking(batch_size, num_patches, keep, device=torch.device("cpu"), generator=gen(3))[0]
    assert torch.equal(ids_keep, again)
    if batch_size > 1:
        assert not torch.equal(ids_keep[0].sort().values, ids_keep[1].sort().values)


@pytest.mark.parametrize(("batch_size", "size"), [(1, 128), (3, 96), (2, (160, 96))])
def test_shapes_at_several_sizes(tiny, batch_size, size):
    cfg = tiny.config
    batch = make_batch(batch_size, 20, size)
    h, w = (size, size) if isinstance(size, int) else size
    n = (h // 16) * (w // 16)
    keep = max(1, int(n * 0.25))
    ids_keep, ids_masked, _ = random_masking(batch_size, n, cfg.num_visible(n), device=torch.device("cpu"))
    assert ids_keep.shape[1] == keep
    with torch.no_grad():
        tokens = tiny.image_encoder(batch["image"], ids_keep)
        assert tokens.shape == (batch_size, 1 + keep, cfg.vision_width)
        assert tiny.image_encoder(batch["image"]).shape == (batch_size, 1 + n, cfg.vision_width)
        v = torch.randn(batch_size, 1 + keep, cfg.fusion_width)
        pred = tiny.mae_decoder(v, ids_keep, ids_masked, (h // 16, w // 16))
        assert pred.shape == (batch_size, n - keep, 16 * 16 * 1)
        out = tiny(batch, generator=gen())
        assert set(out) == {"loss", "loss_mlm", "loss_mim", "loss_global", "loss_local"}
        assert all(v.shape == () and torch.isfinite(v) for v in out.values())
        img, txt = tiny.encode_image(batch["image"]), tiny.encode_text(batch["input_ids"], batch["attention_mask"])
    assert img.shape == txt.shape == (batch_size, cfg.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(batch_size))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(batch_size))


def test_patchify_order_matches_patch_embed():
    images = torch.randn(2, 1, 32, 48)
    patches = patchify(images, 16)  # (2, 6, 256)
    assert patches.shape == (2, 6, 256)
    torch.testing.assert_close(patches[1, 4], images[1, 0, 16:32, 16:32].reshape(-1))  # row 1, column 1


def test_losses_near_theoretical_values_at_init():
    torch.manual_seed(0)
    model = create_model("mpma_tiny")
    b = 16
    batch = make_batch(b, 32, seed=1)
    with torch.no_grad():
        runs = [model(batch, generator=gen(s)) for s in range(3)]
    mean = {k: sum(r[k].item() for r in runs) / len(runs) for k in runs[0]}
    # MLM: near-uniform prediction over the vocabulary -> ln V (logits have std ~0.2 at init).
    assert abs(mean["loss_mlm"] - math.log(4096)) < 0.3, mean
    # Global / local InfoNCE: near-uniform over the batch -> ln B.
    assert abs(mean["loss_global"] - math.log(b)) < 0.6, mean
    assert abs(mean["loss_local"] - math.log(b)) < 0.6, mean
    # MIM on per-patch normalised pixels with ~0 predictions -> variance 1.
    assert abs(mean["loss_mim"] - 1.0) < 0.15, mean
    total = mean["loss_mlm"] + mean["loss_mim"] + mean["loss_global"] + mean["loss_local"]
    assert mean["loss"] == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"memory_slots": 0},
        {"memory_kv": "gated_sum", "align_on": "full"},
        {"w_itm": 0.5, "tie_mlm_weights": False},
    ],
    ids=["default", "nomem", "gated_sum+full", "itm+untied"],
)
def test_every_parameter_gets_a_gradient(overrides):
    torch.manual_seed(0)
    model = create_model("mpma_tiny", **overrides)
    out = model(make_batch(6, 24, seed=2), generator=gen())
    out["loss"].backward()
    if overrides.get("w_itm"):
        assert "loss_itm" in out and abs(out["loss_itm"].item() - math.log(2)) < 0.2
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def _loss_and_grads(model, batch, seed):
    model.zero_grad(set_to_none=True)
    out = model(batch, generator=gen(seed))
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads


@pytest.mark.parametrize("name", ["mpma_tiny", "mpma_tiny_nomem"])
@pytest.mark.parametrize("freeze_text", [False, True], ids=["all-trainable", "text-frozen"])
def test_grad_checkpointing_same_loss_and_grads(name, freeze_text):
    torch.manual_seed(0)
    model = create_model(name, dropout=0.1)  # dropout on: the recomputation must replay the same RNG
    if freeze_text:
        model.text_encoder.requires_grad_(False)
    batch = make_batch(4, 24, seed=4)
    torch.manual_seed(1)
    model.set_grad_checkpointing(False)
    loss_off, grads_off = _loss_and_grads(model, batch, seed=7)
    torch.manual_seed(1)
    model.set_grad_checkpointing(True)
    assert model.image_encoder.block_checkpointing and model.text_encoder.is_activation_checkpointing
    loss_on, grads_on = _loss_and_grads(model, batch, seed=7)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=0)
    assert grads_on.keys() == grads_off.keys()
    assert not freeze_text or not any(n.startswith("text_encoder.") for n in grads_on)
    for n in grads_off:
        rel = (grads_on[n] - grads_off[n]).norm() / grads_off[n].norm().clamp(min=1e-12)
        assert rel <= 1e-5, (n, rel.item())


def test_efficiency_switches_keep_the_loss():
    """Masked-only MLM head / MAE prediction and SDPA compute the same losses as the full versions."""
    torch.manual_seed(0)
    fast = create_model("mpma_tiny", attn_impl="sdpa")  # explicit: "auto" is eager on CPU, nothing to compare
    slow = create_model("mpma_tiny", attn_impl="eager", mlm_masked_only=False, mim_masked_only=False)
    slow.load_state_dict(fast.state_dict())
    batch = make_batch(4, 24, seed=5)
    with torch.no_grad():
        a, b = fast(batch, generator=gen(2)), slow(batch, generator=gen(2))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # the visible-only switch changes what the encoder attends over: same shapes, different values
    full = create_model("mpma_tiny", encoder_visible_only=False)
    full.load_state_dict(fast.state_dict())
    with torch.no_grad():
        c = full(batch, generator=gen(2))
    assert torch.isfinite(c["loss"]) and not torch.allclose(c["loss_global"], a["loss_global"])


def test_no_weight_decay_names():
    model = create_model("mpma_tiny")
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert nwd <= set(names)
    for must in (
        "global_loss.logit_scale.log_scale",
        "image_encoder.pos_embed",
        "image_encoder.cls_token",
        "mae_decoder.mask_token",
        "fusion.layers.0.memory.memory",
        "fusion.t_norm.weight",
        "fusion.layers.0.t_self.q.bias",
        "text_encoder.embeddings.word_embeddings.weight",
        "modality_embed.weight",
    ):
        assert must in nwd, must
    for decayed in (
        "image_proj.weight",
        "fusion.layers.0.t_self.q.weight",
        "image_encoder.blocks.0.attn.qkv.weight",
    ):
        assert decayed not in nwd


def test_flop_count():
    model = create_model("mpma_tiny")
    small, large = make_batch(2, 32, seed=6), make_batch(4, 32, seed=6)
    f2, f4 = training_flops_per_sample(model, small), training_flops_per_sample(model, large)
    assert all(p.grad is None for p in model.parameters())
    assert 1e8 < f2 < 5e9 and f4 == pytest.approx(f2, rel=0.15)
    full_head = create_model("mpma_tiny", mlm_masked_only=False)
    # the full-vocabulary head costs ~6 * L * D * V more FLOPs per sample than the masked-only head
    extra = training_flops_per_sample(full_head, small) - f2
    assert extra > 0.5 * 6 * 32 * 128 * 4096


# ------------------------------------------------------------------------------------------- bad input
def test_unknown_override_names_the_key():
    with pytest.raises(ValueError, match="fusion_widht"):
        create_model("mpma_tiny", fusion_widht=256)
    with pytest.raises(ValueError, match="mpma_huge"):
        create_model("mpma_huge")
    with pytest.raises(ValueError, match="bogus"):
        MPMAConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fusion_width": 130}, "fusion_width 130 is not divisible by fusion_heads 4"),
        ({"image_size": 120}, "image_size 120 is not divisible by patch_size 16"),
        ({"in_chans": 2}, "in_chans must be 1 or 3"),
        ({"memory_topk": 64}, "memory_topk must be in"),
        ({"image_size": "128"}, "image_size must be an integer"),
        ({"align_on": "both"}, "align_on must be one of"),
    ],
)
def test_bad_config_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model("mpma_tiny", **overrides)


def test_tokenizer_vocab_larger_than_model(minilm_dir):
    tok = mpma_ds.load_tokenizer(minilm_dir)
    cfg = mpma_ds.models.get_model_config("mpma_tiny")
    with pytest.raises(ValueError, match=r"has 30522 tokens but the model's vocab_size is 4096"):
        check_tokenizer_vocab(cfg, tok)
    check_tokenizer_vocab(cfg.replace(vocab_size=30522), tok)  # fits: no error


def test_image_size_not_divisible_at_forward(tiny):
    with pytest.raises(ValueError, match="not divisible by patch_size 16"):
        tiny(make_batch(1, 8, 120))


def test_import_without_deepspeed_mlflow_dali():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('deepspeed', 'mlflow', 'nvidia'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mpma_ds.models, mpma_ds\n"
        "m = mpma_ds.create_model('mpma_tiny')\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('deepspeed', 'mlflow', 'nvidia')]\n"
        "assert not bad, bad\n"
        "print('ok', type(m).__name__)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ok MPMA" in res.stdout
