"""Damaged samples the loader's first checks do not catch (issue 11), on both real backends: valid JSON of
the wrong schema, a JPEG whose header and end marker are fine but whose Huffman table is corrupt, and
``.idx`` offsets that are negative or past the end of the tar. Each is skipped and counted, never a crash."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from loader_testdata import IMG, read_samples, shard_root, tokenizer_dir, write_shard
from PIL import Image

from data_tools.shard_format import parse_index
from mpma_ds import load_tokenizer
from mpma_ds.data import DataConfig, build_loader
from mpma_ds.data.dali_backend import jpeg_header
from mpma_ds.data.samples import SampleError, decode_meta


def corrupt_huffman(jpeg: bytes) -> bytes:
    """The first DHT segment's 16 code-length counts set to 255: libjpeg stops with "Bogus Huffman table"."""
    data = bytearray(jpeg)
    at = data.index(b"\xff\xc4")  # DHT marker, then length (2), table class/id (1), 16 counts
    data[at + 5 : at + 21] = b"\xff" * 16
    return bytes(data)


def _edit_index(idx: Path, sample: int, offset_of: Callable[[int], int]) -> None:
    lines = idx.read_text(encoding="utf-8").splitlines()
    fields = lines[1 + sample].split()
    for g in range(0, len(fields), 4):
        if fields[g] == "jpg":
            fields[g + 1] = str(offset_of(int(fields[g + 1])))
    lines[1 + sample] = " ".join(fields)
    idx.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> tuple[Path, dict[str, int], list[str]]:
    base = str(tmp_path_factory.getbasetemp())
    src = sorted((shard_root(base) / "train").glob("shard-*.tar"))
    out = tmp_path_factory.mktemp("faulty-schema")
    good: list[str] = []
    for n, tar in enumerate(src):
        samples = read_samples(tar)
        if n == 0:
            meta = json.loads(samples[0]["json"])
            samples[0]["json"] = json.dumps({**meta, "labels": [1, 0]}).encode()  # valid JSON, wrong schema
            samples[2]["jpg"] = corrupt_huffman(samples[2]["jpg"])
            bad = {0, 2}
        elif n == 1:
            bad = {0, 1}  # their .idx offsets are damaged below
        else:
            bad = set()
        good += [s["__key__"] for i, s in enumerate(samples) if i not in bad]
        write_shard(out / tar.name, samples)
    second = out / src[1].name
    size = second.stat().st_size
    _edit_index(second.with_suffix(".idx"), 0, lambda off: -512)
    _edit_index(second.with_suffix(".idx"), 1, lambda off: size + 1000)  # past the end, off the 512-byte blocks
    return out, {"bad_json": 1, "bad_jpg": 1, "bad_offset": 2}, good


def test_the_faults_pass_the_first_checks(faulty):
    folder, _, _ = faulty
    tar = sorted(folder.glob("shard-*.tar"))[0]
    samples = read_samples(tar)
    json.loads(samples[0]["json"])  # parses: only its schema is wrong
    assert min(jpeg_header(samples[2]["jpg"], "k")) == 64  # header and end marker pass (the shards' 64 px side)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(samples[2]["jpg"])).load()
    second = sorted(folder.glob("shard-*.idx"))[1]
    entries = parse_index(second.read_text(), second)  # the damaged index still parses
    assert dict((e, o) for e, o, _ in entries[0][1])["jpg"] == -512


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_schema_huffman_and_offset_faults_are_skipped_and_counted(faulty, tmp_path_factory, backend):
    folder, expected, good = faulty
    tokenizer = load_tokenizer(tokenizer_dir(str(tmp_path_factory.getbasetemp())))
    cfg = DataConfig(backend=backend, train_shards=str(folder), image_size=IMG, max_text_len=48, num_workers=2)
    info = build_loader(cfg, 0, 1, batch_size=4, tokenizer=tokenizer, seed=2, train=True)
    it = iter(info.loader)
    batches = [next(it) for _ in range(info.steps_per_epoch)]
    stats = info.stats()
    info.close()
    seen = [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if ok]
    assert Counter(seen) == Counter(good)
    assert all(bool(b["image"].isfinite().all()) and b["labels"].shape[1] == 14 for b in batches)
    assert stats["skipped_samples"] == sum(expected.values()), stats
    for reason, n in expected.items():
        assert stats[f"skipped_{reason}"] == n, (reason, stats)


@pytest.mark.parametrize(
    ("meta", "needle"),
    [
        ({"labels": [1, 0]}, "labels is a JSON list"),
        ({"labels": {"Edema": 2}}, "labels.Edema = 2"),
        ({"labels": {"Edema": "yes"}}, "labels.Edema = 'yes'"),
        ({"labels": {"Edema": True}}, "labels.Edema = True"),
        ({"labels": {"Oedema": 1}}, "unknown label name 'Oedema'"),
        ({"split": ["train"]}, "split is a JSON list"),
        ({"answer": 3}, "answer is a JSON int"),
    ],
)
def test_wrong_schema_is_a_bad_json_sample(meta, needle):
    with pytest.raises(SampleError, match="bad_json") as err:
        decode_meta(json.dumps(meta).encode())
    assert needle in str(err.value)
    ok = {
        "labels": {"Edema": 1, "Atelectasis": -1, "Cardiomegaly": None},
        "subject_id": 10000032,
        "split": "train",
    }
    assert decode_meta(json.dumps(ok).encode()) == ok


def test_all_samples_undecodable_is_a_clear_error(tmp_path, tmp_path_factory):
    """A batch whose every JPEG fails to decode on the DALI path ends with one message, not a stack of them."""
    base = str(tmp_path_factory.getbasetemp())
    tar = sorted((shard_root(base) / "train").glob("shard-*.tar"))[0]
    samples = read_samples(tar)[:2]
    for s in samples:
        s["jpg"] = corrupt_huffman(s["jpg"])
    write_shard(tmp_path / "shard-000000.tar", samples)
    tokenizer = load_tokenizer(tokenizer_dir(base))
    cfg = DataConfig(backend="dali", train_shards=str(tmp_path), image_size=IMG, max_text_len=48, num_workers=1)
    info = build_loader(cfg, 0, 1, batch_size=2, tokenizer=tokenizer, seed=0, train=False)
    with pytest.raises(RuntimeError, match="every sample of batch 0 .* is unreadable .*bad_jpg: 2.*verify_shards"):
        next(iter(info.loader))
    info.close()
