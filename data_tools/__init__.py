"""Offline tools that turn raw chest X-ray corpora into verified WebDataset shards.

Nothing here imports the training code (`mpma_ds`): shards are built once, on any machine.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mpma-ds")  # the one version source is setup.py (shared with mpma_ds)
except PackageNotFoundError:  # a checkout on sys.path without `pip install`
    __version__ = "0+unknown"
