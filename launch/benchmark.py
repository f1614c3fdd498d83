"""Run a benchmark suite (NIH, CheXpert 5x200, RSNA ... as downloaded) on a model and its random twin.

Installed as ``mpma-benchmark``; the command lives in ``mpma_ds.cli.benchmark``.
"""

import sys

from mpma_ds.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
