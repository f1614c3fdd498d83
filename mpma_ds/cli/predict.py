"""Zero-shot findings and phrase-grounding overlays of an MPMA model on your own JPG / PNG / DICOM films, with a
self-contained viewer (OUT/index.html).

    mpma-predict --model exported/tiny films/ --out predictions/
    mpma-predict --model exported/tiny 'scans/**/*.dcm' --phrase "left pleural effusion" --out predictions/
    mpma-predict --model exported/tiny films/ --calibrate data/shards --out predictions/

Inputs are files, folders (every file in them, recursively) or globs. DICOM is read by build_shards' rules
(MONOCHROME1, rescale, VOI LUT / window; only chest projection radiographs: CT, MR ... are refused with the
reason); a file that is not a readable chest film is reported once and skipped. Scores are the evaluation's
zero-shot prompt-ensemble scores; --calibrate fits a per-label calibration on labelled shards (saved beside the
model as calibration.json and reused by later runs). A rerun into the same OUT keeps the results already written.
Exit 0 when at least one film was scored (skipped files are counted), 1 when none could be, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_tools.sources.dicom import CHEST_BODY_PARTS, PROJECTION_MODALITIES
from mpma_ds.cli.common import prog_name


def _all_or_tuple(text: str) -> tuple[str, ...] | None:
    """``all`` / ``any`` / empty -> None (no check), else the comma-separated values, upper case."""
    values = tuple(sorted({v.strip().upper() for v in text.split(",") if v.strip()}))
    return None if text.strip().lower() in ("all", "any", "") else values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog_name("predict.py"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", required=True, help="exported model folder (mpma-export) or a pretraining run folder"
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs (JPG, PNG, DICOM)")
    p.add_argument("--out", required=True, help="output folder (predictions, overlays, index.html)")
    p.add_argument("--phrase", action="append", default=[], help="a phrase to ground on every film (repeatable)")
    p.add_argument("--threshold", type=float, default=None,
                   help="findings cut: calibrated probability (default 0.5), else zero-shot score (default 0.0)")  # fmt: skip
    p.add_argument("--max-findings", type=int, default=3, metavar="K",
                   help="ground at most K findings above the threshold per film (default 3; 0: only --phrase)")  # fmt: skip
    p.add_argument("--labels", help="JSON file: a list of label names, or {label: {positive: [...], negative: [...]}} "
                   "(default: the 14 CheXpert labels and the evaluation's prompts)")  # fmt: skip
    p.add_argument("--calibrate", metavar="SHARDS", help="fit a per-label calibration on these labelled shards")
    p.add_argument("--calibration-split", default="validate", help="split --calibrate fits on (default validate)")
    p.add_argument("--calibration-method", choices=("platt", "temperature"), default="platt")
    p.add_argument("--calibration-min-count", type=int, default=10, metavar="N",
                   help="a label is calibrated with >= N positives and N negatives (default 10)")  # fmt: skip
    p.add_argument("--calibration", metavar="FILE", help="use this calibration.json (default: the model folder's)")
    p.add_argument("--no-calibration", action="store_true", help="scores only, even when a calibration exists")
    p.add_argument("--modalities", default=",".join(PROJECTION_MODALITIES),
                   help="DICOM: accepted Modality values, projection radiographs by default ('all' accepts any)")  # fmt: skip
    p.add_argument("--body-parts", default=",".join(CHEST_BODY_PARTS),
                   help="DICOM: a BodyPartExamined tag, where present, must contain one of these ('all': no check)")  # fmt: skip
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default 2; 0: in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def read_label_file(path: str) -> tuple[list[str], dict]:
    """``(label names, prompt overrides)`` of a ``--labels`` file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--labels {file} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"--labels {file} is not JSON: {err}") from None
    if isinstance(data, list) and data and all(isinstance(x, str) for x in data):
        return data, {}
    if isinstance(data, dict) and data:
        prompts = {}
        for name, entry in data.items():
            ok = isinstance(entry, dict) and entry.get("positive") and entry.get("negative")
            if not ok:
                raise ValueError(
                    f"--labels {file}: {name!r} needs 'positive' and 'negative' phrasings (lists of strings)"
                )
            prompts[name] = (entry["positive"], entry["negative"])
        return list(data), prompts
    raise ValueError(f"--labels {file}: expected a list of label names or {{label: {{positive, negative}}}}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prog = prog_name("predict.py")
    try:
        return run(args, prog)
    except (FileNotFoundError, ValueError) as err:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, prog: str) -> int:
    from mpma_ds.predict.calibration import CALIBRATION_FILE, fit_calibration, format_calibration
    from mpma_ds.predict.inputs import DecodeRules, expand_inputs
    from mpma_ds.predict.predictor import Predictor
    from mpma_ds.predict.run import PredictOptions, predict_files
    from mpma_ds.runner.model_card import card_summary

    def warn(message: str) -> None:
        print(f"{prog}: {message}", file=sys.stderr)

    if args.batch_size < 1 or args.workers < 0 or args.max_findings < 0:
        raise ValueError("--batch-size must be >= 1, --workers and --max-findings >= 0")
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"--model {model_dir} does not exist; give an exported folder or a pretraining run"
        )
    labels, prompts = read_label_file(args.labels) if args.labels else (None, {})
    rules = DecodeRules(modalities=_all_or_tuple(args.modalities), body_parts=_all_or_tuple(args.body_parts))
    out = Path(args.out)
    files, problems = expand_inputs(args.inputs)
    files = [f for f in files if out.resolve() not in f.resolve().parents]  # never our own outputs
    for item, why in problems:
        warn(f"input {item}: {why}")
    if not files:
        raise FileNotFoundError(
            f"no input file to predict on ({len(args.inputs)} input(s) given, none matched a file)"
        )
    summary = card_summary(model_dir) or f"no model card (README.md) in {model_dir}"
    print(f"model: {summary}")

    calibration = None if args.no_calibration else (args.calibration or "auto")
    predictor = Predictor(model_dir, tokenizer=args.tokenizer, device=args.device, labels=labels, prompts=prompts,
                          calibration=calibration if not args.calibrate else None)  # fmt: skip
    predictor.phrase_queries(list(dict.fromkeys(args.phrase)))  # a phrase it cannot read: refused before any film
    if args.calibrate:
        cal = fit_calibration(predictor, args.calibrate, split=args.calibration_split,
                              method=args.calibration_method, min_count=args.calibration_min_count,
                              batch_size=args.batch_size)  # fmt: skip
        target = model_dir / CALIBRATION_FILE
        try:
            cal.save(target)
        except OSError:
            target = cal.save(out.mkdir(parents=True, exist_ok=True) or out / CALIBRATION_FILE)
            warn(f"{model_dir} is not writable: the calibration went to {target} (pass --calibration {target})")
        predictor.calibration = cal
        print(format_calibration(cal))
        print(f"calibration saved: {target}")
    elif predictor.calibration is not None:
        print(f"calibration: {predictor.calibration.method} from {predictor.calibration.fitted_on.get('shards')} "
              f"(model folder's {CALIBRATION_FILE})")  # fmt: skip
    print(f"device: {predictor.device}; {len(files)} file(s); labels: {len(predictor.labels)}; zero-shot "
          f"{'probabilities (calibrated)' if predictor.calibration else 'scores (uncalibrated)'}")  # fmt: skip

    opts = PredictOptions(phrases=list(dict.fromkeys(args.phrase)), ground_findings=args.max_findings > 0,
                          threshold=args.threshold, max_findings=args.max_findings, batch_size=args.batch_size,
                          workers=args.workers, rules=rules)  # fmt: skip
    result = predict_files(
        predictor, files, out, opts, summary=summary, progress=not args.no_progress, report=warn
    )
    rate = result.scored / result.seconds if result.seconds > 0 and result.scored else 0.0
    kept = f", {result.kept} kept from an earlier run" if result.kept else ""
    print(f"scored {result.scored} film(s){kept} in {result.seconds:.1f} s ({rate:.1f} films/s); "
          f"skipped {len(result.skipped)} file(s){' (see ' + str(out / 'skipped.jsonl') + ')' if result.skipped else ''}")  # fmt: skip
    print(f"results: {out / 'predictions.csv'}, {out / 'predictions.jsonl'}; viewer: {out / 'index.html'}")
    if result.scored + result.kept == 0:
        warn(f"error: none of the {len(files)} file(s) could be scored")
        return 1
    return 0
