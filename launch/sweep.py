"""Sweep recipe overrides (an ablation): ``python launch/sweep.py --config ablation_tiny [--set key=value ...]``.

Installed as ``mpma-sweep``; the command lives in ``mpma_ds.cli.sweep``, the runner in ``mpma_ds.sweep``.
"""

import sys

from mpma_ds.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
