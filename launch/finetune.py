"""Fine-tune MPMA on a downstream task: ``deepspeed [--num_gpus N] launch/finetune.py --config YAML [--set ...]``.

Also runs as one plain process (``python launch/finetune.py ...``) and installed as ``mpma-finetune``; the
command lives in ``mpma_ds.cli.finetune``, the loop in ``mpma_ds.runner.trainer.Trainer``, each task in
``mpma_ds.tasks``.
"""

import sys

from mpma_ds.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
