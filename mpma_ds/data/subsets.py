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

**Label coverage** (``data.label_fraction_cover``, `cover_labels`): at 1 % a rare label (NIH's Hernia, ~0.2 %
of the images) often has no positive in the subset. With coverage, the subset above is taken first, unchanged;
then, for each label / class with a positive in the whole training split but none in the subset, the first
patient of the seed's ordering (the lowest ``patient_score``) holding a positive of it is added — whole. The
added patients are the union over the missing labels (not one after another), so the result does not depend on
the labels' order, and stays nested: a patient added at 1 % is in the 10 % subset or is the one 10 % adds too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
    patients, codes = patient_codes(subject_ids)
    return (patient_scores(patients, seed) < fraction)[codes]


def patient_codes(subject_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct patients (in order of first sample) and each sample's index among them, (N,) int64."""
    patients: dict[str, int] = {}
    codes = np.fromiter((patients.setdefault(str(s), len(patients)) for s in subject_ids), np.int64)
    return list(patients), codes


def patient_scores(patients: Sequence[str], seed: int) -> np.ndarray:
    """(P,) `patient_score` of each patient: the seed's ordering of the patients, lowest first."""
    return np.fromiter((patient_score(p, seed) for p in patients), np.float64, count=len(patients))


@dataclass(frozen=True)
class LabelCover:
    """What `cover_labels` needs besides the patients: each sample's positives, in the samples' order.

    Attributes:
        names: the labels (multi-label) or classes (single-label), in column order.
        positives: (N, C) bool, True where the sample is a positive of the label (a class: the sample's class).
    """

    names: tuple[str, ...]
    positives: np.ndarray


def cover_labels(
    subject_ids: Sequence[str], keep: np.ndarray, cover: LabelCover, seed: int, *, scores: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """``keep`` with, for each label holding a positive in the whole split but none in ``keep``, the first
    patient of ``seed``'s ordering (lowest `patient_score`, then subject id) holding a positive of it added.

    Args:
        scores: (P,) another ordering of the distinct patients (`patient_codes` order), lowest first, for a subset
            drawn by another rule than `patient_subset` — the benchmark's image-level linear-probe subset passes
            each image's place in its seeded permutation (``seed`` is then unused). Coverage must follow the order
            that drew ``keep``: then a subset that holds a positive holds the first holder too, which keeps covered
            subsets nested across fractions.

    Returns:
        (N,) bool, the covered subset (``keep`` itself is not changed), and what was added: ``{"labels": the
        labels covered, "patients_added", "samples_added", "uncovered": labels without a positive in the whole
        split, which no patient can cover}``.
    """
    positives = np.asarray(cover.positives, dtype=bool)
    if positives.shape != (len(subject_ids), len(cover.names)):
        raise ValueError(
            f"label coverage: positives of shape {positives.shape} for {len(subject_ids)} samples and "
            f"{len(cover.names)} labels"
        )
    patients, codes = patient_codes(subject_ids)
    per_patient = np.zeros((len(patients), len(cover.names)), dtype=bool)  # (P, C)
    np.logical_or.at(per_patient, codes, positives)
    kept = np.zeros(len(patients), dtype=bool)
    kept[codes[keep]] = True
    anywhere, in_subset = per_patient.any(axis=0), per_patient[kept].any(axis=0)  # (C,)
    missing = np.flatnonzero(anywhere & ~in_subset)
    added: set[int] = set()
    if scores is not None and np.shape(scores) != (len(patients),):
        raise ValueError(f"label coverage: scores of shape {np.shape(scores)} for {len(patients)} patients")
    if len(missing):
        order = patient_scores(patients, seed) if scores is None else np.asarray(scores, dtype=np.float64)
        for c in missing.tolist():
            holders = np.flatnonzero(per_patient[:, c]).tolist()
            added.add(min(holders, key=lambda p: (order[p], patients[p])))
    covered = keep | np.isin(codes, sorted(added))
    info = {
        "labels": [cover.names[c] for c in missing.tolist()],
        "patients_added": len(added),
        "samples_added": int(covered.sum() - np.asarray(keep, bool).sum()),
        "uncovered": [n for n, any_ in zip(cover.names, anywhere.tolist()) if not any_],
    }
    return covered, info


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
    subject_ids: Sequence[str], fraction: float, seed: int, *, split: str, cover: LabelCover | None = None
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """`patient_subset` of a loader's split and its summary, ``LoaderInfo.subset``: ``fraction``, ``seed``,
    ``samples_kept``, ``samples_total``, ``patients_kept``, ``patients_total`` (``None`` at fraction 1); with
    ``cover`` (``data.label_fraction_cover``), `cover_labels` applied and its account as ``cover``.

    Raises:
        ValueError: the subset holds no sample (the message names the fraction, seed and split).
    """
    keep = patient_subset(subject_ids, fraction, seed)
    if fraction >= 1.0:
        return keep, None
    added = None
    if cover is not None:
        keep, added = cover_labels(subject_ids, keep, cover, seed)
    kept_patients = {s for s, ok in zip(subject_ids, keep.tolist()) if ok}
    summary = {
        "fraction": float(fraction),
        "seed": int(seed),
        "samples_kept": int(keep.sum()),
        "samples_total": len(keep),
        "patients_kept": len(kept_patients),
        "patients_total": len(set(subject_ids)),
        **({"cover": added} if added is not None else {}),
    }
    if not keep.any():
        raise ValueError(
            f"data.label_fraction={fraction} with data.label_fraction_seed={seed} keeps no sample of the "
            f"{split} split ({summary['patients_total']} patients, {summary['samples_total']} samples): raise "
            "the fraction or pick another seed"
        )
    return keep, summary


def label_fraction_index(
    index: ShardIndex, fraction: float, seed: int, *, split: str, cover: LabelCover | None = None
) -> tuple[ShardIndex, dict[str, Any] | None]:
    """``index`` cut to the label-fraction subset (``cover``: its positives in ``index``'s sample order), and
    `split_subset`'s summary; at fraction 1 ``index`` itself and ``None``, without reading anything."""
    check_fraction(fraction)
    if fraction >= 1.0:
        return index, None
    if cover is not None and len(cover.positives) != index.num_samples:
        raise ValueError(
            f"data.label_fraction_cover: the task read labels of {len(cover.positives)} samples, the {split} "
            f"split's index lists {index.num_samples} (coverage needs the split's own shards, not a mixture)"
        )
    keep, summary = split_subset(shard_subject_ids(index), fraction, seed, split=split, cover=cover)
    return index.select(keep), summary
