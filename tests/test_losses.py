"""GLA losses: InfoNCE in fp32 under bf16 autocast; stand-in samples (valid=False) enter no loss term of MPMA,
neither as samples nor as contrastive negatives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_testdata import gen, make_batch

from mpma_ds.models import create_model, losses
from mpma_ds.models.losses import global_infonce, masked_patch_mse, symmetric_infonce

TERMS = ("loss_mlm", "loss_mim", "loss_global", "loss_local", "loss_itm")


def _embeddings(b: int = 8, e: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, e, generator=g), dim=-1)
    txt = F.normalize(img + 0.3 * torch.randn(b, e, generator=g), dim=-1)
    return img, txt


def _reference_infonce(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    logits = scale * img.double() @ txt.double().t()
    targets = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def test_global_infonce_logits_are_fp32_under_bf16_autocast(monkeypatch):
    """The embeddings come out of bf16 layers; the similarities and the cross-entropy must still be fp32
    (a bf16 cosine times a logit scale of 50 is off by up to ~0.2 per logit)."""
    img, txt = _embeddings()
    img, txt = img.bfloat16(), txt.bfloat16()  # what an autocast projection hands over
    seen = []
    real_ce = F.cross_entropy

    def spy(logits, *args, **kwargs):
        seen.append(logits.dtype)
        return real_ce(logits, *args, **kwargs)

    monkeypatch.setattr(losses.F, "cross_entropy", spy)
    scale = torch.tensor(50.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = global_infonce(img, txt, scale)
    assert seen == [torch.float32, torch.float32]
    assert loss.dtype == torch.float32
    reference = _reference_infonce(img.float(), txt.float(), 50.0)  # the same bf16 inputs, fp64 arithmetic
    assert abs(loss.item() - reference.item()) < 1e-5, (loss.item(), reference.item())


def test_local_infonce_logits_are_fp32_under_bf16_autocast(monkeypatch):
    seen = []
    real_ce = F.cross_entropy

    def spy(logits, *args, **kwargs):
        seen.append(logits.dtype)
        return real_ce(logits, *args, **kwargs)

    monkeypatch.setattr(losses.F, "cross_entropy", spy)
    module = losses.LocalAlignmentLoss(0.07, 100.0)
    g = torch.Generator().manual_seed(1)
    tokens = F.normalize(torch.randn(4, 6, 16, generator=g), dim=-1)
    patches = F.normalize(torch.randn(4, 9, 16, generator=g), dim=-1)
    token_valid = torch.ones(4, 6, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(tokens, token_valid, patches)
    assert seen and all(d == torch.float32 for d in seen)
    assert loss.dtype == torch.float32


def test_invalid_rows_and_columns_leave_the_infonce_of_the_rest():
    img, txt = _embeddings(8)
    valid = torch.tensor([True, True, False, True, True, True, False, True])
    scale = torch.tensor(20.0)
    masked = global_infonce(img, txt, scale, valid=valid)
    removed = global_infonce(img[valid], txt[valid], scale)
    torch.testing.assert_close(masked, removed, rtol=1e-6, atol=1e-6)
    # a positive scale: any content in the invalid rows would move the value
    img2, txt2 = img.clone(), txt.clone()
    img2[~valid], txt2[~valid] = img[valid][:2], txt[valid][:2]  # duplicates of valid pairs: false negatives
    torch.testing.assert_close(global_infonce(img2, txt2, scale, valid=valid), removed, rtol=1e-6, atol=1e-6)
    assert abs(global_infonce(img2, txt2, scale).item() - removed.item()) > 1e-2  # unmasked, they do count
    logits = scale * img @ txt.t()
    sub = scale * img[valid] @ txt[valid].t()
    torch.testing.assert_close(
        symmetric_infonce(logits, valid=valid), symmetric_infonce(sub), rtol=1e-6, atol=1e-6
    )
    none_valid = global_infonce(img, txt, scale, valid=torch.zeros(8, dtype=torch.bool))
    assert none_valid.item() == 0.0


def test_masked_patch_mse_is_the_mean_over_valid_samples():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(5, 7, 12, generator=g), torch.randn(5, 7, 12, generator=g)
    valid = torch.tensor([True, False, True, True, False])
    torch.testing.assert_close(
        masked_patch_mse(pred, target, valid=valid),
        masked_patch_mse(pred[valid], target[valid]),
        rtol=1e-6,
        atol=0,
    )


@pytest.fixture(scope="module")
def itm_model():
    torch.manual_seed(0)
    model = create_model("mpma_tiny", w_itm=0.5)
    return model.eval()  # no dropout: equal inputs give equal losses


def _losses(model, batch, seed=3):
    with torch.no_grad():
        return model(batch, generator=gen(seed))


def _rows(batch: dict, keep: torch.Tensor) -> dict:
    return {
        k: (v[keep] if torch.is_tensor(v) else [x for x, ok in zip(v, keep.tolist()) if ok])
        for k, v in batch.items()
    }


def test_invalid_samples_change_no_loss_term(itm_model):
    batch = make_batch(6, 24, seed=11)
    batch["valid"] = torch.tensor([True, False, True, True, False, True])
    base = _losses(itm_model, batch)
    assert set(TERMS) <= set(base)
    other = make_batch(6, 24, seed=12)  # entirely different images, reports and masks
    changed = dict(batch)
    for key in ("image", "input_ids", "attention_mask", "mlm_labels"):
        changed[key] = torch.where(batch["valid"].view(-1, *[1] * (batch[key].ndim - 1)), batch[key], other[key])
    after = _losses(itm_model, changed)
    for term in TERMS:
        torch.testing.assert_close(after[term], base[term], rtol=1e-5, atol=1e-6, msg=term)
    # without the flags the same change moves every term: the test can see a leak
    unflagged = _losses(itm_model, {k: v for k, v in changed.items() if k != "valid"})
    plain = _losses(itm_model, {k: v for k, v in batch.items() if k != "valid"})
    for term in TERMS:
        assert abs(unflagged[term].item() - plain[term].item()) > 1e-4, term


def test_invalid_samples_weigh_like_removed_samples(itm_model):
    """The loader pads the end of a batch: the masked batch's per-sample-mean terms equal those of the batch
    without the padding (the image masks of the kept rows are drawn first, so they match)."""
    batch = make_batch(6, 24, seed=13)
    valid = torch.tensor([True, True, True, True, False, False])
    batch["valid"] = valid
    masked = _losses(itm_model, batch)
    removed = _losses(itm_model, _rows({k: v for k, v in batch.items() if k != "valid"}, valid))
    for term in ("loss_mlm", "loss_mim", "loss_global", "loss_local"):
        torch.testing.assert_close(masked[term], removed[term], rtol=1e-5, atol=1e-6, msg=term)
    all_valid = _losses(itm_model, dict(batch, valid=torch.ones(6, dtype=torch.bool)))
    no_key = _losses(itm_model, {k: v for k, v in batch.items() if k != "valid"})
    for term in TERMS:  # an all-True mask is the same as no mask
        torch.testing.assert_close(all_valid[term], no_key[term], rtol=1e-6, atol=1e-7, msg=term)


def _two_rank_worker(rank: int, port: int, img, txt, valid, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        b = img.shape[0] // 2
        part = slice(rank * b, (rank + 1) * b)
        loss = global_infonce(img[part], txt[part], torch.tensor(20.0), rank=rank, world_size=2, valid=valid[part])
        out[rank] = loss.item()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_an_invalid_row_on_one_rank_is_no_negative_on_the_other():
    """2 gloo ranks: each rank's loss is the InfoNCE of its valid rows against the valid rows of BOTH ranks;
    the other rank's stand-in rows are not among the negatives."""
    import torch.multiprocessing as mp

    from mpma_ds.distributed import free_port

    img, txt = _embeddings(8, seed=4)
    valid = torch.tensor([True, True, True, True, True, False, True, False])  # rank 1 holds two stand-ins
    img[5], txt[5] = img[0], txt[0]  # rank 1's stand-ins repeat rank 0's samples: false negatives if counted
    img[7], txt[7] = img[2], txt[2]
    out = mp.Manager().dict()
    mp.spawn(_two_rank_worker, args=(free_port(), img, txt, valid, out), nprocs=2, join=True)
    for rank in (0, 1):
        rows = torch.zeros(8, dtype=torch.bool)
        rows[rank * 4 : rank * 4 + 4] = True
        logits_i2t = 20.0 * img[rows & valid].double() @ txt[valid].double().t()
        logits_t2i = 20.0 * txt[rows & valid].double() @ img[valid].double().t()
        # each kept row's positive: its own column among the valid columns
        targets = torch.tensor([int(valid[:i].sum()) for i in range(8) if rows[i] and valid[i]])
        ref = 0.5 * (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets))
        assert out[rank] == pytest.approx(ref.item(), abs=1e-5), rank
