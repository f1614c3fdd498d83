"""MPMA save/load: own format round trip, timm local-dir and transformers layouts, pretrained inits."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import transformers
from model_testdata import gen, make_batch, minilm_folder
from safetensors.torch import load_file

from mpma_ds import MPMA, create_model, load_tokenizer
from mpma_ds.models import check_tokenizer_vocab
from mpma_ds.models.image_encoder import save_timm_local_dir


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("mpma_tiny").eval()
    folder = tmp_path_factory.mktemp("mpma") / "export"
    model.save_pretrained(folder)
    return model, folder


def test_save_pretrained_layout(saved):
    _, folder = saved
    for name in (
        "config.json",
        "model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "image_encoder/config.json",
        "image_encoder/model.safetensors",
    ):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / "config.json").read_text())
    assert meta["model_type"] == "mpma" and meta["config"]["vocab_size"] == 4096
    # no pickle anywhere, and the tied MLM decoder is stored once
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    keys = load_file(str(folder / "model.safetensors")).keys()
    tied = {"text_encoder.embeddings.word_embeddings.weight", "mlm_head.decoder.weight"}
    assert len(tied & set(keys)) == 1


def test_round_trip_identical_outputs(saved):
    model, folder = saved
    loaded = MPMA.from_pretrained(folder).eval()
    assert loaded.config == model.config
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    assert loaded.mlm_head.decoder.weight is loaded.text_encoder.embeddings.word_embeddings.weight
    batch = make_batch(3, 20, seed=1)
    with torch.no_grad():
        a, b = model(batch, generator=gen(5)), loaded(batch, generator=gen(5))
        for k in a:
            assert torch.equal(a[k], b[k]), k
        assert torch.equal(model.encode_image(batch["image"]), loaded.encode_image(batch["image"]))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert torch.equal(model.encode_text(ids, mask), loaded.encode_text(ids, mask))


def test_image_encoder_loads_in_timm(saved):
    model, folder = saved
    vit = timm.create_model(f"local-dir:{folder / 'image_encoder'}", pretrained=True).eval()
    first_conv = next(m for m in vit.patch_embed.modules() if isinstance(m, torch.nn.Conv2d))
    assert type(vit).__name__ == "VisionTransformer" and first_conv.in_channels == 1
    images = make_batch(2, 8, seed=2)["image"]
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images), model.image_encoder(images))
        # other resolutions: position embeddings are interpolated (dynamic_img_size)
        other = torch.randn(2, 1, 96, 160)
        torch.testing.assert_close(vit.forward_features(other), model.image_encoder(other))


def test_text_encoder_loads_in_transformers(saved):
    model, folder = saved
    hf = transformers.AutoModel.from_pretrained(folder / "text_encoder").eval()
    batch = make_batch(2, 16, seed=3)
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ours = model.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(ours.last_hidden_state, ref)


def test_from_pretrained_errors(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="not an MPMA folder"):
        MPMA.from_pretrained(tmp_path)
    _, folder = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["fusion_layers"] = 3  # another architecture than the weights
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match its config: missing"):
        MPMA.from_pretrained(bad)


def test_text_encoder_from_real_minilm():
    folder = minilm_folder()
    model = create_model("mpma_tiny", text_init_from=folder).eval()
    cfg = model.config
    assert (cfg.text_arch, cfg.vocab_size, cfg.text_width, cfg.text_layers) == ("bert", 30522, 384, 6)
    ref = transformers.AutoModel.from_pretrained(folder).eval()
    tok = load_tokenizer(folder)
    check_tokenizer_vocab(model, tok)
    enc = tok(
        ["no acute cardiopulmonary process.", "small left pleural effusion with basilar atelectasis"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = ref(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        got = model.text_encoder(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        ).last_hidden_state
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        # the MLM head is tied to MiniLM's word embeddings and the whole model runs on its tokens
        batch = make_batch(2, 16, vocab_size=30522, seed=4)
        out = model(batch, generator=gen())
    assert model.mlm_head.decoder.weight is model.text_encoder.get_input_embeddings().weight
    assert torch.isfinite(out["loss"])


def test_image_init_from_three_channel_timm_checkpoint(tmp_path):
    """A 3-channel timm ViT at another resolution initialises a 1-channel model: patch weights summed,
    position embeddings interpolated."""
    torch.manual_seed(0)
    src = create_model("mpma_tiny", in_chans=3, image_size=64, patch_stem="linear").image_encoder
    save_timm_local_dir(src, tmp_path / "vit3", src.state_dict())
    model = create_model("mpma_tiny", image_init_from=str(tmp_path / "vit3"), patch_stem="linear")
    w3 = src.patch_embed.proj.weight
    torch.testing.assert_close(model.image_encoder.patch_embed.proj.weight, w3.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.image_encoder.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert model.image_encoder.pos_embed.shape == (1, 1 + 64, 128)  # 4x4 grid -> 8x8 grid
    torch.testing.assert_close(model.image_encoder.pos_embed[:, 0], src.pos_embed[:, 0])  # CLS position kept
    # a gray image through the 1-channel model = the same image repeated on 3 channels through the source
    gray = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model.image_encoder.patch_embed(gray),
            src.patch_embed(gray.expand(-1, 3, -1, -1)),
            rtol=1e-4,
            atol=1e-5,
        )
    with pytest.raises(FileNotFoundError, match="image_init_from"):
        create_model("mpma_tiny", image_init_from=str(tmp_path / "nowhere"))
