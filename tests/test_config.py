"""Recipes and DeepSpeed configs: every file in the repo parses and builds (litgpt test_config_hub style);
unknown keys / wrong types name the key; batch arithmetic, schedule and weight-decay groups hold values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import mpma_ds
from mpma_ds.models import get_model_config
from mpma_ds.training import RecipeError, load_recipe, recipe_to_dict, save_recipe
from mpma_ds.training.ds_config import gradient_accumulation_steps, load_ds_config, resolve_ds_config
from mpma_ds.training.engine import WarmupDecay, param_groups

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "launch" / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "mpma_ds" / "ds_configs").glob("*.json"))


def test_repo_ships_the_recipes_and_ds_configs_the_spec_names():
    assert {p.name for p in RECIPES} >= {"pretrain_tiny.yaml", "pretrain_small.yaml", "pretrain_base.yaml"}
    names = {p.name for p in DS_CONFIGS}
    assert names >= {"zero3_bf16.json", "zero3_offload.json", "zero2_bf16.json", "cpu_zero3.json"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_and_its_model_builds(path):
    recipe = load_recipe(path)
    assert Path(recipe.deepspeed_config).is_file()
    config = get_model_config(recipe.model.name, **recipe.model.overrides)
    with torch.device("meta"):  # full-size models without allocating them
        model = mpma_ds.create_model(recipe.model.name, **recipe.model.overrides)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 1e6
    assert recipe.data.image_size % config.patch_size == 0
    assert recipe.data.max_text_len <= config.max_text_len
    assert recipe.data.in_chans == config.in_chans
    # the recipe's batch arithmetic works on 1 and 8 ranks
    for world in (1, 8):
        if recipe.train.global_batch_size % (recipe.train.micro_batch_size * world) == 0:
            assert gradient_accumulation_steps(recipe.train, world) >= 1
    ds = resolve_ds_config(load_ds_config(recipe.deepspeed_config), recipe.train, 1)
    assert ds["train_batch_size"] == recipe.train.global_batch_size


def test_base_recipe_is_the_gpu_bf16_zero3_setting():
    recipe = load_recipe(ROOT / "launch/configs/pretrain_base.yaml")
    ds = load_ds_config(recipe.deepspeed_config)
    assert recipe.model.name == "mpma_base" and recipe.data.backend == "dali"
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 3
    tiny = load_recipe(ROOT / "launch/configs/pretrain_tiny.yaml")
    assert tiny.model.name == "mpma_tiny" and tiny.data.backend == "wds"
    assert Path(tiny.deepspeed_config).name == "cpu_zero3.json"


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_ds_config_resolves_and_deepspeed_accepts_it(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    recipe = load_recipe(None, ["train.global_batch_size=64", "train.micro_batch_size=8", "train.grad_clip=0.5"])
    assert resolve_ds_config(load_ds_config(path), recipe.train, world_size=2)["gradient_accumulation_steps"] == 4
    # without a process group DeepSpeedConfig assumes one rank
    resolved = resolve_ds_config(load_ds_config(path), recipe.train, world_size=1)
    assert resolved["gradient_accumulation_steps"] == 8
    assert resolved["gradient_clipping"] == 0.5
    parsed = DeepSpeedConfig(resolved)  # DeepSpeed's own validation of every key
    assert parsed.train_batch_size == 64
    assert parsed.train_micro_batch_size_per_gpu == 8
    assert parsed.gradient_accumulation_steps == 8
    assert parsed.zero_optimization_stage == load_ds_config(path).get("zero_optimization", {}).get("stage", 0)


def test_set_overrides_are_typed_and_the_saved_recipe_round_trips(tmp_path):
    recipe = load_recipe(
        ROOT / "launch/configs/pretrain_tiny.yaml",
        ["train.lr=3e-4", "train.max_steps=7", "data.backend=synthetic", "model.overrides.memory_slots=0",
         "tracking.run_name=abc", "train.betas=[0.8, 0.9]", "deepspeed_config=cpu_zero2"],
    )  # fmt: skip
    assert recipe.train.lr == pytest.approx(3e-4) and isinstance(recipe.train.lr, float)
    assert recipe.train.max_steps == 7 and recipe.data.backend == "synthetic"
    assert recipe.model.overrides == {  # merged into the recipe's own
        "align_on": "masked",
        "image_mask_ratio": 0.25,
        "w_mlm": 4.0,
        "memory_slots": 0,
    }
    assert recipe.train.betas == (0.8, 0.9) and recipe.tracking.run_name == "abc"
    assert Path(recipe.deepspeed_config).name == "cpu_zero2.json"
    path = save_recipe(recipe, tmp_path / "recipe.yaml")
    again = load_recipe(path)
    assert recipe_to_dict(again) == recipe_to_dict(recipe)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.lrr=1"], "train.lrr"),
        (["bogus=1"], "bogus"),
        (["data.shards=x"], "data.shards"),
        (["tracking.uri_typo=x"], "tracking.uri_typo"),
        (["train.lr=fast"], "train.lr must be a number"),
        (["train.max_steps=2.5"], "train.max_steps must be an integer"),
        (["train.grad_checkpointing=maybe"], "train.grad_checkpointing must be true or false"),
        (["data.image_size=big"], "data.image_size"),
        (["tracking.enabled=3"], "tracking.enabled"),
        (["train.schedule=step"], "train.schedule must be one of"),
        (["train.min_lr=1", "train.lr=0.1"], "train.min_lr"),
        (["deepspeed_config=ds_configs/nope.json"], "deepspeed_config"),
        (["deepspeed_config=zero9"], "name one of cpu_dp, cpu_zero2, cpu_zero3"),
        (["model.overrides.fusion_widht=3"], "fusion_widht"),
        (["model.overrides.vocab_size=big"], "vocab_size must be an integer"),
        (["train.layer_decay=0"], "train.layer_decay must be in (0, 1]"),
        (["train.lr"], "expected key.sub=value"),
    ],
)
def test_bad_recipe_values_name_the_key(overrides, needle):
    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "launch/configs/pretrain_tiny.yaml", overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_file_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    unknown_section = tmp_path / "u.yaml"
    unknown_section.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(RecipeError, match="unknown recipe key trainer"):
        load_recipe(unknown_section)
    # an empty file is refused as empty, naming it (not as a conflict of defaults)
    for text in ("", "# nothing but a comment\n", "{}\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(RecipeError, match=r"empty\.yaml is empty"):
            load_recipe(empty)
    # a wrong type deep in a section names the key and the file
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  max_steps: many\n")
    with pytest.raises(RecipeError, match=r"train\.max_steps must be an integer, got 'many' \(in .*typo\.yaml\)"):
        load_recipe(typo)


def test_global_batch_must_split_into_micro_x_accumulation_x_world():
    recipe = load_recipe(None, ["train.global_batch_size=32", "train.micro_batch_size=4"])
    assert gradient_accumulation_steps(recipe.train, 1) == 8
    assert gradient_accumulation_steps(recipe.train, 2) == 4
    assert gradient_accumulation_steps(recipe.train, 8) == 1
    with pytest.raises(
        RecipeError, match=r"global_batch_size=32 is not a multiple .*micro_batch_size=4 × world size 3 = 12"
    ):
        gradient_accumulation_steps(recipe.train, 3)
    with pytest.raises(RecipeError, match="not a multiple"):
        gradient_accumulation_steps(recipe.train, 16)


def test_ds_config_numbers_that_disagree_with_the_recipe_are_refused():
    recipe = load_recipe(None, ["train.global_batch_size=32", "train.micro_batch_size=4"])
    with pytest.raises(RecipeError, match="train_batch_size=64 disagrees"):
        resolve_ds_config({"train_batch_size": 64}, recipe.train, 1)
    with pytest.raises(RecipeError, match="remove the 'optimizer' section"):
        resolve_ds_config({"optimizer": {"type": "Adam"}}, recipe.train, 1)
    same = resolve_ds_config({"train_batch_size": 32, "gradient_accumulation_steps": 4}, recipe.train, 2)
    assert same["train_micro_batch_size_per_gpu"] == 4


def test_warmup_then_cosine_and_linear_decay_values():
    cos = WarmupDecay(warmup_steps=10, max_steps=110, schedule="cosine", min_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(4) == pytest.approx(0.5) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    lin = WarmupDecay(warmup_steps=0, max_steps=100, schedule="linear", min_ratio=0.0)
    assert lin(0) == pytest.approx(1.0) and lin(25) == pytest.approx(0.75) and lin(100) == pytest.approx(0.0)
    const = WarmupDecay(warmup_steps=4, max_steps=100, schedule="constant", min_ratio=0.0)
    assert const(1) == pytest.approx(0.5) and const(99) == pytest.approx(1.0)
    values = [cos(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    assert math.isclose(max(values), 1.0)


def test_weight_decay_groups_exempt_norms_biases_embeddings_temperature_memory():
    model = mpma_ds.create_model("mpma_tiny")
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = dict(model.named_parameters())
    assert set(decay["names"]).isdisjoint(no_decay["names"])
    assert set(decay["names"]) | set(no_decay["names"]) == set(names)  # every parameter exactly once
    for name in no_decay["names"]:
        assert names[name].ndim <= 1 or any(
            frag in name for frag in ("embed", "cls_token", "mask_token", "memory", "log_scale")
        ), name
    exempt = set(no_decay["names"])
    assert any("log_scale" in n for n in exempt)  # temperatures
    assert any(n.endswith("memory") for n in exempt)  # MA-CMF memory slots
    assert any("word_embeddings" in n for n in exempt)
    assert any("pos_embed" in n for n in exempt)
    assert any(n.endswith(".bias") for n in exempt) and any("norm" in n.lower() for n in exempt)
    assert all(names[n].ndim >= 2 for n in decay["names"])
    assert any("attn.qkv.weight" in n for n in decay["names"])  # ViT attention matrices decay
