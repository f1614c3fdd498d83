"""Export a DeepSpeed training checkpoint to a folder loadable without DeepSpeed.

    python launch/export.py --checkpoint runs/tiny --out exported/tiny

OUT loads with ``mpma_ds.MPMA.from_pretrained(OUT)``, ``transformers.AutoModel.from_pretrained(OUT/text_encoder)``
(tokenizer beside it) and ``timm.create_model("local-dir:OUT/image_encoder")``.
"""

from __future__ import annotations

import argparse
import sys

from mpma_ds.cli.common import prog_name
from mpma_ds.runner.export import ExportError, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog_name("export.py"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="run folder, its checkpoints/ folder, or one checkpoints/step_* folder"
    )
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: the recipe's data.tokenizer)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)

    try:
        out = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
    except (ExportError, FileNotFoundError, ValueError) as err:
        print(f"{prog_name('export.py')}: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    print(f"  mpma_ds.MPMA.from_pretrained('{out}')")
    print(f"  transformers.AutoModel.from_pretrained('{out / 'text_encoder'}')")
    print(f"  timm.create_model('local-dir:{out / 'image_encoder'}')")
    return 0
