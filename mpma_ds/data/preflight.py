"""Before the first step: every shard set a run will read exists, has its indexes, and holds what the task reads.

A run reads its train shards at once, its validation shards at the first evaluation and its test shards only
after the last step; a wrong path there used to surface after the whole training (a traceback at the test
split). ``check_run_inputs`` looks at all of them when the run starts: one ``stat`` and one ``.idx`` check per
shard, and the build's ``manifest.json`` for its kind (``data_tools.shard_format.SHARD_KINDS``: image-report
pairs or VQA samples), so pretraining on VQA shards, or a VQA task on report shards, is refused by name.
The tokenizer and the ``init.from`` folder are loaded by the task's ``resolve`` right after, also before any
step.
"""

from __future__ import annotations

from typing import Any

from data_tools.shard_format import wrong_kind
from mpma_ds.data.shards import resolve_shards


def shards_read(recipe: Any, *, validation: bool, test: bool) -> dict[str, str]:
    """``{recipe key: shard spec}`` of the shard sets the run will read (the non-empty ones).

    Args:
        recipe: a ``Recipe`` (its ``data`` section).
        validation: the run evaluates on the validation split while it trains.
        test: the run evaluates on the test split at the end (an empty ``test_shards`` reads ``val_shards``).
    """
    data = recipe.data
    if data.backend == "synthetic":
        return {}
    out = {}
    if data.train_shards:
        out["data.train_shards"] = data.train_shards
    if data.val_shards and (validation or (test and not data.test_shards)):
        out["data.val_shards"] = data.val_shards
    if data.test_shards and test:
        out["data.test_shards"] = data.test_shards
    return out


def check_run_inputs(recipe: Any, *, kind: str, reader: str, validation: bool, test: bool) -> None:
    """Refuse, before the first step, a shard set the run would read that is missing or of the wrong kind.

    Args:
        recipe: the run's recipe.
        kind: the shard kind the task reads (a key of ``SHARD_KINDS``: ``report`` or ``vqa``).
        reader: who reads them, for the message (``pretraining``, ``task vqa``).
        validation, test: see ``shards_read``.

    Raises:
        FileNotFoundError: a shard set that matches nothing, a missing shard or ``.idx`` (names the recipe key).
        ValueError: shards of another kind (names the kind expected and the command that builds it).
    """
    for key, spec in shards_read(recipe, validation=validation, test=test).items():
        try:
            paths = resolve_shards(spec)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{key}: {err}") from None
        if problem := wrong_kind(paths, kind, reader):
            raise ValueError(f"{key}: {problem}")
