"""Shards → batches: DALI, webdataset and synthetic backends behind one `build_loader` factory.

DALI is imported only when the ``dali`` backend is built, so this package imports without it.
"""

from mpma_ds.data.batch import Batch
from mpma_ds.data.config import DataConfig
from mpma_ds.data.loader import LoaderInfo, build_loader
from mpma_ds.data.subsets import meta_subject, patient_subset

__all__ = ["Batch", "DataConfig", "LoaderInfo", "build_loader", "meta_subject", "patient_subset"]
