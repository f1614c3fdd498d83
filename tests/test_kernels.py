"""mpma_ds.kernels: every implementation against the reference, values and gradients.

CPU: ``chunked`` always, ``triton`` through Triton's interpreter (``TRITON_INTERPRET=1``, small sizes).
GPU (``gpu`` marker): compiled Triton at the base recipe's sizes. Tolerances: fp32 ``atol 1e-5`` (the same
sums in another order); bf16 inputs ``atol 2e-2`` against the fp32 reference of the same bf16 values (one
bf16 rounding of a cosine / a logit is ~4e-3; measured differences are ~1e-3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mpma_ds import kernels
from mpma_ds.kernels import late_interaction as li
from mpma_ds.kernels import linear_ce as lce
from mpma_ds.models import create_model
from tests.model_testdata import make_batch

FP32_TOL = 1e-5
BF16_TOL = 2e-2


TRITON_CASES = [(kind, dt, mask) for kind in ("late", "ce") for dt in ("float32", "bfloat16") for mask in (0, 1)]


def triton_interpreter_diffs() -> dict[str, list[float]]:
    """Run in a child process with ``TRITON_INTERPRET=1`` (triton reads it at import): every CPU Triton case's
    max |triton - reference| per output, keyed ``kind/dtype/mask``."""
    out = {}
    for kind, dt, mask in TRITON_CASES:
        dtype = getattr(torch, dt)
        if kind == "late":  # L 20 and K 18 cross the 16-wide tiles, E 40 the E tiles
            inputs = _late_inputs(bt=2, bi=3, length=20, k=18, dim=40, patch_mask=bool(mask))
            got, want = _late_run("triton", *inputs, dtype), _reference(*inputs, dtype)
        else:
            lce.CE_CHUNK_ELEMS = 13 * 600  # 512-wide chunks: 3 chunks of 1500
            inputs = _ce_inputs(bias=bool(mask))
            got, want = _ce_run("triton", *inputs, dtype), _ce_reference(*inputs, dtype)
        out[f"{kind}/{dt}/{mask}"] = [(a - b).abs().max().item() for a, b in zip(got, want, strict=True)]
    return out


@pytest.fixture(scope="module")
def interpreted_triton_diffs():
    pytest.importorskip("triton")
    code = "import json; from tests.test_kernels import triton_interpreter_diffs as f; print(json.dumps(f()))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _late_inputs(bt=3, bi=4, length=10, k=7, dim=20, *, patch_mask=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(bt, length, dim, generator=g), dim=-1)
    patches = F.normalize(torch.randn(bi, k, dim, generator=g), dim=-1)
    text_mask = torch.rand(bt, length, generator=g) > 0.3
    text_mask[1] = False  # a report without a valid token: its p2t row is 0
    pmask = None
    if patch_mask:
        pmask = torch.rand(bi, k, generator=g) > 0.3
        pmask[2] = False  # an image without a valid patch: its t2p column is 0
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    return move(text), move(text_mask), move(patches), move(pmask)


def _late_run(impl, text, text_mask, patches, pmask, dtype):
    """Scores and input gradients of a fixed random linear function of both score matrices."""
    g = torch.Generator().manual_seed(1)
    w1, w2 = (torch.randn(text.shape[0], patches.shape[0], generator=g).to(text.device) for _ in range(2))
    t = text.to(dtype).requires_grad_()
    p = patches.to(dtype).requires_grad_()
    t2p, p2t = kernels.late_interaction_scores(t, text_mask, p, pmask, impl=impl)
    assert t2p.dtype == dtype and t2p.shape == (text.shape[0], patches.shape[0])
    ((t2p.float() * w1).sum() + (p2t.float() * w2).sum()).backward()
    return [x.float() for x in (t2p, p2t, t.grad, p.grad)]


def _reference(text, text_mask, patches, pmask, dtype):
    """The reference on fp32 copies of the (possibly bf16-rounded) inputs."""
    return _late_run(
        "reference", text.to(dtype).float(), text_mask, patches.to(dtype).float(), pmask, torch.float32
    )


def _assert_close(got, want, tol):
    assert len(got) == len(want) >= 3
    for name, a, b in zip(("t2p/loss", "p2t/dh", "d_text/dW", "d_patches/db"), got, want):
        assert torch.allclose(a, b, atol=tol, rtol=0), f"{name}: max |diff| {(a - b).abs().max().item():.2e}"


# ------------------------------------------------------------------------------------- late interaction
def test_reference_is_the_definition():
    """The reference against a per-pair loop written from the docstring (masks, empty report, empty image)."""
    text, tm, patches, pm = _late_inputs()
    t2p, p2t = kernels.late_interaction_scores(text, tm, patches, pm, impl="reference")
    for i in range(text.shape[0]):
        for j in range(patches.shape[0]):
            sim = text[i][tm[i]] @ patches[j][pm[j]].t()  # (valid L, valid K)
            want_t2p = sim.amax(1).mean() if sim.numel() else torch.tensor(0.0)
            want_p2t = sim.amax(0).mean() if sim.numel() else torch.tensor(0.0)
            assert t2p[i, j].item() == pytest.approx(want_t2p.item(), abs=1e-6)
            assert p2t[i, j].item() == pytest.approx(want_p2t.item(), abs=1e-6)
    assert (t2p[:, 2] == 0).all() and (p2t[1] == 0).all()


@pytest.mark.parametrize("patch_mask", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_late_interaction_chunked_matches_reference(monkeypatch, patch_mask, dtype):
    monkeypatch.setattr(li, "CHUNK_ELEMS", 2 * 10 * 7)  # 1x1 .. 2x2 blocks: every block edge is crossed
    inputs = _late_inputs(bt=5, bi=3, patch_mask=patch_mask)
    got = _late_run("chunked", *inputs, dtype)
    _assert_close(got, _reference(*inputs, dtype), FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "/".join(map(str, c)))
def test_triton_interpreted_matches_reference(interpreted_triton_diffs, case):
    """Both Triton kernels (forward and backward) on CPU through the interpreter, against the reference:
    late interaction with and without a patch mask, linear CE with and without a bias, fp32 and bf16."""
    kind, dt, mask = case
    diffs = interpreted_triton_diffs[f"{kind}/{dt}/{mask}"]
    tol = FP32_TOL if dt == "float32" else BF16_TOL
    assert len(diffs) >= 3 and max(diffs) <= tol, diffs


def test_local_loss_default_is_the_old_formula():
    """losses.late_interaction_scores (patch_mask None) keeps its meaning: 0.5 * (t2p + p2t) of the reference."""
    from mpma_ds.models.losses import late_interaction_scores

    text, tm, patches, _ = _late_inputs(patch_mask=False)
    old = late_interaction_scores(text, tm, patches, impl="reference")
    t2p, p2t = kernels.late_interaction_reference(text, tm, patches)
    assert torch.equal(old, 0.5 * (t2p + p2t))
    assert torch.allclose(late_interaction_scores(text, tm, patches, impl="chunked"), old, atol=FP32_TOL)


# ------------------------------------------------------------------------------------- linear cross-entropy
def _ce_inputs(rows=13, dim=24, vocab=1500, *, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * 0.3
    b = torch.randn(vocab, generator=g) * 0.1 if bias else None
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::3] = -100
    labels[1] = vocab - 1  # the last column, in the last (partial) chunk
    return [None if x is None else x.to(device) for x in (hidden, weight, b, labels)]


def _ce_run(impl, hidden, weight, bias, labels, dtype):
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    b = None if bias is None else bias.to(dtype).requires_grad_()
    loss = kernels.linear_cross_entropy(h, w, b, labels, impl=impl)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    (loss * 1.7).backward()
    return [loss] + [x.grad.float() for x in (h, w, b) if x is not None]


def _ce_reference(hidden, weight, bias, labels, dtype):
    cast = lambda x: None if x is None else x.to(dtype).float()  # noqa: E731
    return _ce_run("reference", cast(hidden), cast(weight), cast(bias), labels, torch.float32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_ce_chunked_matches_reference(monkeypatch, bias, dtype):
    monkeypatch.setattr(lce, "CE_CHUNK_ELEMS", 13 * 600)  # 600 -> clamped to 512-wide chunks: 3 chunks of 1500
    inputs = _ce_inputs(bias=bias)
    got = _ce_run("chunked", *inputs, dtype)
    _assert_close(got, _ce_reference(*inputs, dtype), FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_ce_chunked_under_autocast(monkeypatch, bias):
    """fp32 weights, bf16 autocast (how a plain-PyTorch bf16 step runs the MLM head): the backward, which runs
    outside autocast, recomputes the chunks' logits in bf16 as the forward did (it mixed dtypes and raised),
    and matches the reference under the same autocast."""
    monkeypatch.setattr(lce, "CE_CHUNK_ELEMS", 13 * 600)  # 3 chunks: the backward recomputes each
    hidden, weight, bias_, labels = _ce_inputs(bias=bias)
    results = []
    for impl in ("reference", "chunked"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        b = None if bias_ is None else bias_.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = kernels.linear_cross_entropy(h.to(torch.bfloat16), w, b, labels, impl=impl)
        loss.backward()
        assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
        results.append([loss] + [x.grad for x in (h, w, b) if x is not None])
    _assert_close(results[1], results[0], BF16_TOL)


def test_linear_ce_leading_shape_and_no_target():
    hidden, weight, bias, labels = _ce_inputs(rows=12)
    flat = kernels.linear_cross_entropy(hidden, weight, bias, labels, impl="chunked")
    shaped = kernels.linear_cross_entropy(hidden.view(3, 4, -1), weight, bias, labels.view(3, 4), impl="chunked")
    assert shaped.item() == pytest.approx(flat.item(), abs=1e-6)
    for impl in ("reference", "chunked"):
        w = weight.clone().requires_grad_()
        loss = kernels.linear_cross_entropy(hidden, w, bias, torch.full_like(labels, -100), impl=impl)
        loss.backward()
        assert loss.item() == 0.0 and w.grad is not None and not w.grad.any()


def test_bad_input_is_one_clear_error():
    hidden, weight, bias, labels = _ce_inputs()
    with pytest.raises(ValueError, match="outside \\[0, 1500\\)"):
        kernels.linear_cross_entropy(hidden, weight, bias, labels.clamp(min=0) + 1500, impl="chunked")
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.linear_cross_entropy(hidden, weight, bias, labels, impl="fast")
    with pytest.raises(ValueError, match="share E"):
        kernels.late_interaction_scores(torch.zeros(2, 3, 4), torch.ones(2, 3), torch.zeros(2, 5, 6))


def test_auto_picks_chunked_on_cpu_and_triton_needs_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.resolve_impl("auto", torch.device("cpu"), what="x") == "chunked"
    if kernels.triton_available():
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            kernels.resolve_impl("triton", torch.device("cpu"), what="x")
        assert kernels.resolve_impl("auto", torch.device("cuda"), what="x") == "triton"


# ------------------------------------------------------------------------------------- in the model
def test_model_losses_and_gradients_equal_across_kernel_impls():
    """mpma_tiny: the chunked kernels give the reference's losses and every parameter's gradient."""
    batch = make_batch(4, 32, seed=3)
    results = {}
    for impl in ("reference", "chunked"):
        torch.manual_seed(0)
        model = create_model("mpma_tiny", kernel_impl=impl, grad_checkpointing=False)
        out = model(batch, generator=torch.Generator().manual_seed(5))
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = ({k: v.item() for k, v in out.items()}, grads)
    (ref_loss, ref_grads), (got_loss, got_grads) = results["reference"], results["chunked"]
    assert got_loss == pytest.approx(ref_loss, abs=1e-5)
    assert got_grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert torch.allclose(got_grads[name], g, atol=1e-5, rtol=1e-4), name


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_at_base_sizes(dtype):
    """Compiled kernels at the base recipe's local-loss size (B 32, L 128, K 72, E 256) and MLM head size."""
    inputs = _late_inputs(bt=32, bi=32, length=128, k=72, dim=256, device="cuda")
    # fp32: the reference's einsum may use TF32 on CUDA; compare at the bf16-level tolerance there as well
    tol = 1e-4 if dtype == torch.float32 else BF16_TOL
    torch.backends.cuda.matmul.allow_tf32 = False
    _assert_close(_late_run("triton", *inputs, dtype), _reference(*inputs, dtype), tol)
    ce = _ce_inputs(rows=600, dim=768, vocab=50265, device="cuda")
    _assert_close(
        _ce_run("triton", *ce, dtype), _ce_reference(*ce, dtype), 1e-4 if dtype == torch.float32 else BF16_TOL
    )
