"""Regenerate docs/predict_viewer.png, README's picture of the mpma-predict viewer.

    python docs/make_predict_picture.py --model demo_runs/exported demo_runs/corpus/files/p10 --phrase "pleural effusion"

Runs ``mpma-predict`` (in this process) into a temporary folder, opens its ``index.html#film=<first film>`` in
headless Chromium (``make browser`` installs it) so the picture shows the grid behind a film's panel, and stores
the screenshot palette-quantised.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--phrase", action="append", default=[])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "predict_viewer.png"))
    p.add_argument("--size", default="1300,820", help="window W,H in CSS px (default 1300,820)")
    args = p.parse_args(argv)
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        print("make_predict_picture: error: no chromium on PATH; install it with `make browser`", file=sys.stderr)
        return 2
    from PIL import Image

    from mpma_ds.cli.predict import main as predict

    with tempfile.TemporaryDirectory(prefix="predict-picture-") as work:
        out = Path(work) / "pred"
        phrases = [a for ph in args.phrase for a in ("--phrase", ph)]
        rc = predict(["--model", args.model, *args.inputs, "--out", str(out), *phrases, "--workers", "0"])
        if rc != 0:
            return rc
        first = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])["key"]
        shot = Path(work) / "shot.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={Path(work) / 'profile'}", f"--window-size={args.size}",
                        "--virtual-time-budget=10000", f"--screenshot={shot}",
                        (out / "index.html").as_uri() + f"#film={first}"], check=True, capture_output=True,
                       timeout=120)  # fmt: skip
        Image.open(shot).convert("RGB").quantize(colors=128).save(args.out, optimize=True)
    print(f"picture: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
