"""mpma-predict on the same machine as the evaluation loader: images/s, and calibration error before / after.

Builds (or takes with --model/--shards) a model and labelled shards, then measures in this one run:

- **calibration**: `predict.calibration.fit_calibration` on the validation split (Platt per label), the expected
  calibration error of the uncalibrated probability sigmoid(logit_scale * score) and of the calibrated one, on
  the validation split (fitted there) and on the held-out test split;
- **throughput**: films/s of mpma-predict's pipeline (`predict.run.predict_files`: decode the original JPG by
  build_shards' rules, eval transform, score, write records; once scores only, once with grounding overlays of
  one phrase and up to 3 findings per film) on the corpus's original films, against the evaluation loader
  (`eval.split_eval.one_pass`, the wds backend, + encode_image + prompt scores: `calibration.collect_scores`) on
  the shards of the same corpus; the same batch size and worker count for both.

Without --model it makes its own: a synthetic corpus (--studies), shards at --image-size, a tokenizer, and
mpma_tiny pretrained --steps steps in this process (the demo recipe, one rank), exported. JSON goes to
``benchmarks/results/bench_predict.json``.

    python benchmarks/bench_predict.py [--studies 900] [--steps 200] [--films 120] [--keep DIR]
    python benchmarks/bench_predict.py --model demo_runs/exported --shards demo_runs/shards
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from data_tools.build_shards import build_shards
from data_tools.synth.corpus import generate_corpus
from data_tools.train_tokenizer import train_tokenizer
from mpma_ds.predict import Predictor
from mpma_ds.predict.calibration import collect_scores, fit_calibration, format_calibration
from mpma_ds.predict.run import PredictOptions, predict_files
from mpma_ds.runner.export import export_checkpoint
from mpma_ds.runner.trainer import train
from mpma_ds.training import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def make_model(
    work: Path, studies: int, steps: int, image_size: int, eval_fraction: float
) -> tuple[Path, Path, Path]:
    """``(exported model, shards, corpus)``: a synthetic corpus, its shards and tokenizer, mpma_tiny pretrained."""
    corpus, shards, tok = work / "corpus", work / "shards", work / "tokenizer"
    generate_corpus(corpus, studies, 0, min_size=2 * image_size, max_size=2 * image_size + 64,
                    eval_fraction=eval_fraction)  # fmt: skip
    build_shards("mimic-cxr", corpus, shards, image_size=image_size, workers=1, progress=False,
                 val_fraction=0.2, test_fraction=0.2)  # fmt: skip
    train_tokenizer(shards, tok, 4096)
    overrides = [f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'validate'}",
                 f"data.tokenizer={tok}", f"data.image_size={image_size}", f"train.output_dir={work / 'run'}",
                 f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 10)}", "train.global_batch_size=32",
                 "train.micro_batch_size=32", f"train.save_every={steps}", "train.eval_every=0",
                 "tracking.enabled=false"]  # fmt: skip
    train(load_recipe(ROOT / "launch" / "configs" / "pretrain_tiny.yaml", overrides))
    return export_checkpoint(work / "run", work / "exported", overwrite=True), shards, corpus


def loader_rate(predictor: Predictor, shards: Path, split: str, batch_size: int) -> tuple[float, int]:
    start = time.perf_counter()
    _, _, _, n = collect_scores(predictor, shards, split, batch_size=batch_size)
    return n / (time.perf_counter() - start), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an exported model (default: pretrain one here)")
    p.add_argument("--shards", help="its labelled shards (with validate/ and test/)")
    p.add_argument("--films", type=int, default=120, help="original films mpma-predict reads (default 120)")
    p.add_argument("--studies", type=int, default=900)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-fraction", type=float, default=0.3,
                   help="patients in each of validate and test (the corpus's split file; default 0.3)")  # fmt: skip
    p.add_argument("--keep", help="keep the corpus, shards and model made here in this folder")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeat", type=int, default=3, help="throughput rounds, the median reported (default 3)")
    args = p.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_predict_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if args.model:
            model, shards = Path(args.model), Path(args.shards)
            corpus = Path(json.loads((shards / "manifest.json").read_text())["source"]["input"])
        else:
            model, shards, corpus = make_model(work, args.studies, args.steps, args.image_size, args.eval_fraction)
        prep_s = time.perf_counter() - t0
        predictor = Predictor(model, device=args.device, calibration=None)
        predictor.data_cfg.num_workers = args.workers  # the eval loader's workers = mpma-predict's
        cal = fit_calibration(
            predictor, shards, split="validate", heldout_split="test", batch_size=args.batch_size
        )
        print(format_calibration(cal))

        films = sorted(corpus.rglob("*.jpg"))[: args.films]
        variants = {
            "mpma-predict, scores only": dict(ground_findings=False, max_findings=0),
            "mpma-predict, + overlays (1 phrase, <= 3 findings)": dict(
                phrases=["pleural effusion"], max_findings=3
            ),
        }
        loader_name = "evaluation loader (wds) + encode_image + prompt scores"
        runs: dict[str, list[float]] = {name: [] for name in [*variants, loader_name]}
        counts: dict[str, int] = {}
        for round_ in range(args.repeat):  # round-robin, so that a busy spell of the machine hits every row
            for name, kw in variants.items():
                opts = PredictOptions(batch_size=args.batch_size, workers=args.workers, **kw)
                out = work / f"pred-{round_}-{len(runs[name])}-{name[-8:].strip()}"
                res = predict_files(predictor, films, out, opts, progress=False, report=lambda _: None)
                runs[name].append(res.scored / res.seconds)
                counts[name] = res.scored
                shutil.rmtree(out, ignore_errors=True)
            rate, counts[loader_name] = loader_rate(predictor, shards, "validate", args.batch_size)
            runs[loader_name].append(rate)
        rates = {name: {"films_per_s": statistics.median(v), "runs": v, "films": counts[name]}
                 for name, v in runs.items()}  # fmt: skip
        device = str(predictor.device)
        print(f"\nthroughput on {platform.node()} ({device}, {torch.get_num_threads()} threads, batch "
              f"{args.batch_size}, {args.workers} workers):")  # fmt: skip
        for name, r in rates.items():
            each = ", ".join(f"{v:.1f}" for v in r["runs"])
            print(f"  {name:<58} {r['films_per_s']:8.1f} films/s  ({r['films']} films; runs: {each})")
        result = {"calibration": {"ece": cal.ece, "fitted_on": cal.fitted_on, "left_out": cal.left_out,
                                  "method": cal.method}, "throughput": rates, "device": device,
                  "batch_size": args.batch_size, "workers": args.workers, "repeat": args.repeat, "model": str(model),
                  "shards": str(shards), "steps": None if args.model else args.steps,
                  "studies": None if args.model else args.studies, "prepare_s": prep_s}  # fmt: skip
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "bench_predict.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"results: {RESULTS / 'bench_predict.json'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
