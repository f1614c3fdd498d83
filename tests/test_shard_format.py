"""data_tools.shard_format: the one `.idx` writer/parser and the sample field lists both sides share."""

from __future__ import annotations

import io
import tarfile

import pytest

from data_tools.shard_format import (
    CHEXPERT_LABELS,
    REPORT_FIELDS,
    REQUIRED_MEMBERS,
    SAMPLE_MEMBERS,
    VQA_FIELDS,
    format_index,
    index_from_tar,
    index_path,
    json_fields,
    normalize_answer,
    parse_index,
    read_index,
    split_name,
    tar_members,
)


def test_field_lists():
    assert len(CHEXPERT_LABELS) == 14 and CHEXPERT_LABELS[0] == "Atelectasis"
    assert SAMPLE_MEMBERS == ("jpg", "txt", "json") and set(REQUIRED_MEMBERS) <= set(SAMPLE_MEMBERS)
    assert REPORT_FIELDS[-2:] == VQA_FIELDS[-2:] == ("width", "height")
    assert set(REPORT_FIELDS) < set(VQA_FIELDS)
    assert json_fields("vqa-rad") == json_fields("slake") == VQA_FIELDS
    assert json_fields("mimic-cxr") == REPORT_FIELDS
    assert normalize_answer("  Left   Lung\n") == "left lung"


def test_split_name_and_index_path(tmp_path):
    assert split_name("a/b.c/key.jpg") == ("a/b.c/key", "jpg")
    assert split_name("key.seg.png") == ("key", "seg.png")
    assert split_name("noext") == ("noext", "")
    assert index_path(tmp_path / "shard-000003.tar") == tmp_path / "shard-000003.idx"


def _tar(path, names):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, name in enumerate(names):
            data = b"x" * (i + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_index_round_trip(tmp_path):
    tar = tmp_path / "shard-000000.tar"
    _tar(tar, ["a.jpg", "a.json", "a.txt", "b.jpg", "b.txt"])
    text = index_from_tar(tar)
    assert text.splitlines()[0] == "v1.2 2"
    assert text == format_index(tar_members(tar))
    index_path(tar).write_text(text)
    samples = read_index(index_path(tar))
    assert [key for key, _ in samples] == ["a", "b"]
    assert [ext for ext, _, _ in samples[0][1]] == ["jpg", "json", "txt"]
    assert samples[0][1][0] == ("jpg", 512, 1) and samples[0][1][1] == ("json", 1536, 2)
    assert parse_index(text) == samples


def test_parse_v11_without_names():
    samples = parse_index("v1.1 2\njpg 512 10 txt 1536 4\n\njpg 2560 3 txt 3584 1\n", "x/shard-000007.idx")
    assert samples == [
        ("shard-000007/000000", [("jpg", 512, 10), ("txt", 1536, 4)]),
        ("shard-000007/000002", [("jpg", 2560, 3), ("txt", 3584, 1)]),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"sh\.idx is not a wds2idx index"),
        ("v2 1\n", "is not a wds2idx index"),
        ("v1.2 1\njpg 512 10\n", r"sh\.idx:2: expected groups of 'ext offset size name'"),
        ("v1.2 1\njpg x 10 a.jpg\n", r"sh\.idx:2: offset/size not integers"),
        ("v1.2 2\njpg 512 10 a.jpg\n", "header says 2 samples but lists 1"),
    ],
)
def test_parse_errors_name_file_and_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_index(text, "sh.idx")


def test_empty_tar_has_no_index():
    with pytest.raises(ValueError, match="empty"):
        format_index([])
