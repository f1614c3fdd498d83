"""build_engine in one process: train.grad_checkpointing true / false / null really switches activation
checkpointing (counted as the blocks' layers recomputed during backward)."""

from __future__ import annotations

import pytest
import torch
from model_testdata import gen, make_batch

from mpma_ds.distributed import close_distributed, init_distributed
from mpma_ds.models import create_model
from mpma_ds.training.ds_config import load_ds_config, resolve_ds_config
from mpma_ds.training.recipe import TrainConfig


@pytest.fixture(scope="module")
def process_group():
    created = init_distributed()
    yield
    if created:
        close_distributed()


def _blocks(model) -> list[torch.nn.Module]:
    """Every checkpointable transformer block: image encoder, text encoder, fusion, MAE decoder."""
    return [
        *model.image_encoder.blocks,
        *model.text_encoder.encoder.layer,
        *model.fusion.layers,
        *model.mae_decoder.blocks,
    ]


def _count_recomputed(engine, model) -> tuple[int, int]:
    """(linear-layer calls inside the blocks during the forward pass, during backward = recomputations)."""
    phase = {"now": "forward"}
    counts = {"forward": 0, "backward": 0}

    def counted(forward):
        def wrapper(*args, **kwargs):  # module hooks do not fire on a checkpoint's recomputation; forward does
            counts[phase["now"]] += 1
            return forward(*args, **kwargs)

        return wrapper

    # the blocks' linear layers: a block's own forward may be wrapped by its library (transformers checkpoints
    # the class's forward), its sub-modules are called through the instance either way
    linears = [m for blk in _blocks(model) for m in blk.modules() if isinstance(m, torch.nn.Linear)]
    for lin in linears:
        lin.forward = counted(lin.forward)
    try:
        loss = engine(make_batch(2, 16, seed=1), generator=gen(0))["loss"]
        phase["now"] = "backward"
        engine.backward(loss)
    finally:
        for lin in linears:
            del lin.forward  # back to the class's method
    return counts["forward"], counts["backward"]


@pytest.mark.parametrize(
    ("model_default", "recipe", "expect_on"),
    [(True, False, False), (True, None, True), (False, True, True), (False, None, False)],
    ids=[
        "default-on/recipe-false",
        "default-on/recipe-null",
        "default-off/recipe-true",
        "default-off/recipe-null",
    ],
)
def test_recipe_grad_checkpointing_switches_it(process_group, model_default, recipe, expect_on):
    from mpma_ds.training.engine import build_engine

    torch.manual_seed(0)
    model = create_model("mpma_tiny", grad_checkpointing=model_default)
    assert model.grad_checkpointing is model_default
    cfg = TrainConfig(
        global_batch_size=2, micro_batch_size=2, max_steps=2, warmup_steps=0, grad_checkpointing=recipe
    )
    ds_config = resolve_ds_config(load_ds_config("cpu_dp"), cfg, 1)
    engine, _, _ = build_engine(model, cfg, ds_config, world_size=1)
    forward, recomputed = _count_recomputed(engine, model)
    assert forward >= 4 * len(_blocks(model))  # every block ran (>= 4 linear layers each)
    assert model.grad_checkpointing is expect_on
    # checkpointing on: every block is recomputed once in backward; off: none is
    assert recomputed == (forward if expect_on else 0), (forward, recomputed)
