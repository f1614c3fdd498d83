"""Training-step throughput and per-rank memory on 2 CPU ranks: ZeRO-3 vs ZeRO-2 vs plain data parallel.

    python benchmarks/bench_train.py [--models mpma_tiny mpma_small] [--steps 12] [--out benchmarks/results]
        [--only zero3 zero2] [--config NAME=JSON ...] [--repeats N]

Each (model, DeepSpeed config) pair is one real ``deepspeed --num_gpus 2 launch/pretrain.py`` run on the
``synthetic`` backend (the loader is not what is measured here), tracking and evaluation off. Figures:
steady-state steps/s and samples/s (the median of the logged steps after the first two, which include
warm-up; a median, since a shared machine's bursts of load hit single steps), and what each
rank holds after training, read from the engine: parameter elements and parameter + optimizer-state bytes.
The baseline, measured in the same run, is plain data parallel (``cpu_dp.json``, ZeRO stage 0); the table
gives each config's ratio to it. Writes ``<out>/bench_train.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mpma_ds.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {"zero3": "cpu_zero3", "zero2": "cpu_zero2", "dp": "cpu_dp"}
MODEL_SETTINGS = {  # image size, micro-batch per rank
    "mpma_tiny": (128, 8),
    "mpma_small": (224, 2),
}


def make_tokenizer(work: Path) -> Path:
    """A small WordPiece tokenizer (≤ 1024 tokens) trained on synthetic reports: fits every model's vocab."""
    from data_tools.build_shards import build_shards
    from data_tools.synth.corpus import generate_corpus
    from data_tools.train_tokenizer import train_tokenizer

    generate_corpus(work / "corpus", 24, 1, min_size=96, max_size=128)
    build_shards("mimic-cxr", work / "corpus", work / "shards", shard_size=64, image_size=64, progress=False)
    train_tokenizer(work / "shards", work / "tokenizer", 1024, min_frequency=1)
    return work / "tokenizer"


def run_one(model: str, ds_config: str, steps: int, tokenizer: Path, work: Path, name: str) -> dict:
    image_size, micro = MODEL_SETTINGS[model]
    out = work / f"{model}-{name}"
    overrides = {
        "model.name": model,
        "data.backend": "synthetic",
        "data.tokenizer": tokenizer,
        "data.image_size": image_size,
        "data.max_text_len": 64,
        "data.num_workers": 0,
        "data.synthetic_samples": 4096,
        "train.global_batch_size": micro * 2,
        "train.micro_batch_size": micro,
        "train.max_steps": steps,
        "train.warmup_steps": 2,
        "train.save_every": 0,
        "train.eval_every": 0,
        "train.log_every": 1,
        "train.output_dir": out,
        "tracking.enabled": False,
        "deepspeed_config": ds_config,
    }
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [str(ROOT / "launch" / "pretrain.py"), "--config", str(ROOT / "launch/configs/pretrain_tiny.yaml")]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} / {ds_config} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = sorted(r["samples_per_s"] for r in rows if "samples_per_s" in r and r["step"] > 2)
    samples_per_s = rates[len(rates) // 2]  # the median step: robust to a busy neighbour's bursts
    mem = summary["memory_per_rank"][0]
    return {
        "model": model,
        "config": ds_config,
        "zero_stage": summary["zero_stage"],
        "steps": steps,
        "samples_per_s": samples_per_s,
        "steps_per_s": samples_per_s / (micro * 2),
        "param_numel_total": mem["param_numel_total"],
        "param_numel_rank0": mem["param_numel_local"],
        "param_mb_rank0": mem["param_bytes_local"] / 2**20,
        "optimizer_mb_rank0": mem["optimizer_bytes_local"] / 2**20,
        "final_loss": summary["final_losses"].get("loss"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_SETTINGS), choices=list(MODEL_SETTINGS))
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (first 2 not timed)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="also run this DeepSpeed config (a shipped name or a path) as row NAME, e.g. to compare ZeRO-3 "
        "settings; repeatable",
    )
    parser.add_argument(
        "--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="shipped rows to run (dp always)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every config this many times, interleaved (A B C A B C ...), and report each one's median "
        "run: on a shared machine the load drifts, interleaving spreads it over all configs alike",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    configs = {name: CONFIGS[name] for name in CONFIGS if name in args.only or name == "dp"}
    for item in args.config:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            parser.error(f"--config {item!r}: expected NAME=JSON (a shipped config name or a path)")
        configs[name] = str(Path(spec).resolve()) if Path(spec).is_file() else spec
    from tqdm import tqdm

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        tokenizer = make_tokenizer(work)
        jobs = [(m, name, k) for m in args.models for k in range(args.repeats) for name in configs]
        runs: dict[tuple[str, str], list[dict]] = {}
        for model, name, k in tqdm(jobs, desc="bench_train runs"):
            run = run_one(model, configs[name], args.steps, tokenizer, work, f"{name}-{k}")
            runs.setdefault((model, name), []).append(dict(run, name=name))
        for group in runs.values():
            group.sort(key=lambda r: r["samples_per_s"])
            results.append(dict(group[len(group) // 2], repeats_samples_per_s=[r["samples_per_s"] for r in group]))
    width = max(6, *(len(n) for n in configs))
    header = (
        f"{'model':<11} {'config':<{width}} {'steps/s':>8} {'samples/s':>10} {'x DP':>6} {'params/rank':>12} "
        f"{'param MB':>9} {'optim MB':>9} {'param+opt MB':>13} {'x DP':>6}"
    )
    print(header)
    print("-" * len(header))
    for model in args.models:
        rows = {r["name"]: r for r in results if r["model"] == model}
        base = rows["dp"]
        base_mem = base["param_mb_rank0"] + base["optimizer_mb_rank0"]
        for name in configs:
            r = rows[name]
            mem = r["param_mb_rank0"] + r["optimizer_mb_rank0"]
            r["speed_vs_dp"] = r["samples_per_s"] / base["samples_per_s"]
            r["memory_vs_dp"] = mem / base_mem
            print(
                f"{model:<11} {name:<{width}} {r['steps_per_s']:>8.2f} {r['samples_per_s']:>10.1f} "
                f"{r['speed_vs_dp']:>6.2f} {int(r['param_numel_rank0']):>12,} {r['param_mb_rank0']:>9.1f} "
                f"{r['optimizer_mb_rank0']:>9.1f} {mem:>13.1f} {r['memory_vs_dp']:>6.2f}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_train.json"
    path.write_text(
        json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(), "runs": results}, indent=1)
    )
    print(f"baseline: plain data parallel (DeepSpeed stage 0) on the same 2 CPU ranks; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
