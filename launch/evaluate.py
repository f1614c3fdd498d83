"""Evaluate an exported MPMA model (or a randomly initialised twin) on a shard split: image<->report retrieval,
zero-shot AUROC and, with --grounding N, the pointing game of finding-phrase maps plus N overlay PNGs.

Installed as ``mpma-evaluate``; the command lives in ``mpma_ds.cli.evaluate``.
"""

import sys

from mpma_ds.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
