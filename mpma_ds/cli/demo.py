"""``make demo`` (``python launch/demo.py``, ``mpma-demo``): the command line of the demo — its arguments, the
tables it prints at the end and its exit code. The stages themselves are ``mpma_ds.runner.demo``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from mpma_ds.cli.common import prog_name
from mpma_ds.eval import format_label_efficiency
from mpma_ds.eval.grounding import format_pointing_game
from mpma_ds.eval.zeroshot import DEFAULT_MIN_COUNT
from mpma_ds.runner import demo as stages
from mpma_ds.runner.demo import (
    DEFAULT_EVAL_FRACTION,
    DEFAULT_STUDIES,
    EXPERIMENT,
    FRACTIONS,
    LP_MIN_LABEL_COUNT,
    MEASURE_BOUND,
    MIN_VALIDATION_IMAGES,
    Demo,
    DemoError,
    results_payload,
    write_report,
    write_results,
)
from mpma_ds.runner.evaluate import TABLE_ROWS, format_table
from mpma_ds.runner.supervised_bound import CACHE_ENV, default_cache_dir
from mpma_ds.runner.targets import cell, format_targets


def _default_ranks() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog_name("demo.py"), description=stages.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="demo_runs", help="working folder (default: demo_runs)")
    p.add_argument(
        "--studies", type=int, default=DEFAULT_STUDIES, help=f"synthetic studies (default: {DEFAULT_STUDIES})"
    )
    # 900 (3x the 300 of before): with cpu_zero3.json's persistence a step of the demo's pretraining takes ~0.66 s
    # on a quiet 2-core machine (was ~2.4 s), so 900 steps take 598 s and the whole demo 741 s (docs/tracking_export_demo.md)
    p.add_argument("--steps", type=int, default=900, help="pretraining steps (default: 900)")
    p.add_argument("--image-size", type=int, default=128, help="stored image size in px (default: 128)")
    p.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="ranks for deepspeed --num_gpus (default: the GPUs, else 2 CPU processes)",
    )
    p.add_argument(
        "--vqa-questions", type=int, default=4, help="questions per film of the synthetic VQA set (default: 4)"
    )
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=DEFAULT_EVAL_FRACTION,
        help="share of the patients in each of validate and test (default: "
        f"{DEFAULT_EVAL_FRACTION}: >= {MIN_VALIDATION_IMAGES} validation images at the default --studies)",
    )
    p.add_argument(
        "--label-fractions",
        default=FRACTIONS,
        help=f"linear-probe label fractions, comma-separated (default: {FRACTIONS})",
    )
    p.add_argument(
        "--min-label-count",
        type=int,
        default=LP_MIN_LABEL_COUNT,
        help="a label counts in the linear probe's test AUROC with this many positives and negatives "
        f"(default: {LP_MIN_LABEL_COUNT})",
    )
    p.add_argument(
        "--zero-shot-min-count",
        type=int,
        default=DEFAULT_MIN_COUNT,
        help="the pretraining evaluation's zero-shot AUROC counts a label with this many positives and "
        f"negatives (default: {DEFAULT_MIN_COUNT})",
    )
    p.add_argument(
        "--bound-cache",
        default=None,
        help="where the zero-shot AUROC's supervised bound is cached, by corpus, encoder and budget (default: "
        f"${CACHE_ENV}/supervised_bound, else {default_cache_dir()})",
    )
    p.add_argument(
        "--measure-bound",
        action="store_true",
        help="measure the supervised bound when it is not cached (about 100 s on 2 CPU cores, once "
        "per corpus, encoder and budget); without it the demo reads the cache only and the zero-shot target is "
        "'not measured' until it is there",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="delete --out first and redo every stage")
    args = p.parse_args(argv)
    for name in ("studies", "steps", "image_size", "vqa_questions", "min_label_count", "zero_shot_min_count"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.label_fractions = [str(float(f)) for f in args.label_fractions.split(",") if f.strip()]
    except ValueError:
        p.error(f"--label-fractions must be numbers separated by commas, got {args.label_fractions!r}")
    if not args.label_fractions or not all(0 < float(f) <= 1 for f in args.label_fractions):
        p.error("--label-fractions must be in (0, 1]")
    if args.num_gpus is None:
        args.num_gpus = _default_ranks()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    demo = Demo(args)
    try:
        results = demo.run()
    except DemoError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted; run it again to continue where it stopped", file=sys.stderr)
        return 130
    evals = results["pretrain_eval"]
    pre, rnd = evals["pretrained"], evals["random-init"]
    keys = [key for key, _ in TABLE_ROWS]
    print()
    print(
        f"pretraining evaluation: validation split, {int(pre.get('eval_samples', 0))} images "
        f"({int(pre.get('retrieval_abnormal_images', 0))} abnormal), {int(pre.get('retrieval_pairs', 0))} distinct "
        "reports (R@K: fraction of queries whose match ranks in the top K, identical reports merged; "
        "[95 % bootstrap interval])"
    )
    print(format_table(evals))
    clear = [k for k in keys if beats(pre, rnd, k)]
    print(f"pretrained beats the random twin outside both 95 % intervals on {len(clear)} of {len(keys)} metrics")
    if "pointing_game" in pre:
        print(format_pointing_game(pre, rnd, demo.out / "eval" / "grounding"))
    bound = results["supervised_bound"]
    if bound.get("auroc") is None:
        print(f"supervised bound of the zero-shot AUROC: not measured (`{MEASURE_BOUND}` measures it once)")
    else:
        print(
            f"supervised bound of the zero-shot AUROC (the same image encoder, {bound['steps']} steps on the truth "
            f"labels, scored on the same images): {cell(bound['auroc'], bound['ci95'])}"
            + (f" (cached {bound['measured_at']})" if bound.get("cached") else "")
        )
    print(
        "\nlabel efficiency: test split, [95 % bootstrap interval; the difference's is paired: the same test "
        "samples resampled for both models]; linear probe = macro AUROC over the CheXpert labels (>= "
        f"{args.min_label_count} positives and negatives) of the frozen image encoder's features; VQA = frozen "
        "backbone, head on the fused image + question features"
    )
    print(
        format_label_efficiency(
            {
                "linear_probe": results["linear_probe"],
                "vqa": {k: results["vqa"][k] for k in ("overall", "closed", "open")},
            }
        )
    )
    payload = results_payload(results)
    print()
    print(format_targets(payload["targets"]))
    path = write_results(demo, payload)
    print(f"\nresults:       {path}")
    try:
        report = write_report(demo)
    except Exception as err:  # the results are written; say why the page is not, in one line
        print(f"demo: error: the comparison report was not written: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"report:        {report}   (runs grouped, pretrained vs random, curves, grounding; opens offline)")
    print(f"work folder:   {demo.out}  (logs in {demo.logs})")
    print(f"exported model: {demo.out / 'exported'}")
    print(f"MLflow:        mlflow ui --backend-store-uri {demo.tracking_uri}   (experiment {EXPERIMENT!r})")
    print(
        f"compare runs:  python launch/compare_runs.py --experiment {EXPERIMENT} "
        f"--tracking-uri {demo.tracking_uri} --out {demo.out / 'report'}"
    )
    print(f"total {time.monotonic() - start:.0f} s")
    return 0


def beats(pre: dict[str, Any], rnd: dict[str, Any], key: str) -> bool:
    """The pretrained value's interval lies above the random twin's (a difference the protocol can see)."""
    a, b = pre.get(f"{key}_ci95"), rnd.get(f"{key}_ci95")
    return bool(a and b and a[0] == a[0] and b[1] == b[1] and a[0] > b[1])
