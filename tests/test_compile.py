"""train.compile: per-block torch.compile under ZeRO-3 (cpu_zero3, one process) with activation checkpointing
gives eager mode's losses, step by step."""

from __future__ import annotations

import os

import pytest
import torch

from mpma_ds.models import create_model
from mpma_ds.training.compile import compile_blocks, transformer_blocks
from tests.model_testdata import make_batch

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ONE_LAYER = dict(vision_layers=1, text_layers=1, fusion_layers=1, decoder_layers=1, grad_checkpointing=True)


def test_blocks_found_in_every_stack():
    model = create_model("mpma_tiny")
    blocks = transformer_blocks(model)
    cfg = model.config
    assert len(blocks) == cfg.vision_layers + cfg.text_layers + cfg.fusion_layers + cfg.decoder_layers
    assert compile_blocks(model, False) == 0
    names = set(model.state_dict())
    assert compile_blocks(model, True) == len(blocks)
    assert compile_blocks(model, True) == 0  # already compiled: left as is
    assert set(model.state_dict()) == names  # only forward is replaced: checkpoints keep their keys


@pytest.mark.slow
def test_compiled_zero3_steps_match_eager(monkeypatch):
    """Dynamo + AOTAutograd tracing of every block under ZeRO-3's hooks and checkpointing (``aot_eager``: the
    same graphs inductor gets, without its minutes of C++ code generation on 2 cores; with inductor this test
    passes as well, in ~6 minutes)."""
    import deepspeed.utils.groups as ds_groups

    from mpma_ds.training import compile as compile_mod

    monkeypatch.setattr(compile_mod, "COMPILE_KWARGS", {"backend": "aot_eager"})
    from mpma_ds.distributed import close_distributed, init_distributed
    from mpma_ds.training import build_engine
    from mpma_ds.training.ds_config import load_ds_config, resolve_ds_config
    from mpma_ds.training.recipe import TrainConfig

    saved_env = {k: os.environ.get(k) for k in DIST_ENV}
    batch = make_batch(4, 32, seed=2)
    losses = {}
    ds_groups._WORLD_GROUP = None  # a stale clone from an earlier in-process run (see test_export)
    created = init_distributed()
    try:
        for compiled in (False, True):
            torch.manual_seed(0)
            model = create_model("mpma_tiny", **ONE_LAYER)
            cfg = TrainConfig(global_batch_size=4, micro_batch_size=4, lr=1e-3, warmup_steps=0, max_steps=3,
                              grad_checkpointing=True, compile=compiled)  # fmt: skip
            ds_config = resolve_ds_config(load_ds_config("cpu_zero3"), cfg, 1)
            engine, _, _ = build_engine(model, cfg, ds_config, world_size=1)
            assert all(getattr(b, "_mpma_compiled", False) == compiled for b in transformer_blocks(model))
            run = []
            for step in range(3):  # the first step compiles, the next two reuse the graphs
                out = engine(batch, generator=torch.Generator().manual_seed(step))
                engine.backward(out["loss"])
                engine.step()
                run.append(out["loss"].item())
            losses[compiled] = run
            engine.destroy()
    finally:
        if created:
            close_distributed()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert losses[True][0] == pytest.approx(losses[False][0], abs=1e-5)
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    assert losses[False][2] < losses[False][0]  # it trains
