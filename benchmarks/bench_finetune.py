"""Fine-tuning step throughput vs the pretraining step of the same model (SPEC §8), one process, one run.

    python benchmarks/bench_finetune.py [--models mpma_tiny mpma_small] [--steps 12] [--out benchmarks/results]

mpma_tiny (the default) takes under a minute on 2 CPU cores; mpma_small about 10 minutes there (--steps 8).

For each model, every row is the real ``Trainer`` (``mpma_ds.runner.trainer.Trainer``: the task's module under
``deepspeed.initialize``, the same DeepSpeed config for all rows, ``--ds-config``, default ``cpu_zero2``) built
from the shipped recipe of its task, with the same micro-batch and image size (the text length is each recipe's
``data.max_text_len``, printed: the loader pads to it), from a random init, activation checkpointing off:

- ``pretrain``: ``pretrain_tiny.yaml``'s MPMA step — paired masking (75 % of patches, 15 % of tokens), the
  masked encoders, MA-CMF fusion, MLM + MAE heads, GLA (the recipe's extra unmasked alignment pass included);
- ``vqa``: the unmasked image and question through both encoders and the fusion, the answer head (BCE);
- ``cls``: the image encoder alone, all patches, and a linear head;
- ``retrieval``: both encoders unmasked, global InfoNCE;
- ``linear_probe``: a linear head on cached features (the features' one-off extraction is timed apart,
  ``extract``: images/s of the frozen encoder's pass over the training split, decode included — a Trainer build
  with an empty cache minus one that finds it).

What is timed is ``Trainer.train_step()`` — ``to_model``, the engine's forward, backward and optimizer step, the
loss all-reduce — over a few batches read beforehand and cycled, so the loader is not measured (bench_loader.py
does that). Each row: warm-up steps, then ``--steps`` timed steps; samples/s = micro-batch / the median step
time (robust to other jobs on a shared machine). The ratio column is each row's samples/s over the pretraining
row's. GFLOP/sample is the trainer's own count (``training_flops_per_sample``), where the task provides one.
Writes ``<out>/bench_finetune.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL_SETTINGS = {  # image size, micro-batch, studies in the corpus
    "mpma_tiny": (128, 16, 64),
    "mpma_small": (224, 8, 32),
}
TASKS = ("pretrain", "vqa", "cls", "retrieval", "linear_probe")
PREFETCH = 4  # distinct batches cycled through the timed steps
PROBE_STEPS = 20  # linear_probe steps take ~ms: time more of them


def make_data(work: Path, image_size: int, studies: int) -> dict[str, Path]:
    """A synthetic corpus → MIMIC shards, its synthetic VQA-RAD set → VQA shards, and a tokenizer (≤ 1024)."""
    from data_tools.build_shards import build_shards
    from data_tools.synth.corpus import generate_corpus
    from data_tools.synth.vqa import generate_vqa
    from data_tools.train_tokenizer import train_tokenizer

    size = dict(min_size=image_size, max_size=image_size + 32)
    generate_corpus(work / "corpus", studies, 3, lateral_fraction=0.0, **size)
    build_shards(
        "mimic-cxr", work / "corpus", work / "shards", shard_size=64, image_size=image_size, progress=False
    )
    generate_vqa(work / "corpus", work / "vqa", seed=0, image_size=image_size)
    build_shards(
        "vqa-rad", work / "vqa", work / "vqa_shards", shard_size=64, image_size=image_size, progress=False
    )
    train_tokenizer(work / "shards", work / "tokenizer", 1024, min_frequency=1)
    return {"shards": work / "shards", "vqa_shards": work / "vqa_shards", "tokenizer": work / "tokenizer"}


def recipe_for(task: str, model: str, data: dict[str, Path], out: Path, ds_config: str):
    from mpma_ds.recipes import find_recipe
    from mpma_ds.training import load_recipe
    from mpma_ds.training.recipe import FinetuneRecipe

    image_size, micro, _ = MODEL_SETTINGS[model]
    shards = data["vqa_shards"] if task == "vqa" else data["shards"]
    values: dict[str, object] = {
        "model.name": model,
        # every row without activation checkpointing (mpma_small's model config turns it on, and
        # train.grad_checkpointing=false does not turn it off)
        "model.overrides.grad_checkpointing": False,
        "data.train_shards": shards / "train",
        "data.val_shards": "",
        "data.tokenizer": data["tokenizer"],
        "data.image_size": image_size,
        "data.num_workers": 0,
        "data.shuffle_buffer": 16,
        "train.global_batch_size": micro,
        "train.micro_batch_size": micro,
        "train.max_steps": 1000,  # the schedule's length; only a few steps run
        "train.warmup_steps": 1,
        "train.save_every": 0,
        "train.eval_every": 0,
        "train.output_dir": out,
        "tracking.enabled": False,
        "deepspeed_config": ds_config,
    }
    if task == "pretrain":
        return load_recipe(find_recipe("pretrain_tiny"), [f"{k}={v}" for k, v in values.items()])
    values.update({"init.from": "random", "data.test_shards": "", "train.epochs": 0, "train.eval_every_epochs": 0})
    if task == "linear_probe":
        values["task.linear_probe.cache_dir"] = out / "features"
    return load_recipe(
        find_recipe(f"finetune_{task}_tiny"), [f"{k}={v}" for k, v in values.items()], cls=FinetuneRecipe
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def extraction_rate(model: str, data: dict[str, Path], work: Path, ds_config: str) -> float:
    """Images/s of the linear probe's one-off feature pass over the training split: a Trainer build with an empty
    feature cache minus a build that finds it (decode and the frozen encoder's forward)."""
    from mpma_ds.runner.trainer import Trainer

    recipe = recipe_for("linear_probe", model, data, work / f"{model}-extract", ds_config)
    seconds = []
    for _ in range(2):  # extracts, then reads the cache
        t0 = time.perf_counter()
        with Trainer(recipe) as trainer:
            images = trainer.loaders[0].num_samples
        seconds.append(time.perf_counter() - t0)
    return images / max(seconds[0] - seconds[1], 1e-9)


def bench_task(task: str, model: str, data: dict[str, Path], work: Path, steps: int, ds_config: str) -> dict:
    from mpma_ds.runner.trainer import Trainer

    _, micro, _ = MODEL_SETTINGS[model]
    recipe = recipe_for(task, model, data, work / f"{model}-{task}", ds_config)
    with Trainer(recipe) as trainer:
        batches = [next(trainer.iters[0]) for _ in range(PREFETCH)]
        trainer.iters = [itertools.cycle(batches)]
        n = PROBE_STEPS * steps if task == "linear_probe" else steps
        for _ in range(2):  # warm-up: allocator, optimizer state, autotuning
            trainer.train_step()
        times = []
        for _ in range(n):
            _sync(trainer.ctx.device)
            t0 = time.perf_counter()
            trainer.train_step()
            _sync(trainer.ctx.device)
            times.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad)
        text_len = recipe.data.max_text_len if task not in ("cls", "linear_probe") else 0
        flops = trainer.flops_per_sample
        device = str(trainer.ctx.device)
    step = statistics.median(times)
    row = {
        "model": model,
        "task": task,
        "device": device,
        "micro_batch": micro,
        "text_len": text_len,
        "steps_timed": n,
        "step_s_median": step,
        "step_s_mean": statistics.fmean(times),
        "samples_per_s": micro / step,
        "trainable_params": params,
        "gflop_per_sample": flops / 1e9 if flops else None,
    }
    if task == "linear_probe":
        row["extract_images_per_s"] = extraction_rate(model, data, work, ds_config)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mpma_tiny"], choices=list(MODEL_SETTINGS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--steps", type=int, default=12, help="timed steps per row (linear_probe: 20x as many)")
    parser.add_argument("--ds-config", default="cpu_zero2", help="DeepSpeed config of every row (name or path)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "pretrain" not in args.tasks:
        args.tasks = ["pretrain", *args.tasks]  # the baseline of every ratio
    from tqdm import tqdm

    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        for model in args.models:
            image_size, _, studies = MODEL_SETTINGS[model]
            work = Path(tmp) / model
            data = make_data(work, image_size, studies)
            for task in tqdm(args.tasks, desc=f"bench_finetune {model}"):
                results.append(bench_task(task, model, data, work, args.steps, args.ds_config))
    header = (
        f"{'model':<11} {'task':<13} {'batch':>5} {'text':>5} {'step ms':>9} {'samples/s':>10} {'x pretrain':>10} "
        f"{'trainable':>11} {'GFLOP/sample':>12}"
    )
    print(header)
    print("-" * len(header))
    for model in args.models:
        rows = [r for r in results if r["model"] == model]
        base = next(r for r in rows if r["task"] == "pretrain")
        for r in rows:
            r["vs_pretrain"] = r["samples_per_s"] / base["samples_per_s"]
            gflop = f"{r['gflop_per_sample']:.3f}" if r["gflop_per_sample"] else "-"
            print(
                f"{model:<11} {r['task']:<13} {r['micro_batch']:>5} {r['text_len'] or '-':>5} "
                f"{1000 * r['step_s_median']:>9.1f} "
                f"{r['samples_per_s']:>10.1f} {r['vs_pretrain']:>10.2f} {r['trainable_params']:>11,} {gflop:>12}"
            )
        for r in rows:
            if "extract_images_per_s" in r:
                print(f"{model:<11} {'  (extract)':<13} {'':>5} {'':>5} {'':>9} {r['extract_images_per_s']:>10.1f}  "
                      "images/s: the linear probe's one-off feature pass over the training split")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_finetune.json"
    meta = {"machine": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "ds_config": args.ds_config, "seconds": time.perf_counter() - started}  # fmt: skip
    path.write_text(json.dumps({**meta, "runs": results}, indent=1))
    print(
        f"one process, {args.ds_config}, the real Trainer.train_step on prefetched batches (loader not timed), "
        f"median of {args.steps} steps; baseline: the pretraining step of the same model; results in {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
