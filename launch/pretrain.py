"""Pretrain MPMA: ``deepspeed [--num_gpus N] launch/pretrain.py --config YAML [--set key.sub=value ...]``.

Also runs as one plain process (``python launch/pretrain.py ...``) and installed as ``mpma-pretrain``; the
command lives in ``mpma_ds.cli.pretrain``, the loop in ``mpma_ds.runner.trainer.Trainer``.
"""

import sys

from mpma_ds.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
