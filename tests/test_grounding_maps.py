"""Grounding maps beside the local similarity (fusion cross-attention, Grad-CAM of ITC / ITM) and their scores
(pointing game, CNR, IoU, shifted baseline), on known answers and through the real loader."""

from __future__ import annotations

import math

import pytest
import torch
from train_testdata import prepared_base, tiny_shards, tiny_tokenizer

from mpma_ds import create_model, load_tokenizer
from mpma_ds.eval.attribution import attention_probs
from mpma_ds.eval.grounding import evaluate_grounding, stored_sizes
from mpma_ds.eval.grounding_maps import (
    CNR_FLOOR,
    MapPairs,
    available_maps,
    box_iou,
    collect_map_pairs,
    contrast_to_noise,
    format_map_table,
    map_metrics,
    pair_scores,
    phrase_grids,
)
from mpma_ds.models.fusion import MultiHeadAttention
from mpma_ds.runner.evaluate import data_config_for, one_pass

SIZE = (64, 64)  # 4 x 4 patches of 16 px


def _grid(*cells: tuple[int, int], noise: float = 0.0) -> torch.Tensor:
    g = torch.zeros(4, 4) + noise * torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    for r, c in cells:
        g[r, c] = 1.0
    return g


def test_scores_of_a_map_on_its_box_and_off_it():
    box = (16.0, 16.0, 48.0, 32.0)  # cells (1, 1) and (1, 2)
    hit, cnr, iou = pair_scores(_grid((1, 1), (1, 2)), box, SIZE)
    assert hit == 1.0 and iou == 1.0 and cnr == pytest.approx(1.0 / CNR_FLOOR)
    hit, cnr, iou = pair_scores(_grid((3, 3)), box, SIZE)
    assert hit == 0.0 and iou == 0.0
    assert cnr == pytest.approx(
        abs(0 - 1 / 14) / math.sqrt(0 + (1 / 14) * (13 / 14))
    )  # in: all 0; out: one 1 in 14
    flat = torch.ones(4, 4)
    assert pair_scores(flat, box, SIZE) == (0.0, 0.0, 0.0)  # a tie everywhere is no hit, flat maps no contrast
    assert box_iou(_grid((1, 1)), box, SIZE) == pytest.approx(0.5)
    assert math.isnan(contrast_to_noise(_grid((1, 1)), (0, 0, 64, 64), SIZE))


def test_shifted_baseline_separates_reading_the_image_from_a_location_prior():
    boxes = [(0.0, 0.0, 16.0, 16.0), (48.0, 48.0, 64.0, 64.0)]
    reads = MapPairs(keys=["a", "b"], findings=["x", "x"], boxes=boxes, chance=[1 / 16] * 2, size=SIZE,
                     grids={"reads": [_grid((0, 0), noise=0.1), _grid((3, 3), noise=0.1)],
                            "prior": [_grid((0, 0), noise=0.1)] * 2})  # fmt: skip
    m = map_metrics(reads, n_resamples=50)
    assert m["reads"]["pointing_game"] == 1.0 and m["reads"]["shifted_pointing_game"] == 0.0
    assert m["prior"]["pointing_game"] == 0.5 and m["prior"]["shifted_pointing_game"] == 0.5
    assert m["reads"]["miou"] > m["reads"]["shifted_miou"]
    assert m["reads"]["chance"] == pytest.approx(1 / 16) and m["reads"]["pairs"] == 2
    table = format_map_table({"model": m})
    assert "| model | reads | 1.000 [1.000, 1.000] | 0.000 |" in table


def test_attention_probs_reproduce_the_attention_output():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, attn_impl="eager").eval()
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    probs = attention_probs(attn, x, ctx)  # (B, H, Lq, Lk)
    assert probs.shape == (2, 4, 3, 5) and torch.allclose(probs.sum(-1), torch.ones(2, 4, 3))
    v = attn.kv(ctx).view(2, 5, 2, 4, 4)[:, :, 1].transpose(1, 2)  # (B, H, Lk, hd)
    out = attn.out((probs @ v).transpose(1, 2).reshape(2, 3, 16))
    assert torch.allclose(out, attn(x, ctx), atol=1e-6)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return prepared_base(tmp_path_factory)


@pytest.mark.parametrize("memory_kv", ["concat", "gated_sum"])
def test_every_map_has_the_patch_grid_and_touches_no_parameter_gradient(base, memory_kv):
    torch.manual_seed(0)
    net = create_model(
        "mpma_tiny", vocab_size=1024, image_size=64, max_text_len=32, w_itm=1.0, memory_kv=memory_kv
    )
    tok = load_tokenizer(tiny_tokenizer(base))
    assert available_maps(net) == (
        "similarity", "cross_attention", "attention_rollout", "gradcam_itc", "gradcam_itm", "similarity_neutral",
        "similarity_findings",
    )  # fmt: skip
    images = torch.randn(3, 1, 64, 64)
    phrases = ["left pleural effusion", "cardiomegaly", "nodule"]
    for name in available_maps(net):
        grids = phrase_grids(net, tok, images, phrases, map=name)
        assert grids.shape == (3, 4, 4) and torch.isfinite(grids).all(), name
    attn = phrase_grids(net, tok, images, phrases, map="cross_attention")
    assert (attn > 0).all() and (attn.sum((1, 2)) < 1).all()  # attention over patches, less the [CLS] key's share
    rollout = phrase_grids(net, tok, images, phrases, map="attention_rollout")
    assert (rollout > 0).all() and (rollout.sum((1, 2)) < 1).all()  # relevance over all inputs sums to 1
    assert (phrase_grids(net, tok, images, phrases, map="gradcam_itc") >= 0).all()  # ReLU
    assert all(p.grad is None for p in net.parameters())
    without_itm = create_model("mpma_tiny", vocab_size=1024, image_size=64, max_text_len=32)
    assert "gradcam_itm" not in available_maps(without_itm) and "gloria_attention" not in available_maps(net)
    with pytest.raises(ValueError, match="ITM head"):
        phrase_grids(without_itm, tok, images, phrases, map="gradcam_itm")


def test_evaluate_grounding_with_a_map_agrees_with_collect_map_pairs(base):
    shards, tok_dir = tiny_shards(base), tiny_tokenizer(base)
    torch.manual_seed(0)
    net = create_model("mpma_tiny", vocab_size=1024, image_size=64, max_text_len=32)
    tok = load_tokenizer(tok_dir)
    cfg = data_config_for(net.config, recipe=None, shards=shards / "validate", tokenizer=tok_dir, backend="wds")
    cfg.image_size, cfg.max_text_len = 64, 32
    sizes = stored_sizes(shards / "validate")
    with one_pass(cfg, tok, split="validate", batch_size=8) as batches:
        pairs = collect_map_pairs(net, batches, tokenizer=tok, data_cfg=cfg, sizes=sizes,
                                  maps=["similarity", "cross_attention"])  # fmt: skip
    for name in ("similarity", "cross_attention"):
        with one_pass(cfg, tok, split="validate", batch_size=8) as batches:
            found = evaluate_grounding(net, batches, tokenizer=tok, data_cfg=cfg, sizes=sizes, map=name,
                                       n_resamples=20, n_examples=1)  # fmt: skip
        assert found.metrics["grounding_map"] == name
        assert found.metrics["pointing_game"] == pytest.approx(pairs.scores(name)[:, 0].mean())
        assert torch.allclose(torch.as_tensor(found.examples[0].grid), pairs.grids[name][0])
    with pytest.raises(ValueError, match="grounding map must be one of"):
        evaluate_grounding(net, [], tokenizer=tok, data_cfg=cfg, sizes=sizes, map="nope")


def test_attention_rollout_of_one_layer_is_the_cross_attention_through_the_image_self_attention(base):
    """One fusion layer: R_t = [0.5 I + 0.5 A_tt, 0] after the text self-attention, R_v = [0, 0.5 I + 0.5 A_vv]
    after the image's, so the text tokens' relevance over the image inputs is 0.5 * A_tv @ (0.5 I + 0.5 A_vv)
    (A_tv with each memory response's weight added to its patch's); the phrase map is its mean over the phrase's
    tokens, [CLS] column left out."""
    from mpma_ds.eval.attribution import _fusion_inputs, _tokenise, _visual_keys

    torch.manual_seed(0)
    net = create_model("mpma_tiny", vocab_size=1024, image_size=64, max_text_len=32, fusion_layers=1).eval()
    tok = load_tokenizer(tiny_tokenizer(base))
    images, phrases = torch.randn(2, 1, 64, 64), ["left pleural effusion", "nodule"]
    got = phrase_grids(net, tok, images, phrases, map="attention_rollout")
    ids, mask, own = _tokenise(tok, phrases, "cpu")
    layer = net.fusion.layers[0]
    with torch.no_grad():
        t, v = _fusion_inputs(net, images, ids, mask)
        t = t + layer.t_self(layer.t_norm1(t), key_mask=mask.bool())
        v = v + layer.v_self(layer.v_norm1(v))
        a_vv = attention_probs(layer.v_self, layer.v_norm1(_fusion_inputs(net, images, ids, mask)[1]),
                               layer.v_norm1(_fusion_inputs(net, images, ids, mask)[1])).mean(1)  # fmt: skip
        tn, vn = layer.t_norm2(t), layer.v_norm2(v)
        a_tv = _visual_keys(attention_probs(layer.t_cross, tn, layer.memory(vn)).mean(1), v.shape[1])
    rel = 0.5 * a_tv @ (0.5 * torch.eye(v.shape[1]) + 0.5 * a_vv)  # (B, L, 1+N)
    weights = own.float().unsqueeze(-1)
    want = ((rel[..., 1:] * weights).sum(1) / weights.sum(1)).reshape(2, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_gloria_attention_map_is_the_loss_attention_of_the_phrase(base):
    from mpma_ds.models.gloria import word_region_attention

    torch.manual_seed(0)
    net = create_model("mpma_tiny", vocab_size=1024, image_size=64, max_text_len=32, local_loss="gloria").eval()
    tok = load_tokenizer(tiny_tokenizer(base))
    assert "gloria_attention" in available_maps(net)
    images = torch.randn(2, 1, 64, 64)
    got = phrase_grids(net, tok, images, ["cardiomegaly", "cardiomegaly"], map="gloria_attention")
    enc = tok(["cardiomegaly"], return_tensors="pt")
    with torch.no_grad():
        tokens = net.token_embeddings(enc["input_ids"], enc["attention_mask"])[:, 1:-1]  # (1, T, E)
        patches = net.patch_embeddings(images).flatten(1, 2)  # (2, N, E)
    want = word_region_attention(tokens.expand(2, -1, -1), patches).mean(1).reshape(2, 4, 4)
    torch.testing.assert_close(got, want)
    assert torch.allclose(got.sum((1, 2)), torch.ones(2))


# ----------------------------------------------------------------------------------------------- prior-removed maps
class _Tokenizer:
    """Words to ids, [PAD]=0 [CLS]=1 [SEP]=2: enough of a tokenizer for the phrase maps."""

    vocab = {w: i for i, w in enumerate(["[PAD]", "[CLS]", "[SEP]", "left", "pleural", "effusion", "no", "acute",
                                         "cardiopulmonary", "process", "atelectasis", "cardiomegaly", "consolidation",
                                         "pulmonary", "edema", "widened", "mediastinum", "rib", "fracture", "nodule",
                                         "opacity", "apical", "thickening", "pneumonia", "pneumothorax",
                                         "tube", "the", "lungs", "are", "clear", "normal", "chest", "heart",
                                         "size", "is", "mediastinal", "contours", "or", "focal"])}  # fmt: skip
    all_special_ids = [0, 1, 2]

    def __call__(self, texts, padding=True, return_tensors="pt"):  # noqa: ARG002
        rows = [[1, *(self.vocab[w] for w in t.split()), 2] for t in texts]
        n = max(map(len, rows))
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class _PriorNet(torch.nn.Module):
    """A model whose features are known: patch feature = [location prior, brightness, finding texture] (channel 0
    of the film is its brightness, channel 1 the finding's texture; the prior is the same for every film, strong
    at cell (0, 0)); every finding-phrase token reads all three, the neutral phrase's read the prior and the
    brightness only (the film's structure, which every phrase follows alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.prior = torch.zeros(4, 4)
        self.prior[0, 0] = 2.0
        table = torch.zeros(len(_Tokenizer.vocab), 3)
        table[3:6] = torch.tensor([1.0, 1.0, 1.0])  # left pleural effusion
        table[6:] = torch.tensor([1.0, 1.0, 0.0])  # every other word: the neutral phrases', the other findings'
        self.table = table

    def grounding(self):  # noqa: ANN201 - marks it as a model (attribution._module)
        raise NotImplementedError

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        cells = torch.nn.functional.avg_pool2d(images.float(), 16)  # (B, 2, 4, 4)
        prior = self.prior.expand(len(images), 1, 4, 4)
        return torch.cat([prior, cells], 1).permute(0, 2, 3, 1)  # (B, 4, 4, 3)

    def token_embeddings(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        return self.table[ids]  # (B, L, 3)


def _film(finding: tuple[int, int] | None, bright: tuple[int, int] | None = None, noise: float = 0.0,
          seed: int = 0) -> torch.Tensor:  # fmt: skip
    film = noise * torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(seed))
    film[1] = 0.0
    if bright is not None:  # a bright structure (the mediastinum), brighter than the finding reads
        film[0, bright[0] * 16 : bright[0] * 16 + 16, bright[1] * 16 : bright[1] * 16 + 16] = 1.5
    if finding is not None:
        film[1, finding[0] * 16 : finding[0] * 16 + 16, finding[1] * 16 : finding[1] * 16 + 16] = 1.0
    return film


def test_prior_removed_maps_point_at_the_finding_where_the_raw_similarity_points_at_the_prior():
    from mpma_ds.eval.attribution import MAPS
    from mpma_ds.eval.grounding import pointing_hit
    from mpma_ds.eval.prior_maps import (
        FINDING_PHRASES,
        NEUTRAL_PHRASES,
        GroundingPrior,
        attach_prior,
        findings_vector,
        fit_prior,
        neutral_vector,
    )

    net, tok = _PriorNet(), _Tokenizer()
    assert {"similarity_contrast", "similarity_zscore", "similarity_neutral"} <= set(MAPS)
    assert "similarity_neutral" in available_maps(net) and "similarity_contrast" not in available_maps(net)
    films = torch.stack([_film((2, 3)), _film((3, 1), bright=(1, 1))])  # the finding at cell (2, 3), (3, 1)
    boxes = [(48.0, 32.0, 64.0, 48.0), (16.0, 48.0, 32.0, 64.0)]  # those cells, x0 y0 x1 y1
    phrases = ["left pleural effusion"] * 2
    with pytest.raises(ValueError, match="grounding prior"):
        phrase_grids(net, tok, films, phrases, map="similarity_contrast")
    raw = phrase_grids(net, tok, films, phrases, map="similarity")
    assert not any(pointing_hit(g, b, SIZE) for g, b in zip(raw, boxes))  # the prior's cell (0, 0) wins
    neutral = phrase_grids(net, tok, films, phrases, map="similarity_neutral")
    assert all(pointing_hit(g, b, SIZE) for g, b in zip(neutral, boxes))
    # the neutral phrases read prior and brightness as the finding's words do; of the texture only "pleural
    # effusion" in "no pleural effusion or pneumothorax" (2 of its 5 words), 1 of the 7 phrases
    n = neutral_vector(net, tok)
    torch.testing.assert_close(n, torch.tensor([1.0, 1.0, 2 / 5 / len(NEUTRAL_PHRASES)]))
    torch.testing.assert_close(neutral, (1 - n[2]) * films[:, 1, ::16, ::16])  # the finding's texture only
    # the finding phrases' mean: "pleural effusion" (both words texture) and "apical pleural thickening" (1 of 3)
    # read texture, the other 11 do not; what every phrase shares (prior, brightness) cancels as above
    assert "similarity_findings" in available_maps(net)
    share = (1.0 + 1 / 3) / len(FINDING_PHRASES)
    torch.testing.assert_close(findings_vector(net, tok), torch.tensor([1.0, 1.0, share]))
    findings = phrase_grids(net, tok, films, phrases, map="similarity_findings")
    assert all(pointing_hit(g, b, SIZE) for g, b in zip(findings, boxes))
    torch.testing.assert_close(findings, (1 - share) * films[:, 1, ::16, ::16])
    reference = torch.stack([_film(None, noise=0.2, seed=s) for s in range(16)])  # normal films, same prior
    prior = fit_prior(net, [reference[:8], reference[8:]])
    assert prior.films == 16 and prior.mean.shape == (4, 4, 3) and prior.cov.shape == (4, 4, 3, 3)
    torch.testing.assert_close(prior.mean[..., 0], net.prior)  # the prior is what every film shares
    attach_prior(net, GroundingPrior.from_state_dict(prior.state_dict()))
    assert {"similarity_contrast", "similarity_zscore"} <= set(available_maps(net))
    for name in ("similarity_contrast", "similarity_zscore"):
        grids = phrase_grids(net, tok, films[:1], phrases[:1], map=name)
        assert pointing_hit(grids[0], boxes[0], SIZE), name
    # the z-score divides by the phrase map's spread over the reference films, cell by cell
    contrast = phrase_grids(net, tok, films[:1], phrases[:1], map="similarity_contrast")
    zscore = phrase_grids(net, tok, films[:1], phrases[:1], map="similarity_zscore")
    spread = torch.einsum("e,hwef,f->hw", torch.ones(3), prior.cov, torch.ones(3)).sqrt()
    torch.testing.assert_close(zscore[0], contrast[0] / spread)
    attach_prior(net, None)
    assert "similarity_contrast" not in available_maps(net)
