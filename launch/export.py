"""Export a DeepSpeed training checkpoint to a folder loadable without DeepSpeed.

Installed as ``mpma-export``; the command lives in ``mpma_ds.cli.export``.
"""

import sys

from mpma_ds.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
