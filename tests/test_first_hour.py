"""A new user's first hour: messages that name the right option and cause, and commands that do not sit silent.

Each test failed on the code before issue 27: `compare_runs` against a dead server was silent for minutes, its
`--out FILE` was "cannot read the runs", and a bad value given with `--set` was blamed on the recipe file.
"""

from __future__ import annotations

import time
from pathlib import Path

from mpma_ds.cli import compare
from mpma_ds.cli import pretrain as pretrain_cli
from mpma_ds.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "pretrain_tiny.yaml"


def _err_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()


def test_compare_runs_against_a_dead_server_ends_promptly_with_progress(capsys, monkeypatch):
    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    assert compare.main(["--experiment", "mpma-demo", "--tracking-uri", uri]) == 2
    took = time.monotonic() - t0
    lines = _err_lines(capsys)
    assert took < 30, took  # was 277 s of silence
    assert lines[0].startswith(f"compare_runs.py: reading the runs of 'mpma-demo' from {uri}")
    retries = [ln for ln in lines if "retry" in ln]
    assert len(retries) == 2 and all(uri in ln for ln in retries), lines
    errors = [ln for ln in lines if ": error:" in ln]
    assert len(errors) == 1 and "cannot reach the MLflow server" in errors[0] and "refused" in errors[0], lines


def test_compare_runs_out_a_file_is_named(tmp_path, capsys):
    out = tmp_path / "report.txt"
    out.write_text("mine")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert compare.main(["--experiment", "x", "--tracking-uri", uri, "--out", str(out)]) == 2
    assert _err_lines(capsys) == [f"compare_runs.py: error: --out {out} is a file; give a folder for the report"]
    assert compare.main(["--experiment", "x", "--tracking-uri", uri, "--out", str(out / "sub")]) == 2
    (line,) = _err_lines(capsys)
    assert f"lies under {out}, a file" in line and "cannot read the runs" not in line
    assert out.read_text() == "mine"


def test_set_values_are_named_as_set_not_as_the_recipe_file(capsys):
    argv = ["--config", str(TINY), "--set", "train.max_steps=5", "--set", "data.image_size=3"]
    assert pretrain_cli.main(argv) == 2
    (line,) = [ln for ln in _err_lines(capsys) if ": error:" in ln]
    assert "data.image_size must be an integer >= 8, got 3 (from --set data.image_size=3)" in line
    assert "pretrain_tiny.yaml" not in line
    # a wrong value in the file itself still names the file
    from mpma_ds.config import ConfigError
    from mpma_ds.training import load_recipe

    try:
        load_recipe(TINY, ["model.overrides={vocab_size: -3}"])
    except ConfigError as err:
        assert str(err).endswith("(from --set model.overrides={vocab_size: -3})"), err
    else:
        raise AssertionError("a negative vocab_size was accepted")


def test_a_csv_quote_left_open_is_reported_on_the_line_that_opens_it(tmp_path):
    import pytest

    from data_tools.sources.common import SourceError
    from data_tools.sources.manifest import read_manifest_rows

    path = tmp_path / "captions.csv"
    path.write_text('image,report\n"a.jpg,no acute process\nb.jpg,small effusion\nc.jpg,clear lungs\n')
    with pytest.raises(SourceError, match=r"line 2 opens a quoted cell that is never closed"):
        read_manifest_rows(path)
    path.write_text('image,report\n"a.jpg","he said ""clear"" twice"\nb.jpg,"two\nlines"\n')  # closed quotes parse
    assert [r["report"] for r in read_manifest_rows(path)] == ['he said "clear" twice', "two\nlines"]


def test_an_image_path_that_is_a_folder_or_a_broken_link_is_named_so(tmp_path):
    from data_tools.sources.common import ScanOptions
    from data_tools.sources.manifest import scan_manifest

    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    manifest = tmp_path / "m.csv"
    report = "the lungs are clear without effusion"
    manifest.write_text(f"image,report\nfolder.jpg,{report}\ngone.jpg,{report}\nabsent.jpg,{report}\n")
    details = [r.detail for r in scan_manifest(manifest, ScanOptions()).rejects]
    assert details == [
        f"row 1: {tmp_path / 'folder.jpg'} is a folder, not an image file",
        f"row 2: {tmp_path / 'gone.jpg'} is a broken symbolic link (to {tmp_path / 'nowhere.jpg'})",
        f"row 3: {tmp_path / 'absent.jpg'} does not exist",
    ]


def test_a_dangling_image_link_in_a_mimic_study_is_named(tmp_path):
    from data_tools.sources.common import ScanOptions
    from data_tools.sources.mimic import scan_mimic_cxr
    from data_tools.synth.corpus import generate_corpus

    corpus = tmp_path / "corpus"
    generate_corpus(corpus, 3, 0, min_size=64, max_size=64, lateral_fraction=0.0)
    image = sorted(corpus.glob("files/p*/p*/s*/*.jpg"))[0]
    image.unlink()
    image.symlink_to(tmp_path / "elsewhere" / image.name)
    rejects = scan_mimic_cxr(corpus, ScanOptions()).rejects
    broken = [r for r in rejects if "broken symbolic link" in r.detail]
    assert len(broken) == 1 and broken[0].input.endswith(image.name) and broken[0].reason == "missing_image"
    assert str(tmp_path / "elsewhere") in broken[0].detail


def test_an_empty_shard_is_named_empty_not_missing_its_index(tmp_path):
    import pytest

    from mpma_ds.data.shards import resolve_shards

    (tmp_path / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"shard-000000.tar is empty \(0 bytes"):
        resolve_shards(str(tmp_path))


def test_the_cpu_comm_op_is_kept_per_environment_and_its_build_is_known(tmp_path, monkeypatch):
    """A first CPU run sat silent for minutes while DeepSpeed compiled its all-reduce op, and every other
    checkout's environment rebuilt it in torch's shared folder; the op now lives in the environment (built by
    `make install`) and a run says when it has to compile it."""
    import sys

    from mpma_ds import distributed as dist_mod

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    dist_mod.use_environment_extensions_dir()
    if sys.prefix != sys.base_prefix:  # a virtual environment (make install's .venv)
        assert dist_mod.extensions_dir() == Path(sys.prefix) / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    dist_mod.use_environment_extensions_dir()  # a folder the user set is kept
    assert dist_mod.extensions_dir() == tmp_path and not dist_mod.cpu_comm_op_built()
    (tmp_path / dist_mod.SHM_OP).mkdir()
    (tmp_path / dist_mod.SHM_OP / f"{dist_mod.SHM_OP}.so").write_bytes(b"\x7fELF")
    assert dist_mod.cpu_comm_op_built()
    makefile = (ROOT / "Makefile").read_text()
    assert "build_cpu_comm_op()" in makefile.split("touch $(STAMP)")[0]  # compiled at install
