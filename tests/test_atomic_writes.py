"""Crash-safe writes: a write that fails half-way (disk full, a kill) leaves the previous file or folder whole."""

from __future__ import annotations

import errno
import os

import pytest
from train_testdata import tiny_shards

import data_tools.train_tokenizer as train_tokenizer_module
from data_tools.train_tokenizer import train_tokenizer
from mpma_ds.fileio import atomic_write_text, replace_dir


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_text(path, '{"step": 1}')
    assert path.read_text() == '{"step": 1}'

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, '{"step": 2, "a much longer record": true}')
    assert path.read_text() == '{"step": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp file left


def test_replace_dir_swaps_a_folder_whole(tmp_path):
    target, new = tmp_path / "tok", tmp_path / "tok.partial"
    target.mkdir()
    (target / "old.txt").write_text("old")
    new.mkdir()
    (new / "vocab.txt").write_text("new")
    replace_dir(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["vocab.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_tokenizer_interrupted_mid_write_leaves_the_previous_folder(tmp_path, monkeypatch):
    shards = tiny_shards(str(tmp_path / "base"))
    out = tmp_path / "tokenizer"
    train_tokenizer(shards, out, 400, min_frequency=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "tokenizer.json" in before and "training_info.json" in before

    def killed(folder):
        raise KeyboardInterrupt("killed while the tokenizer folder was being written")

    monkeypatch.setattr(train_tokenizer_module, "_make_portable", killed)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(shards, out, 300, min_frequency=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old tokenizer, whole
    monkeypatch.undo()
    info = train_tokenizer(shards, out, 300, min_frequency=1, overwrite=True)  # a rerun replaces it, cleans up
    assert info["vocab_size"] <= 300 and not (tmp_path / "tokenizer.partial").exists()
    assert (out / "tokenizer.json").read_bytes() != before["tokenizer.json"]
