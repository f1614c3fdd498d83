"""Offline tools that turn raw chest X-ray corpora into verified WebDataset shards.

Nothing here imports the training code (`mpma_ds`): shards are built once, on any machine.
"""

__version__ = "0.1.0"
