"""Checkpoint faults: a crafted or damaged checkpoint is refused before anything in it runs (resume and export),
``--resume auto`` falls back past a damaged newest checkpoint, a full disk during a save stops the run with one
line and the earlier checkpoints intact, a kill -9 *inside* a save resumes to the uninterrupted result, an
existing run folder is never mixed with a new run, and the single-process rendezvous listens only on loopback.

The slow tests share one uninterrupted 8-step run (``reference``) and compare against its weights exactly.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from train_testdata import ROOT, TINY_RECIPE, prepared_base, tiny_overrides, tiny_shards, tiny_tokenizer
from train_testdata import pretrain_argv as _argv

from mpma_ds.training import checkpoint as ckpt
from mpma_ds.training.checkpoint import COMPLETE_FILE, complete_tags

sys.path.insert(0, str(ROOT / "launch"))
import export as export_cli  # noqa: E402
import pretrain  # noqa: E402

STEPS = 8
MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return prepared_base(tmp_path_factory)


def _overrides(base: str, out: Path, **extra: object) -> list[str]:
    values: dict[str, object] = {"train.eval_every": 0, "train.keep_last": 3, **extra}
    return tiny_overrides(base, out, **values)


def _stderr_lines(capsys, prog: str = "pretrain.py") -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith(f"{prog}: ")]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=f"step_{step:08d}")


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 50
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, mismatched[:5]


def _losses(run: Path) -> dict[int, float]:
    from mpma_ds.tracking import read_metrics_jsonl

    rows = [r for r in read_metrics_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len({r["step"] for r in rows}) == len(rows), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows}


def _craft(tag_dir: Path, marker: Path, *, consistent: bool) -> None:
    """Replace the model states with a pickle payload; ``consistent``: also rewrite complete.json's record of it
    (an attacker who can write the folder can edit the manifest too)."""
    torch.save({"module": Payload(marker)}, tag_dir / MODEL_STATES)
    if consistent:
        meta = json.loads((tag_dir / COMPLETE_FILE).read_text())
        path = tag_dir / MODEL_STATES
        meta["files"][MODEL_STATES] = {"size": path.stat().st_size, "sha256": ckpt.file_digest(path)}
        (tag_dir / COMPLETE_FILE).write_text(json.dumps(meta))


# ----------------------------------------------------------------------------------------------- fast tests
def _fake_checkpoint(tmp_path: Path) -> Path:
    tag_dir = tmp_path / "checkpoints" / "step_00000002"
    tag_dir.mkdir(parents=True)
    torch.save({"w": torch.ones(3)}, tag_dir / MODEL_STATES)
    torch.save({"rng": torch.zeros(2)}, tag_dir / "rank_state_00000.pt")
    meta = {"step": 2, "tag": tag_dir.name, "files": ckpt.file_manifest(tag_dir)}
    (tag_dir / COMPLETE_FILE).write_text(json.dumps(meta))
    return tag_dir


def test_verify_checkpoint_names_the_damaged_file(tmp_path):
    tag_dir = _fake_checkpoint(tmp_path)
    assert ckpt.verify_checkpoint(tag_dir) is True
    data = (tag_dir / MODEL_STATES).read_bytes()
    (tag_dir / MODEL_STATES).write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ckpt.DamagedCheckpointError, match=f"{MODEL_STATES} is {len(data) // 2} bytes, {len(data)}"
    ):
        ckpt.verify_checkpoint(tag_dir)
    (tag_dir / MODEL_STATES).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(ckpt.DamagedCheckpointError, match="does not match the sha256 recorded"):
        ckpt.verify_checkpoint(tag_dir)
    (tag_dir / MODEL_STATES).write_bytes(data)
    (tag_dir / "extra_optim_states.pt").write_bytes(b"x")
    with pytest.raises(ckpt.DamagedCheckpointError, match="extra_optim_states.pt was not written by"):
        ckpt.verify_checkpoint(tag_dir)
    (tag_dir / "extra_optim_states.pt").unlink()
    (tag_dir / MODEL_STATES).unlink()
    with pytest.raises(ckpt.DamagedCheckpointError, match=f"{MODEL_STATES} is missing"):
        ckpt.verify_checkpoint(tag_dir)


def test_safe_torch_load_refuses_a_pickle_payload_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / MODEL_STATES
    torch.save({"module": Payload(marker)}, path)
    with pytest.raises(ckpt.DamagedCheckpointError, match="holds Python objects a checkpoint never holds"):
        with ckpt.safe_torch_load(tmp_path):
            torch.load(path, map_location="cpu", weights_only=False)  # what DeepSpeed 0.19 calls
    assert not marker.exists()
    assert torch.load is not None and torch.load.__name__ == "load"  # the patch is undone
    with ckpt.safe_torch_load(tmp_path):  # DeepSpeed's own classes stay loadable
        from deepspeed.runtime.zero.config import ZeroStageEnum

        torch.save({"stage": ZeroStageEnum.weights}, tmp_path / "ok.pt")
        assert torch.load(tmp_path / "ok.pt", weights_only=False)["stage"] == ZeroStageEnum.weights


def test_resume_auto_falls_back_and_sets_the_damaged_one_aside(tmp_path):
    first = _fake_checkpoint(tmp_path)
    second = first.parent / "step_00000004"
    shutil.copytree(first, second)
    (second / MODEL_STATES).write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(ckpt.CheckpointWarning, match=r"skipped damaged checkpoint\(s\) step_00000004 \("):
        found = ckpt.find_checkpoint("auto", tmp_path, set_aside=True)
    assert found == first
    assert [t for _, t in complete_tags(first.parent)] == ["step_00000002"]
    assert (first.parent / "step_00000004.damaged" / MODEL_STATES).is_file()
    with pytest.raises(ckpt.DamagedCheckpointError, match="step_00000004.damaged"):
        ckpt.find_checkpoint(str(first.parent / "step_00000004.damaged"), tmp_path)
    (first / MODEL_STATES).write_bytes(b"")
    with pytest.raises(ckpt.DamagedCheckpointError, match="every checkpoint in .* is damaged"):
        ckpt.find_checkpoint("auto", tmp_path)


def test_existing_run_folder_is_refused_without_resume(base, tmp_path, capsys):
    run = tmp_path / "run"
    _fake_checkpoint(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert pretrain.main(_argv(_overrides(base, run))) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"pretrain.py: error: train.output_dir {run} already holds a run (checkpoints/,")
    assert "--resume auto" in lines[0] and "--overwrite" in lines[0]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # nothing touched


def test_single_process_rendezvous_listens_only_on_loopback():
    import psutil

    from mpma_ds.distributed import close_distributed, init_distributed

    assert init_distributed(30.0)
    try:
        listening = [c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert all(addr.ip in ("127.0.0.1", "::1") for addr in listening), listening
    finally:
        close_distributed()
    assert "GLOO_SOCKET_IFNAME" not in os.environ or os.environ.get("MPMA_DS_SET_ENV") is None


def test_evaluate_logs_to_the_callers_tracking_store_not_the_evaluated_recipes(base, tmp_path, monkeypatch):
    """The evaluated folder's recipe.yaml names another store; results go to the caller's (flag, else env)."""
    from mlflow.tracking import MlflowClient

    from mpma_ds.runner.evaluate import run_evaluation
    from mpma_ds.training import load_recipe
    from mpma_ds.training.recipe import save_recipe

    foreign = tmp_path / "foreign" / "mlflow.db"
    recipe = load_recipe(
        TINY_RECIPE, _overrides(base, tmp_path / "run", **{"tracking.uri": f"sqlite:///{foreign}"})
    )
    save_recipe(recipe, tmp_path / "run" / "recipe.yaml")
    common = dict(
        shards=tiny_shards(base), random_init="mpma_tiny", recipe=tmp_path / "run" / "recipe.yaml",
        tokenizer=tiny_tokenizer(base), batch_size=4, max_batches=1, device="cpu",
    )  # fmt: skip
    flag_uri = f"sqlite:///{tmp_path / 'flag.db'}"
    result = run_evaluation(**common, out_dir=tmp_path / "eval1", tracking_uri=flag_uri)
    assert MlflowClient(flag_uri).get_run(result["run_id"]).data.tags["mpma.kind"] == "eval"
    env_uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    result = run_evaluation(**common, out_dir=tmp_path / "eval2")
    assert MlflowClient(env_uri).get_run(result["run_id"]).info.run_name.startswith("eval-")
    assert not foreign.parent.exists()  # nothing was sent to (or created for) the recipe's store


# ----------------------------------------------------------------------------------------------- slow tests
@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs compare bit for bit with runs in a subprocess under OMP_NUM_THREADS=1 (the reference, the
    killed run): CPU float sums may differ with the intra-op thread count, so this process uses one too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> Path:
    """An uninterrupted 8-step run, checkpoints every 2 steps (4, 6, 8 kept)."""

    run = tmp_path_factory.mktemp("reference") / "run"
    # in a process like the killed run's (one intra-op thread): CPU float sums may differ with the thread count
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), *_argv(_overrides(base, run))],
        cwd=run.parent, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.slow
def test_crafted_checkpoint_is_refused_by_resume_and_export(base, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    tag_dir = run / "checkpoints" / f"step_{STEPS:08d}"
    marker = tmp_path / "payload-ran"
    saved_meta = (tag_dir / COMPLETE_FILE).read_text()
    for consistent, expected in ((False, "were written (truncated or replaced)"), (True, "holds Python objects")):
        (tag_dir / COMPLETE_FILE).write_text(saved_meta)
        _craft(tag_dir, marker, consistent=consistent)
        assert pretrain.main(_argv(_overrides(base, run), "--resume", str(tag_dir))) == 2
        lines = _stderr_lines(capsys)
        assert len(lines) == 1 and lines[0].startswith("pretrain.py: error: ") and expected in lines[0], lines
        assert (MODEL_STATES if not consistent else "GLOBAL posix.system") in lines[0], lines
        assert not marker.exists()
        assert export_cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "exported")]) == 2
        lines = _stderr_lines(capsys, "export.py")
        assert len(lines) == 1 and lines[0].startswith("export.py: error: ") and expected in lines[0], lines
        assert not marker.exists() and not (tmp_path / "exported").exists()


@pytest.mark.slow
def test_resume_auto_skips_a_truncated_newest_checkpoint(base, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    states = run / "checkpoints" / f"step_{STEPS:08d}" / MODEL_STATES
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    assert pretrain.main(_argv(_overrides(base, run), "--resume", "auto")) == 0
    warned = [line for line in _stderr_lines(capsys) if "warning" in line]
    assert len(warned) == 1 and "skipped damaged checkpoint(s) step_00000008 (" in warned[0], warned
    assert "resuming from step_00000006" in warned[0]
    _same_weights(_weights(run, STEPS), _weights(reference, STEPS))  # resumed from 6: the same step-8 weights
    assert _losses(run) == _losses(reference)
    assert (run / "checkpoints" / "step_00000008.damaged").is_dir()


@pytest.mark.slow
def test_disk_full_during_a_save_stops_with_one_line_and_keeps_the_earlier_checkpoints(
    base, reference, tmp_path, capsys, monkeypatch
):
    """ENOSPC while DeepSpeed writes step 4's optimizer states (its model states are already on disk); the
    run folder held an older run, replaced with --overwrite."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    real_save = TorchCheckpointEngine.save

    def save(self, state_dict, path):
        if "step_00000004" in str(path) and "optim_states" in str(path):
            Path(path).write_bytes(b"\0" * 4096)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(self, state_dict, path)

    monkeypatch.setattr(TorchCheckpointEngine, "save", save)
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert pretrain.main(_argv(_overrides(base, run, **{"train.max_steps": 6}), "--overwrite")) == 4
    lines = _stderr_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"pretrain.py: error: could not write checkpoint step_00000004 in {run / 'checkpoints'}"
    )
    assert "no space left on device" in lines[0] and "newest: step_00000002" in lines[0]
    assert [t for _, t in complete_tags(run / "checkpoints")] == ["step_00000002"]  # the old run's are gone
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (run / "checkpoints" / "step_00000004").exists()
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_00000002")
    assert sorted(_losses(run)) == [1, 2, 3, 4]


KILL_IN_SAVE = """
import os, signal, sys
sys.path.insert(0, {launch!r})
from deepspeed.runtime.engine import DeepSpeedEngine
real = DeepSpeedEngine.save_checkpoint
def save_then_die(self, save_dir, tag=None, **kw):
    out = real(self, save_dir, tag=tag, **kw)
    if tag == "step_00000004":  # DeepSpeed's files are written, complete.json is not
        os.kill(os.getpid(), signal.SIGKILL)
    return out
DeepSpeedEngine.save_checkpoint = save_then_die
import pretrain
sys.exit(pretrain.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_inside_a_save_then_resume_auto_equals_the_uninterrupted_run(base, reference, tmp_path):
    run = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(KILL_IN_SAVE.format(launch=str(ROOT / "launch"))))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(driver), *_argv(_overrides(base, run))],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    torn = run / "checkpoints" / "step_00000004"
    assert any(torn.glob("*optim_states.pt")) and not (torn / COMPLETE_FILE).exists()
    assert [t for _, t in complete_tags(run / "checkpoints")] == ["step_00000002"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), *_argv(_overrides(base, run), "--resume", "auto")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_weights(_weights(run, STEPS), _weights(reference, STEPS))
    assert _losses(run) == _losses(reference)
    assert [t for _, t in complete_tags(run / "checkpoints")] == [
        "step_00000004",
        "step_00000006",
        "step_00000008",
    ]
