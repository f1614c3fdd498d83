"""The global InfoNCE across 2 processes (gloo): same loss as one process, gradients flow through the gather."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mpma_ds.models import create_model
from mpma_ds.models.losses import gather_with_grad, global_infonce

B_PER_RANK, DIM, WORLD = 3, 8, 2


def _features() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(WORLD * B_PER_RANK, DIM, generator=g), dim=-1)
    text = F.normalize(image + 0.5 * torch.randn(WORLD * B_PER_RANK, DIM, generator=g), dim=-1)
    return image, text


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        image, text = _features()
        rows = slice(rank * B_PER_RANK, (rank + 1) * B_PER_RANK)
        img = image[rows].clone().requires_grad_(True)
        txt = text[rows].clone().requires_grad_(True)
        loss = global_infonce(img, txt, torch.tensor(10.0), rank=rank, world_size=WORLD)
        loss.backward()
        gathered = gather_with_grad(img.detach(), WORLD)
        torch.save(
            {"loss": loss.detach(), "img_grad": img.grad, "txt_grad": txt.grad, "gathered": gathered},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_infonce_gathers_with_gradients(tmp_path):
    # spawn, not fork: a child forked from a parent whose OpenMP pool is already running deadlocks in its
    # first parallel op (seen in the full suite: both ranks stuck inside cross_entropy).
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    image, text = _features()
    img, txt = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    full = global_infonce(img, txt, torch.tensor(10.0))  # one process, whole batch
    full.backward()

    torch.testing.assert_close(results[0]["gathered"], image)
    # mean of the ranks' losses = the one-process loss over the whole batch
    torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, full.detach())
    # each rank's gradient = world_size x the whole-batch gradient of its rows (data-parallel averaging
    # of parameter gradients then gives exactly the one-process gradient); without the gather-with-grad
    # the other rank's loss would not reach these rows and this would fail.
    for r, res in enumerate(results):
        rows = slice(r * B_PER_RANK, (r + 1) * B_PER_RANK)
        torch.testing.assert_close(res["img_grad"], WORLD * img.grad[rows])
        torch.testing.assert_close(res["txt_grad"], WORLD * txt.grad[rows])


def test_single_process_needs_no_process_group():
    assert not dist.is_initialized()
    x = torch.randn(4, 8)
    assert gather_with_grad(x, 1) is x
    model = create_model("mpma_tiny")
    model.set_distributed(0, 1)
    with pytest.raises(ValueError, match="invalid rank 2 / world_size 2"):
        model.set_distributed(2, 2)
