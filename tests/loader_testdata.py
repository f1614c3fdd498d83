"""Build-once test data for the loader tests (test_loader*.py, test_masking.py).

Real shards made by the data tools (synthetic MIMIC-CXR corpus → `build_shards`), a tokenizer trained
on them by `data_tools.train_tokenizer`, and a shard set with faults. `lru_cache` builds each once per
pytest process, whichever module asks first.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import tarfile
from pathlib import Path

import webdataset as wds

from data_tools.build_shards import build_shards
from data_tools.shard_format import index_from_tar
from data_tools.synth.corpus import generate_corpus
from data_tools.train_tokenizer import train_tokenizer

STUDIES = 40
SEED = 5
IMAGE_SIZE = 64
SHARD_SIZE = 8
IMG = 32  # the loader's image_size in tests


@functools.cache
def shard_root(base: str) -> Path:
    """``OUT`` of a real build: ``train/`` (several shards), ``validate/``, ``test/``."""
    corpus = Path(base) / "loader-data" / "corpus"
    generate_corpus(corpus, STUDIES, SEED, min_size=96, max_size=128)
    out = Path(base) / "loader-data" / "shards"
    build_shards(
        "mimic-cxr", corpus, out, shard_size=SHARD_SIZE, image_size=IMAGE_SIZE, val_fraction=0.2,
        test_fraction=0.0, views=None, progress=False,
    )  # fmt: skip
    return out


@functools.cache
def tokenizer_dir(base: str) -> Path:
    """A WordPiece tokenizer trained on the shards' train reports."""
    out = Path(base) / "loader-data" / "tokenizer"
    train_tokenizer(shard_root(base), out, vocab_size=400, min_frequency=1)
    return out


def read_samples(tar_path: Path) -> list[dict]:
    """Every sample of a shard as ``{"__key__", ext: bytes}``, in file order."""
    return list(wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False))


def write_shard(path: Path, samples: list[dict]) -> None:
    """Write samples as a tar plus its DALI index."""
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
    path.with_suffix(".idx").write_text(index_from_tar(path), encoding="utf-8")


@functools.cache
def faulty_shards(base: str) -> tuple[Path, dict[str, int], list[str]]:
    """A copy of the train shards with faults: ``(folder, expected skips by reason, keys that stay good)``.

    - shard 0: sample 1 loses its ``.txt``; sample 3's JPEG is cut in half;
    - the last shard: the tar file is cut inside the last sample's first member (an interrupted write),
      its ``.idx`` still listing the whole sample.
    """
    src = shard_root(base) / "train"
    out = Path(base) / "loader-data" / "faulty"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tars = sorted(src.glob("shard-*.tar"))
    good: list[str] = []
    for tar in tars[:-1]:
        samples = read_samples(tar)
        if tar == tars[0]:
            del samples[1]["txt"]
            samples[3]["jpg"] = samples[3]["jpg"][: len(samples[3]["jpg"]) // 2]
            good += [s["__key__"] for i, s in enumerate(samples) if i not in (1, 3)]
        else:
            good += [s["__key__"] for s in samples]
        write_shard(out / tar.name, samples)
    last = tars[-1]
    samples = read_samples(last)
    write_shard(out / last.name, samples)
    with tarfile.open(out / last.name) as archive:
        members = [m for m in archive.getmembers() if m.isreg()]
    cut = [m for m in members if m.name.startswith(samples[-1]["__key__"] + ".")][0]
    with open(out / last.name, "r+b") as handle:
        handle.truncate(cut.offset_data + cut.size // 2)
    good += [s["__key__"] for s in samples[:-1]]
    return out, {"missing_txt": 1, "bad_jpg": 1, "truncated": 1}, good


@functools.cache
def indiana_reports(limit: int = 600) -> list[str]:
    """Real report text: FINDINGS + IMPRESSION of Indiana University reports (torchxrayvision's tgz)."""
    spec = importlib.util.find_spec("torchxrayvision")
    assert spec is not None and spec.submodule_search_locations, "torchxrayvision (test data) is not installed"
    tgz = Path(next(iter(spec.submodule_search_locations))) / "data" / "NLMCXR_reports.tgz"
    reports = []
    with tarfile.open(tgz) as archive:
        for member in archive:
            if not member.name.endswith(".xml"):
                continue
            xml = archive.extractfile(member).read().decode("utf-8", "replace")
            parts = re.findall(r'Label="(?:FINDINGS|IMPRESSION)"[^>]*>([^<]*)<', xml)
            text = " ".join(p.strip() for p in parts if p.strip())
            if text:
                reports.append(text)
            if len(reports) >= limit:
                break
    return reports


def patient_shards(folder: Path, patients: int = 60, shard_size: int = 10) -> dict[str, str]:
    """Small shards of ``patients`` patients with 1-3 images each: ``{sample key: patient}``.

    Made directly (tiny JPEGs, no data tools), for label-fraction tests that need many patients. Every
    seventh sample's JSON has no ``subject_id`` and every eleventh sample has no JSON member: their patient
    is the sample key, as the loader's rule says.
    """
    import io
    import json

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples, patient_of = [], {}
    for p in range(patients):
        subject = f"1{p:07d}"
        for image in range(int(rng.integers(1, 4))):
            n = len(samples)
            key = f"s{n:05d}"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(buf, format="JPEG")
            sample = {"__key__": key, "jpg": buf.getvalue(), "txt": f"patient {p} image {image}. lungs clear."}
            meta = {"source": "test", "subject_id": subject, "image_id": key, "labels": {"Edema": p % 2}}
            if n % 7 == 3:
                del meta["subject_id"]
            if n % 11 != 5:
                sample["json"] = json.dumps(meta).encode()
            patient_of[key] = subject if ("json" in sample and "subject_id" in meta) else key
            samples.append(sample)
    for start in range(0, len(samples), shard_size):
        write_shard(folder / f"shard-{start // shard_size:06d}.tar", samples[start : start + shard_size])
    return patient_of
