"""Evaluate an exported MPMA model (or a randomly initialised twin) on a shard split: image<->report retrieval

Installed as ``mpma-evaluate``; the command lives in ``mpma_ds.cli.evaluate``.
"""

import sys

from mpma_ds.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
