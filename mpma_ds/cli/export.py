"""Export a DeepSpeed training checkpoint to a folder loadable without DeepSpeed.

    python launch/export.py --checkpoint runs/tiny --out exported/tiny

OUT loads with ``mpma_ds.MPMA.from_pretrained(OUT)``, ``transformers.AutoModel.from_pretrained(OUT/text_encoder)``
(tokenizer beside it) and ``timm.create_model("local-dir:OUT/image_encoder", pretrained=True)`` (without
``pretrained=True`` timm builds the architecture with random weights; the printed text encoder line passes
``add_pooling_layer=False``: MPMA has no pooler, so transformers would add a random one). ``--overwrite`` replaces a previous export
only; an ``--out`` that is, contains or lies inside a run or checkpoint folder is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an --out folder that holds a previous export (only that)"
    )
    args = parser.parse_args(argv)

    try:
        out = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
    except (ExportError, FileNotFoundError, ValueError) as err:
        print(f"{prog_name('export.py')}: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}; load it in Python with:")
    for line in load_lines(out):
        print(f"  {line}")
    return 0


def load_lines(out: Path) -> list[str]:
    """Python lines that load the exported folder ``out`` with its trained weights, ready to paste as printed
    (``tests/test_export.py`` runs them exactly so and compares the weights with the checkpoint's)."""
    text, image = str(out / "text_encoder"), f"local-dir:{out / 'image_encoder'}"
    return [
        "import mpma_ds, timm, transformers",
        f"model = mpma_ds.MPMA.from_pretrained({str(out)!r})",
        f"text_encoder = transformers.AutoModel.from_pretrained({text!r}, add_pooling_layer=False)",
        f"tokenizer = transformers.AutoTokenizer.from_pretrained({text!r})",
        f"image_encoder = timm.create_model({image!r}, pretrained=True)",
    ]
