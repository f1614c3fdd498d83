"""Compare the runs of an MLflow experiment: a table on stdout, one PNG per metric and an HTML report.

Installed as ``mpma-compare``; the command lives in ``mpma_ds.cli.compare``.
"""

import sys

from mpma_ds.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
