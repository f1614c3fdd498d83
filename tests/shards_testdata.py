"""Shared, build-once test data for the shard tests (test_build_shards*.py, test_verify_shards.py).

Each test module's session fixture calls these with `tmp_path_factory.getbasetemp()`; `lru_cache`
makes the corpus and the reference build happen once per pytest process whichever module asks first.
"""

from __future__ import annotations

import functools
import json
import tarfile
from pathlib import Path

from data_tools.build_shards import build_shards
from data_tools.synth.corpus import generate_corpus

STUDIES = 16
SEED = 3
IMAGE_SIZE = 96
SHARD_SIZE = 8


@functools.cache
def synth_corpus(base: str) -> Path:
    """A small synthetic MIMIC-CXR-JPG corpus with one input of every fault kind."""
    out = Path(base) / "shards-data" / "synth"
    generate_corpus(out, STUDIES, SEED, with_faults=True, min_size=160, max_size=300)
    return out


@functools.cache
def reference_build(base: str) -> tuple[Path, dict]:
    """The corpus built once with 1 worker and every view kept: `(output folder, summary)`."""
    out = Path(base) / "shards-data" / "ref-w1"
    summary = build_shards(
        "mimic-cxr", synth_corpus(base), out, shard_size=SHARD_SIZE, image_size=IMAGE_SIZE, workers=1, views=None,
        progress=False,
    )  # fmt: skip
    return out, summary


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """`{key: {ext: bytes}}` of every sample in a build, read with tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.glob("*/shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def build_files(out: Path) -> dict[str, bytes]:
    """Every file of a finished build (relative path -> bytes), for byte-identity checks."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def faults(corpus: Path) -> list[dict]:
    return json.loads((corpus / "synth_faults.json").read_text())
