"""Generate a synthetic VQA set in the VQA-RAD layout from a synthetic corpus, deterministic per seed.

    python -m data_tools.synth_vqa --corpus CORPUS_DIR --out DIR [--seed S] [--image-size PX] [--questions-per-image N]

The CLI over `data_tools.synth.vqa.generate_vqa`, which documents the questions and their answers;
`python -m data_tools.build_shards --format vqa-rad --input DIR ...` turns the result into VQA shards.
"""

from __future__ import annotations

import argparse
import json
import sys

from data_tools.synth.vqa import format_summary, generate_vqa


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.synth_vqa",
        description="Write a synthetic VQA set (VQA-RAD layout: trainset/valset/testset.json + images/) whose "
        "answers are what each film of a data_tools.synth_corpus corpus draws.",
    )
    parser.add_argument("--corpus", required=True, help="a folder made by python -m data_tools.synth_corpus")
    parser.add_argument("--out", required=True, help="folder to write the VQA set to")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the questions (default 0)")
    parser.add_argument(
        "--image-size", type=int, default=0, help="shrink films to this shorter side in px (default 0: copy them)"
    )
    parser.add_argument("--questions-per-image", type=int, default=4, help="most questions per film (default 4)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = generate_vqa(
            args.corpus, args.out, seed=args.seed, image_size=args.image_size,
            questions_per_image=args.questions_per_image, progress=True,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"synth_vqa: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
