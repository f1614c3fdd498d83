"""The data backends ``build_loader`` can build, by ``data.backend``: each registers its stream class where it is
defined (``@BACKENDS.register("wds")``), a plugin's through the ``mpma_ds.backends`` entry-point group.

A backend's stream class is built as ``cls(cfg, shards, *, split, rank, world_size, batch_size, tokenizer, seed,
train, label_fraction, label_fraction_seed)`` (``shards``: the split's shard spec, "" where the backend makes its
own samples; ``cover=``, the train split's positives, is added only under ``data.label_fraction_cover``) and is
an ``EpochStream`` (``mpma_ds.data.plan``): ``num_samples``, ``steps_per_epoch``, ``subset``, exact
``state_dict`` / ``load_state_dict`` positions, ``stats()`` and ``close()``.
"""

from __future__ import annotations

from data_tools.registry import Registry

__all__ = ["BACKENDS"]

BACKENDS: Registry = Registry(
    "data backend",
    "mpma_ds.backends",
    builtins=("mpma_ds.data.wds_backend", "mpma_ds.data.dali_backend", "mpma_ds.data.synthetic"),
)
"""Data backends by name (``data.backend``). DALI itself is imported only when a ``dali`` stream is built."""
