"""Label fractions: a deterministic, nested, patient-level subset of the training split.

The Med-VLP label-efficiency protocol (MGCA, GLoRIA, MRM) fine-tunes on 1 % / 10 % / 100 % of the
training labels. Here a patient is kept iff ``patient_score(subject_id, seed) < fraction``, where the score
is a hash of ``(seed, subject_id)`` mapped to [0, 1). So:

- **patient-level**: every image of a patient is in, or none is;
- **nested**: with one seed, the 1 % subset ⊂ the 10 % subset ⊂ 100 % (a lower fraction keeps a prefix of
  the same ordering of patients);
- **the same everywhere**: the rule sees only the subject ids — not the backend, world size, worker count
  or shard order — and the hash is not Python's salted ``hash()``, so every run with the same seed keeps
  the same patients, and the linear probe applies the very same `patient_subset` to its cached features.

The subject id is the sample JSON's ``subject_id`` (MIMIC's patient; for VQA shards the image id), falling
back to the sample key where the JSON has none. `shard_subject_ids` reads only the JSON members, at the
offsets of the ``.idx``, and only when a fraction below 1 asks for it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mpma_ds.data.samples import SampleReader
from mpma_ds.data.shards import ShardIndex

READ_THREADS = 8  # the JSON members are tiny reads spread over the shards: overlap their I/O
_SUBJECT_FIELD = re.compile(rb'"subject_id"\s*:\s*')
_VALUE = json.JSONDecoder()


def patient_score(subject_id: str, seed: int) -> float:
    """The patient's place in [0, 1) for ``seed``: 53 bits of BLAKE2b over ``"<seed>:<subject_id>"``."""
    digest = hashlib.blake2b(f"{int(seed)}:{subject_id}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / float(1 << 53)


def check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")


def patient_subset(subject_ids: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Which samples a label fraction keeps, given each sample's patient.

    Args:
        subject_ids: the patient of each sample (any order; repeats are the same patient).
        fraction: share of patients kept, in (0, 1]; 1 keeps every sample.
        seed: picks the subset; the subsets of one seed are nested across fractions.

    Returns:
        (N,) bool, True where the sample's patient is kept.
    """
    check_fraction(fraction)
    if fraction == 1.0:  # every score is < 1
        return np.ones(len(subject_ids), dtype=bool)
    patients: dict[str, int] = {}
    codes = np.fromiter((patients.setdefault(str(s), len(patients)) for s in subject_ids), np.int64)
    return _kept_patients(list(patients), fraction, seed)[codes] if len(codes) else np.zeros(0, bool)


def _kept_patients(patients: list[str], fraction: float, seed: int) -> np.ndarray:
    return np.fromiter((patient_score(p, seed) < fraction for p in patients), bool, count=len(patients))


def meta_subject(meta: dict[str, Any], key: str) -> str:
    """The patient of a sample from its decoded JSON (a batch's ``meta``) and key — what the loader's rule
    uses, for applying `patient_subset` to features cached from batches."""
    subject = meta.get("subject_id")
    return key if subject is None or subject == "" else str(subject)


def subject_of(data: bytes, key: str) -> str:
    """The patient of a sample: its JSON's ``subject_id`` as a string, else the sample ``key``.

    Only the field's value is decoded (it comes second in the JSON the data tools write): 5x faster than
    ``json.loads`` of the whole member, which is most of the index-time cost at MIMIC-CXR scale. A JSON too
    broken to read is the key's patient here, and is skipped and counted when the sample is read.
    """
    found = _SUBJECT_FIELD.search(data)
    if found is None:
        return key
    try:
        subject, _ = _VALUE.raw_decode(data[found.end() :].decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
        return key
    return key if subject is None or subject == "" else str(subject)


def shard_subject_ids(index: ShardIndex) -> list[str]:
    """The patient of every sample of ``index`` (flat order), from the JSON members only."""
    json_at = index.member("json")  # (N, 2): offset, size; -1 where a sample has no JSON
    bounds = np.searchsorted(index.shard_of, np.arange(len(index.paths) + 1))  # samples are in shard order

    def read_shard(shard: int) -> list[str]:
        reader = SampleReader(index)
        try:
            lo, hi = int(bounds[shard]), int(bounds[shard + 1])
            out = []
            for key, (offset, size) in zip(index.keys[lo:hi], json_at[lo:hi].tolist()):
                data = reader.read_member(shard, offset, size) if offset >= 0 else b""
                out.append(subject_of(data, key))
            return out
        finally:
            reader.close()

    with ThreadPoolExecutor(min(READ_THREADS, max(1, len(index.paths)))) as pool:
        return [s for shard in pool.map(read_shard, range(len(index.paths))) for s in shard]


def split_subset(
    subject_ids: Sequence[str], fraction: float, seed: int, *, split: str
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """`patient_subset` of a loader's split and its summary, ``LoaderInfo.subset``: ``fraction``, ``seed``,
    ``samples_kept``, ``samples_total``, ``patients_kept``, ``patients_total`` (``None`` at fraction 1).

    Raises:
        ValueError: the subset holds no sample (the message names the fraction, seed and split).
    """
    keep = patient_subset(subject_ids, fraction, seed)
    if fraction >= 1.0:
        return keep, None
    kept_patients = {s for s, ok in zip(subject_ids, keep.tolist()) if ok}
    summary = {
        "fraction": float(fraction),
        "seed": int(seed),
        "samples_kept": int(keep.sum()),
        "samples_total": len(keep),
        "patients_kept": len(kept_patients),
        "patients_total": len(set(subject_ids)),
    }
    if not keep.any():
        raise ValueError(
            f"data.label_fraction={fraction} with data.label_fraction_seed={seed} keeps no sample of the "
            f"{split} split ({summary['patients_total']} patients, {summary['samples_total']} samples): raise "
            "the fraction or pick another seed"
        )
    return keep, summary


def label_fraction_index(
    index: ShardIndex, fraction: float, seed: int, *, split: str
) -> tuple[ShardIndex, dict[str, Any] | None]:
    """``index`` cut to the label-fraction subset, and `split_subset`'s summary; at fraction 1 ``index``
    itself and ``None``, without reading anything."""
    check_fraction(fraction)
    if fraction >= 1.0:
        return index, None
    keep, summary = split_subset(shard_subject_ids(index), fraction, seed, split=split)
    return index.select(keep), summary
