"""``make demo``: the whole product on a laptop-sized synthetic corpus, end to end.

Installed as ``mpma-demo``; the command lives in ``mpma_ds.cli.demo``, the stages in ``mpma_ds.runner.demo``.
"""

import sys

from mpma_ds.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
