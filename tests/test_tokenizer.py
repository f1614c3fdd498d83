"""data_tools.train_tokenizer: WordPiece on the train split's reports -> an HF tokenizer folder."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

import mpma_ds
from data_tools.synth.corpus import plan_corpus
from data_tools.train_tokenizer import SPECIAL_TOKENS, TokenizerDataError, main, train_tokenizer

VOCAB = 600
VALIDATE_ONLY = "zygomaticotemporal"  # appears many times, but only in the validate split


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (16, 16), 90).save(buf, format="JPEG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[tuple[str, str]], *, with_text: bool = True) -> None:
    """A shard laid out as docs/architecture.md says: <key>.jpg, <key>.txt, <key>.json per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = _jpeg()
    with wds.TarWriter(str(path)) as sink:
        for key, text in samples:
            sample = {"__key__": key, "jpg": jpeg, "json": {"source": "test", "study_id": key}}
            if with_text:
                sample["txt"] = text
            sink.write(sample)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok") / "shards"
    plans = plan_corpus(240, 5, min_size=64, max_size=64, lateral_fraction=0.5, with_faults=False)
    reports = [(f"p{p.subject_id}_s{p.study_id}", p.report) for p in plans]
    write_shard(root / "train/shard-000000.tar", reports[:100])
    write_shard(root / "train/shard-000001.tar", reports[100:200])
    write_shard(root / "validate/shard-000000.tar", [(f"v{i}", f"{VALIDATE_ONLY} " * 20) for i in range(40)])
    write_shard(root / "test/shard-000000.tar", reports[200:])
    return root


@pytest.fixture(scope="session")
def tok_dir(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    info = train_tokenizer(shards, out, VOCAB)
    assert info["shards"] == 2 and info["reports"] == 200
    return out


def test_folder_loads_with_autotokenizer_and_load_tokenizer(tok_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "training_info.json"):
        assert (tok_dir / name).is_file(), name
    auto = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    ours = mpma_ds.load_tokenizer(tok_dir)
    for tok in (auto, ours):
        assert tok.is_fast
        assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
        assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
            0, 1, 2, 3, 4,
        )  # fmt: skip
        assert sorted(tok.all_special_ids) == [0, 1, 2, 3, 4]
        assert len(tok) <= VOCAB
    info = json.loads((tok_dir / "training_info.json").read_text())
    assert info["vocab_size"] == len(auto) and info["reports"] == 200


def test_encoding_specials_deid_marks_and_word_ids(tok_dir):
    tok = mpma_ds.load_tokenizer(tok_dir)
    enc = tok("___F with XXXX cough. Moderate left pleural effusion.")
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert tokens[1] == "___" and "xxxx" in tokens
    assert tokens.count("___") == 1 and not any(t.strip("#") == "_" for t in tokens)
    # Frequent report words are whole tokens; lower-cased.
    for word in ("moderate", "left", "pleural", "effusion"):
        assert word in tokens, (word, tokens)
    # word_ids: None on specials; a "##" piece belongs to the word before it; words are numbered in order.
    words = enc.word_ids()
    assert words[0] is None and words[-1] is None
    inner = words[1:-1]
    assert inner == sorted(inner) and inner[0] == 0
    for i, t in enumerate(tokens[1:-1], start=1):
        if t.startswith("##"):
            assert words[i] == words[i - 1], (t, tokens, words)
    rare = tok("pneumomediastinum")
    pieces = tok.convert_ids_to_tokens(rare["input_ids"])[1:-1]
    assert len(pieces) > 1 and set(rare.word_ids()[1:-1]) == {0}
    # Pairs: [CLS] A [SEP] B [SEP].
    pair = tok("no effusion", "no pneumothorax")
    ids = pair["input_ids"]
    assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 2 and ids[-1] == tok.sep_token_id


def test_round_trip_decode(tok_dir, shards):
    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    text = "Moderate left pleural effusion. No pneumothorax."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    assert tok.decode(ids).startswith("[CLS] ") and tok.decode(ids).endswith(" [SEP]")
    # A whole report: decoding then re-encoding gives the same ids, with ___ and xxxx kept.
    plans = plan_corpus(3, 99, min_size=64, max_size=64, lateral_fraction=0.5, with_faults=False)
    for plan in plans:
        report = plan.report + " Compared with XXXX."
        ids = tok(report)["input_ids"]
        assert tok.unk_token_id not in ids
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert "___" in decoded and "xxxx" in decoded
        assert tok(decoded)["input_ids"] == ids
        assert re.sub(r"\s+", "", decoded) == re.sub(r"\s+", "", report.lower())


def test_only_the_train_split_is_read(tok_dir, shards, tmp_path):
    tok = mpma_ds.load_tokenizer(tok_dir)
    assert VALIDATE_ONLY not in tok.get_vocab()
    assert len(tok.tokenize(VALIDATE_ONLY)) > 1
    # --shards may also name the split folder itself.
    info = train_tokenizer(shards / "train", tmp_path / "t2", VOCAB)
    assert info["reports"] == 200
    # the same reports give the same tokenizer (test_same_tokenizer_in_every_process)
    assert (tmp_path / "t2" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


def test_same_tokenizer_in_every_process(shards, tmp_path):
    """Issue 23: the WordPiece trainer broke ties between equally frequent merges by ids it gave in the order of
    a hash map seeded per process, so each process learnt another vocabulary from the same reports, and a model's
    zero-shot scores (its prompts' token ids) changed from one pytest session to the next. Two processes with
    different hash seeds now write the same tokenizer.json, byte for byte."""
    written = []
    for seed in ("0", "1"):
        out = tmp_path / f"tok-{seed}"
        argv = [sys.executable, "-m", "data_tools.train_tokenizer", "--shards", str(shards), "--out", str(out),
                "--vocab-size", str(VOCAB), "--min-frequency", "1"]  # fmt: skip
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        written.append((out / "tokenizer.json").read_bytes())
    assert written[0] == written[1]


def test_errors(shards, tmp_path):
    with pytest.raises(TokenizerDataError, match="not a folder"):
        train_tokenizer(tmp_path / "missing", tmp_path / "out", VOCAB)
    (tmp_path / "nosplit/validate").mkdir(parents=True)
    with pytest.raises(TokenizerDataError, match="no train split"):
        train_tokenizer(tmp_path / "nosplit", tmp_path / "out", VOCAB)
    (tmp_path / "emptytrain/train").mkdir(parents=True)
    with pytest.raises(TokenizerDataError, match="holds no shard"):
        train_tokenizer(tmp_path / "emptytrain", tmp_path / "out", VOCAB)
    write_shard(tmp_path / "notext/train/shard-000000.tar", [("a", ""), ("b", "")], with_text=False)
    with pytest.raises(TokenizerDataError, match="no report text"):
        train_tokenizer(tmp_path / "notext", tmp_path / "out", VOCAB)
    (tmp_path / "badtar/train").mkdir(parents=True)
    (tmp_path / "badtar/train/shard-000000.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(TokenizerDataError, match="not a readable tar"):
        train_tokenizer(tmp_path / "badtar", tmp_path / "out", VOCAB)
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(shards, tmp_path / "out", 4)
    with pytest.raises(ValueError, match=r"too small.*at least \d+"):
        train_tokenizer(shards, tmp_path / "out", 20)
    assert not (tmp_path / "out").exists()


def test_cli(shards, tmp_path, capsys):
    result = subprocess.run(
        [sys.executable, "-m", "data_tools.train_tokenizer", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--vocab-size" in result.stdout
    assert main(["--shards", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--vocab-size", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_tokenizer: error:") and "nothing" in err[0]
    assert (
        main(
            ["--shards", str(shards), "--out", str(tmp_path / "o"), "--vocab-size", "300", "--min-frequency", "3"]
        )
        == 0
    )
    assert "trained on 200 reports" in capsys.readouterr().out
    assert len(mpma_ds.load_tokenizer(tmp_path / "o")) <= 300


def test_overwrite_replaces_only_a_tokenizer_folder(shards, tok_dir, tmp_path):
    """--overwrite swaps the whole --out folder for the new tokenizer: it used to delete whatever the folder held
    (`--out demo_runs --overwrite` took every run with it). Now it replaces a tokenizer folder only."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not a tokenizer folder \(it also holds notes.txt\)"):
        train_tokenizer(shards, mine, VOCAB, overwrite=True)
    assert (mine / "notes.txt").read_text() == "mine"

    old = tmp_path / "old"
    shutil.copytree(tok_dir, old)
    (old / "tokenizer.json").write_text("{}")  # a stale tokenizer: replaced
    train_tokenizer(shards, old, VOCAB, overwrite=True)
    assert len(mpma_ds.load_tokenizer(old)) <= VOCAB
    (old / "run").mkdir()  # a run someone put inside: the folder is no longer only a tokenizer
    assert main(["--shards", str(shards), "--out", str(old), "--vocab-size", "300", "--overwrite"]) == 2
    assert (old / "run").is_dir()
