"""Generate a small synthetic corpus in the exact MIMIC-CXR-JPG layout, deterministic per seed.

    python -m data_tools.synth_corpus --out DIR --studies N --seed S [--with-faults] [--workers K]
        [--normal-rate P] [--negation-rates P | NAME=P,NAME=P,...]

The CLI over `data_tools.synth.corpus.generate_corpus`, which documents the files written.
"""

from __future__ import annotations

import argparse
import json
import sys

from data_tools.synth.corpus import format_summary, generate_corpus
from data_tools.synth.reports import DEFAULT_NEGATION_RATES, DEFAULT_NORMAL_RATE


def parse_negation_rates(text: str | None) -> dict[str, float] | None:
    """``--negation-rates``: one number for every finding, or ``Name=P`` pairs separated by commas (CheXpert
    names; the others keep their defaults). None/empty: the defaults."""
    if not text:
        return None
    text = text.strip()
    try:
        return {name: float(text) for name in DEFAULT_NEGATION_RATES}
    except ValueError:
        pass
    rates = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            rates[name.strip()] = float(value)
        except ValueError:
            raise ValueError(
                f"--negation-rates {text!r}: give one number or Name=P pairs separated by commas, "
                "e.g. 'Pneumothorax=0.9,Fracture=0.2'"
            ) from None
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.synth_corpus",
        description="Generate a synthetic chest X-ray corpus in the MIMIC-CXR-JPG layout (deterministic per seed).",
    )
    parser.add_argument("--out", required=True, help="corpus root folder to create")
    parser.add_argument("--studies", type=int, required=True, help="number of studies (1-3 films each)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--with-faults", action="store_true", help="add one broken input of each kind")
    parser.add_argument("--min-size", type=int, default=320, help="smallest longer side of a film in px")
    parser.add_argument("--max-size", type=int, default=640, help="largest longer side of a film in px")
    parser.add_argument("--lateral-fraction", type=float, default=0.6, help="share of PA studies with a lateral")
    parser.add_argument("--eval-fraction", type=float, default=0.1,
                        help="share of the patients in each of validate and test (default 0.1)")  # fmt: skip
    parser.add_argument("--normal-rate", type=float, default=DEFAULT_NORMAL_RATE,
                        help=f"share of studies with no pathology (default {DEFAULT_NORMAL_RATE})")  # fmt: skip
    parser.add_argument("--negation-rates", metavar="P|NAME=P,...",
                        help="how often a report rules out a finding the study does not have: one number for all, "
                        "or Name=P pairs (default: per finding, see docs/data_tools_corpus.md)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (output is the same)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:  # the rule build_shards has: refused, not clamped
        print(f"synth_corpus: error: --workers {args.workers} is below 1; give --workers >= 1", file=sys.stderr)
        return 2
    try:
        summary = generate_corpus(
            args.out, args.studies, args.seed, with_faults=args.with_faults, min_size=args.min_size,
            max_size=args.max_size, lateral_fraction=args.lateral_fraction, eval_fraction=args.eval_fraction,
            normal_rate=args.normal_rate, negation_rates=parse_negation_rates(args.negation_rates),
            workers=args.workers,
            progress=True,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"synth_corpus: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
