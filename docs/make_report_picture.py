"""Regenerate docs/compare_report.png, README's picture of the run comparison report.

    make report-picture        (after `make demo`: the demo's experiment in demo_runs/mlflow.db)
    python docs/make_report_picture.py --tracking-uri sqlite:///$PWD/demo_runs/mlflow.db --experiment mpma-demo

Writes the report (``mpma_ds.tracking.report.write_report``) to a temporary folder, opens it in headless
Chromium (Debian's ``chromium``; ``make browser`` installs it), screenshots the top of the page and stores it
scaled down and palette-quantised under ``--max-kb``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default="sqlite:///" + str(Path("demo_runs/mlflow.db").resolve()))
    p.add_argument("--experiment", default="mpma-demo")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "compare_report.png"))
    p.add_argument("--height", type=int, default=2600, help="page height captured, CSS px (default 2600)")
    p.add_argument("--width", type=int, default=900, help="stored width in px (default 900)")
    p.add_argument("--max-kb", type=int, default=200)
    args = p.parse_args(argv)
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        print("make_report_picture: error: no chromium on PATH; install it with `make browser`", file=sys.stderr)
        return 2
    from PIL import Image

    from mpma_ds.tracking.report import write_report

    with tempfile.TemporaryDirectory(prefix="report-picture-") as work:
        try:
            report = write_report(args.experiment, Path(work) / "report", tracking_uri=args.tracking_uri)
        except ValueError as err:
            print(f"make_report_picture: error: {err}", file=sys.stderr)
            return 2
        shot = Path(work) / "shot.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        f"--user-data-dir={Path(work) / 'profile'}", "--hide-scrollbars", "--force-device-scale-factor=1",
                        f"--window-size=1400,{args.height}", f"--screenshot={shot}", report.html.as_uri()],
                       check=True, capture_output=True, timeout=180)  # fmt: skip
        with Image.open(shot) as im:
            im = im.convert("RGB")
            width = args.width
            while True:
                small = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
                small = small.quantize(colors=256, method=Image.Quantize.FASTOCTREE)
                out = Path(args.out)
                small.save(out, format="PNG", optimize=True)
                if out.stat().st_size <= args.max_kb * 1024 or width < 400:
                    break
                width = int(width * 0.85)
    print(f"{out}: {small.width} x {small.height} px, {out.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
