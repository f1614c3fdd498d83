"""Run a benchmark suite: a model (or several, paired per sample) against the field's standard evaluations, on the
datasets as their users download them, each unpacked in DATA_ROOT/<id>/ (nih-cxr14, chexpert, chexpert-5x200,
rsna-pneumonia, siim-pneumothorax, vindr-cxr, padchest ...). Datasets not there are skipped with one line each.
Prints a table (each metric with its 95 % bootstrap interval, the paired differences, the published reference
numbers beside ours), writes OUT/results.json and OUT/benchmark.html and logs MLflow runs (a parent per model,
a child per entry).

    mpma-benchmark --model exported/tiny --suite cxr-core --data-root /data/benchmarks --out bench/tiny
    mpma-benchmark --model exported/tiny --model random:mpma_tiny --tokenizer exported/tiny/text_encoder \\
        --suite cxr-core --data-root /data/benchmarks --out bench/tiny-vs-random

Every run also saves each model's per-sample scores (OUT/samples/<dataset>/<protocol>/<model>.npz, with the
split checksum), so two separate runs pair per sample later (B - A, paired bootstrap intervals; refused when an
entry's split checksums differ):

    mpma-benchmark --compare bench/run-a bench/run-b --out bench/a-vs-b [--name MODEL_A --name MODEL_B]

Several ranks (each streams a share of every dataset's images; rank 0 scores and writes):

    deepspeed --num_gpus 2 launch/benchmark.py --model exported/tiny --suite cxr-core --data-root ... --out ...
    torchrun --nproc_per_node 2 launch/benchmark.py ...
"""

from __future__ import annotations

import argparse

from mpma_ds.cli.common import ends_without_teardown, error, prog_name
from mpma_ds.distributed import init_distributed, world_info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from mpma_ds.benchmark.suite import suite_names

    p = argparse.ArgumentParser(
        prog=prog_name("benchmark.py"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", action="append", default=[], metavar="M",
                   help="an exported folder, a pretraining run folder or random:<arch> (repeat: models paired)")  # fmt: skip
    p.add_argument("--name", action="append", default=[], help="a column name per --model (default: folder name)")
    p.add_argument("--suite", help=f"a shipped suite ({', '.join(suite_names())}) or a YAML path")
    p.add_argument("--data-root", help="folder holding one folder per dataset id")
    p.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"),
                   help="pair two earlier runs' saved per-sample scores (B - A) instead of running a suite; "
                   "--name picks the model of each when a run holds several")  # fmt: skip
    p.add_argument("--dataset-path", action="append", default=[], metavar="ID=DIR",
                   help="read dataset ID from DIR instead of DATA_ROOT/ID (repeatable)")  # fmt: skip
    p.add_argument("--out", required=True,
                   help="output folder (results.json, benchmark.html, samples/, problems/, cache/; paired.json)")  # fmt: skip
    p.add_argument("--tokenizer", help="tokenizer folder (needed with random:<arch>)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random:<arch> twin")
    p.add_argument("--cache-dir", help="image-feature cache (default: OUT/cache)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image decoding workers")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--bootstrap", type=int, default=1000, metavar="R", help="bootstrap resamples (0 = no intervals)"
    )
    p.add_argument("--min-label-count", type=int, default=10, metavar="N",
                   help="AUROC only over labels with >= N positives and N negatives (default 10)")  # fmt: skip
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment", default="mpma-benchmark")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return p.parse_args(argv)


@ends_without_teardown
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from data_tools.benchmarks import BenchmarkError
    from data_tools.registry import RegistryError

    try:
        return run(args)
    except (FileNotFoundError, ValueError, BenchmarkError, RegistryError) as err:
        error(prog_name("benchmark.py"), err)  # rank 0 only: every rank fails alike
        return 2


def compare(args: argparse.Namespace) -> int:
    from mpma_ds.benchmark.samples import PAIRED_FILE, compare_runs, format_paired

    if args.model or args.suite:
        raise ValueError("--compare pairs two earlier runs: give it without --model / --suite")
    if len(args.name) not in (0, 2):
        raise ValueError(f"--compare takes two --name (the model of each run), got {len(args.name)}")
    report = compare_runs(*args.compare, args.out, names=args.name or (None, None), n_resamples=args.bootstrap)
    print(format_paired(report))
    print(f"paired: {args.out}/{PAIRED_FILE}")
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    if args.compare:
        return compare(args)
    missing = [flag for flag, value in (("--model", args.model), ("--suite", args.suite),
                                        ("--data-root", args.data_root)) if not value]  # fmt: skip
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --compare DIR_A DIR_B)")

    from mpma_ds.benchmark.model import load_model
    from mpma_ds.benchmark.report import format_console
    from mpma_ds.benchmark.runner import run_benchmark
    from mpma_ds.benchmark.suite import load_suite

    suite = load_suite(args.suite)  # before any model is built
    paths = {}
    for item in args.dataset_path:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--dataset-path {item!r}: expected ID=DIR")
        paths[key] = value
    if args.name and len(args.name) != len(args.model):
        raise ValueError(f"{len(args.name)} --name for {len(args.model)} --model")
    names = args.name or [None] * len(args.model)
    models = [load_model(m, tokenizer=args.tokenizer, seed=args.seed, name=n) for m, n in zip(args.model, names)]
    if len({m.name for m in models}) != len(models):
        raise ValueError("two models have the same name: give each a --name")
    rank, world, local_rank = world_info()
    device = (
        (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if world > 1:  # under a launcher: each rank streams a share of the images (the group is left on return)
        init_distributed()
    results = run_benchmark(
        models, suite, args.data_root, args.out, dataset_paths=paths, cache_dir=args.cache_dir,
        batch_size=args.batch_size, workers=args.workers, device=device, n_resamples=args.bootstrap,
        min_count=args.min_label_count, mlflow=not args.no_mlflow, tracking_uri=args.tracking_uri,
        experiment=args.experiment, rank=rank, world_size=world,
    )  # fmt: skip
    if results is None:  # another rank than 0: rank 0 reports
        return 0
    print(format_console(results))
    print(f"results: {args.out}/results.json  page: {results['page']}  wall {results['wall_seconds']:.1f} s")
    failed = [f"{dataset}/{protocol} [{name}]: {m['error']}" for dataset, blocks in results["entries"].items()
              for protocol, block in blocks.items() for name, m in block["models"].items() if "error" in m]  # fmt: skip
    if failed:  # the other entries' results are written; a refused one (bad input) still fails the command
        more = f" (and {len(failed) - 1} more, in results.json)" if len(failed) > 1 else ""
        error(prog_name("benchmark.py"), f"not scored: {failed[0]}{more}")
        return 1
    return 0
