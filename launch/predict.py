"""Zero-shot findings, grounding overlays and a viewer of an MPMA model on your own JPG / PNG / DICOM films.

Installed as ``mpma-predict``; the command lives in ``mpma_ds.cli.predict``.
"""

import sys

from mpma_ds.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
