"""The top of the library below the command line: what composes the layers into a run.

- ``trainer``: the ``Trainer`` that runs every task (``train(recipe)``);
- ``init``: the one resolver of ``init.from`` (exported folder, pretraining run folder, ``random``);
- ``export``: a checkpoint consolidated into a folder ``MPMA.from_pretrained`` loads;
- ``evaluate``: the evaluation of a model on a shard split (the library side of ``mpma-evaluate``);
- ``demo``: the stages of ``make demo``.

This package module imports nothing, so importing ``mpma_ds.runner.init`` does not pull in the trainer.
"""
