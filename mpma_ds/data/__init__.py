"""Shards → batches: DALI, webdataset and synthetic backends behind one `build_loader` factory.

DALI is imported only when the ``dali`` backend is built, so this package imports without it.
"""

from mpma_ds.data.config import DataConfig
from mpma_ds.data.loader import LoaderInfo, build_loader

__all__ = ["DataConfig", "LoaderInfo", "build_loader"]
