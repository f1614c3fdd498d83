"""The GPU DeepSpeed configs (zero3_bf16, zero3_offload, zero2_bf16) build for 8 data-parallel ranks, and the
ZeRO-3 settings fit mpma_base's parameters as docs/training.md reasons (no GPU needed: the model is built on the
meta device, DeepSpeedConfig is given a world size)."""

from __future__ import annotations

import pytest
import torch

from mpma_ds.models import create_model
from mpma_ds.training.ds_config import load_ds_config, resolve_ds_config
from mpma_ds.training.recipe import TrainConfig

GPU_CONFIGS = ("zero3_bf16", "zero3_offload", "zero2_bf16")


class _DataParallel:
    """The one question DeepSpeedConfig asks an ``mpu``: the data-parallel world size."""

    def __init__(self, world: int) -> None:
        self.world = world

    def get_data_parallel_world_size(self) -> int:
        return self.world


@pytest.fixture(scope="module")
def base_blocks():
    """mpma_base on the meta device: (largest transformer block numel, largest parameter, 1-D sizes, total)."""
    from mpma_ds.training.compile import transformer_blocks

    with torch.device("meta"):
        model = create_model("mpma_base")
    blocks = max(sum(p.numel() for p in b.parameters()) for b in transformer_blocks(model))
    params = list(model.parameters())
    return {
        "block": blocks,
        "largest": max(p.numel() for p in params),
        "vectors": max(p.numel() for p in params if p.ndim == 1),
        "matrices": min(p.numel() for p in params if p.ndim == 2 and min(p.shape) >= 256),
        "total": sum(p.numel() for p in params),
    }


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_config_builds_for_eight_ranks(name, monkeypatch):
    from deepspeed.runtime import config as ds_runtime_config

    monkeypatch.setattr(ds_runtime_config.dist, "get_rank", lambda *a, **k: 0)  # as if in a process group
    train = TrainConfig(global_batch_size=256, micro_batch_size=32)
    with monkeypatch.context() as gpu:  # resolve as on a GPU machine (on CPU the bf16 section is switched off)
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        resolved = resolve_ds_config(load_ds_config(name), train, world_size=8)
    parsed = ds_runtime_config.DeepSpeedConfig(resolved, mpu=_DataParallel(8))
    assert parsed.world_size == 8
    assert parsed.train_batch_size == 256 and parsed.train_micro_batch_size_per_gpu == 32
    assert parsed.gradient_accumulation_steps == 1
    assert parsed.bfloat16_config.enabled
    zero = parsed.zero_config
    assert zero.stage == (2 if name == "zero2_bf16" else 3)
    assert zero.overlap_comm and zero.contiguous_gradients
    if name == "zero3_offload":
        assert zero.offload_optimizer.device == "cpu" and zero.offload_param.device == "cpu"


@pytest.mark.parametrize("name", ["zero3_bf16", "zero3_offload"])
def test_zero3_settings_fit_the_base_model(name, base_blocks):
    zero = load_ds_config(name)["zero_optimization"]
    # prefetch: the whole next block (the largest is an MA-CMF fusion layer, ~21 M) is fetched ahead
    assert zero["stage3_prefetch_bucket_size"] >= 2 * base_blocks["block"]
    # persistence: norms, biases and other vectors (and small tables: positions) stay whole on every rank, no
    # gather per use; every weight matrix (both sides >= 256) is partitioned
    assert base_blocks["vectors"] < zero["stage3_param_persistence_threshold"] < base_blocks["matrices"]
    # live parameters: the tied word embedding (the largest tensor) plus a prefetched block fit at once
    assert zero["stage3_max_live_parameters"] >= base_blocks["largest"] + base_blocks["block"]
    if name == "zero3_bf16":  # on GPUs the whole base model stays gathered until reused (docs/training.md)
        assert zero["stage3_max_reuse_distance"] >= base_blocks["total"]
        assert zero["stage3_max_live_parameters"] >= base_blocks["total"]
