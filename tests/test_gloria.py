"""The GLoRIA-style local loss (`local_loss: gloria`): its scores against a direct per-pair computation, the
shapes, the gradients, that it learns a toy word -> region correspondence, and that MPMA trains with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_testdata import make_batch

from mpma_ds.models import create_model
from mpma_ds.models.gloria import GloriaLocalLoss, gloria_scores, word_region_attention
from mpma_ds.models.registry import LOCAL_LOSSES


def _features(bt: int = 3, bi: int = 4, length: int = 5, k: int = 6, e: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = F.normalize(torch.randn(bt, length, e, generator=g), dim=-1)
    patches = F.normalize(torch.randn(bi, k, e, generator=g), dim=-1)
    valid = torch.ones(bt, length, dtype=torch.bool)
    valid[1, 3:] = False
    return tokens, valid, patches


def _pair_score(words: torch.Tensor, regions: torch.Tensor) -> float:
    """GLoRIA's Z of one (report, image): the formula written out for one pair, in float64."""
    words, regions = words.double(), regions.double()
    attn = (4.0 * words @ regions.t()).softmax(-1)  # (L, K)
    context = attn @ regions  # (L, E)
    match = F.cosine_similarity(context, words, dim=-1)  # (L,)
    return float(torch.log(torch.exp(5.0 * match).sum()) / 5.0)


def test_scores_match_the_per_pair_formula_and_chunking():
    tokens, valid, patches = _features()
    scores = gloria_scores(tokens, valid, patches)
    assert scores.shape == (3, 4) and scores.dtype == torch.float32
    for i in range(3):
        for j in range(4):
            assert scores[i, j].item() == pytest.approx(_pair_score(tokens[i][valid[i]], patches[j]), abs=1e-5)
    torch.testing.assert_close(gloria_scores(tokens, valid, patches, chunk=3), scores)


def test_report_without_words_scores_zero_and_loss_is_finite():
    tokens, valid, patches = _features(bt=4)
    valid[2] = False
    scores = gloria_scores(tokens, valid, patches)
    assert torch.equal(scores[2], torch.zeros(4))
    loss = GloriaLocalLoss(0.07, 100.0)(tokens, valid, patches)
    assert torch.isfinite(loss)


def test_attention_rows_sum_to_one_and_gradients_reach_every_input():
    tokens, valid, patches = _features(bt=4, bi=4)
    tokens.requires_grad_(True)
    patches.requires_grad_(True)
    module = GloriaLocalLoss(0.07, 100.0)
    attn = module.attention(tokens, patches)
    assert attn.shape == (4, 5, 6)
    torch.testing.assert_close(attn.sum(-1), torch.ones(4, 5))
    loss = module(tokens, valid, patches)
    loss.backward()
    assert tokens.grad.abs().sum() > 0 and patches.grad.abs().sum() > 0
    assert module.logit_scale.log_scale.grad.abs().item() > 0
    assert torch.equal(tokens.grad[1, 3:], torch.zeros_like(tokens.grad[1, 3:]))  # padding words: no gradient


def test_stand_in_samples_leave_the_loss_unchanged():
    tokens, valid, patches = _features(bt=4, bi=4)
    module = GloriaLocalLoss(0.07, 100.0)
    keep = torch.tensor([True, True, False, True])
    idx = keep.nonzero().squeeze(1)
    full = module(tokens, valid, patches, keep)
    sub = module(tokens[idx], valid[idx], patches[idx])
    torch.testing.assert_close(full, sub)


def test_learns_a_toy_word_region_correspondence():
    """Each 'report' names 2 of 8 concepts; its image shows the same 2 concepts at 2 of 9 regions, the other
    regions background. Word and region encoders (linear maps from one-hot inputs) trained by the GLoRIA loss
    alone must (a) separate matching from non-matching pairs and (b) put each word's attention on the region
    that shows its concept (1 of 9 regions by chance)."""
    g = torch.Generator().manual_seed(0)
    n, concepts, regions, e = 64, 8, 9, 16
    words = torch.stack([torch.randperm(concepts, generator=g)[:2] for _ in range(n)])  # (N, 2)
    where = torch.stack([torch.randperm(regions, generator=g)[:2] for _ in range(n)])  # (N, 2)
    image = torch.full((n, regions), concepts, dtype=torch.long)  # index `concepts` = background
    image.scatter_(1, where, words)
    word_enc = torch.nn.Embedding(concepts, e)
    region_enc = torch.nn.Embedding(concepts + 1, e)
    module = GloriaLocalLoss(0.1, 100.0)
    params = [*word_enc.parameters(), *region_enc.parameters(), *module.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    valid = torch.ones(n, 2, dtype=torch.bool)

    def encode(rows):
        return F.normalize(word_enc(words[rows]), dim=-1), F.normalize(region_enc(image[rows]), dim=-1)

    first = None
    for _ in range(300):
        rows = torch.randperm(n, generator=g)[:16]
        t, v = encode(rows)
        loss = module(t, valid[:16], v)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        t, v = encode(torch.arange(n))
        final = module(t, valid, v).item()
        attn = module.attention(t, v)  # (N, 2, 9)
        pointed = attn.argmax(-1)  # (N, 2) region each word looks at most
    assert final < 0.5 * first, (first, final)
    assert (pointed == where).float().mean() > 0.75  # chance: 1 region of 9


@pytest.mark.parametrize("align_on", ["full", "masked"])
def test_mpma_with_gloria_trains_every_parameter(align_on):
    model = create_model("mpma_tiny", local_loss="gloria", align_on=align_on)
    assert isinstance(model.local_loss, GloriaLocalLoss) and "gloria" in LOCAL_LOSSES
    out = model(make_batch(), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "loss_mlm", "loss_mim", "loss_global", "loss_local"}
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing


def test_unknown_local_loss_is_one_clear_error():
    with pytest.raises(ValueError, match="local_loss 'filip' is not a local alignment loss"):
        create_model("mpma_tiny", local_loss="filip")


def test_word_region_attention_is_softmax_of_scaled_cosine():
    tokens, _, patches = _features(bt=2, bi=2)
    attn = word_region_attention(tokens, patches, 4.0)
    torch.testing.assert_close(attn[1], (4.0 * tokens[1] @ patches[1].t()).softmax(-1))
