"""mpma-predict and mpma_ds.Predictor on real files: pydicom-data's chest CR and its JPEG 2000 twin, a folder of
synthetic films mixed with a CT slice, a truncated JPEG and a text file, resume, calibration on labelled shards,
grounding maps against the evaluation's own map, and the viewer in headless Chromium."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from train_testdata import tiny_shards, tiny_tokenizer

import mpma_ds
from mpma_ds.cli.predict import main
from mpma_ds.eval.grounding import phrase_maps
from mpma_ds.predict.calibration import expected_calibration_error, fit_platt, sigmoid
from mpma_ds.predict.inputs import expand_inputs, film_key
from mpma_ds.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
UNCR = get_testdata_file("RG1_UNCR.dcm")  # real PA chest CR, MONOCHROME1, window 15000/30000
J2KR = get_testdata_file("RG1_J2KR.dcm")  # the same film, JPEG 2000 lossless
CT = get_testdata_file("CT_small.dcm")  # a CT slice: not a chest radiograph


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random-weight mpma_tiny at 64 px exported with the tiny shards' tokenizer (no recipe: the model's sizes)."""
    base = str(tmp_path_factory.getbasetemp())
    out = Path(base) / "predict-model"
    if not (out / "model.safetensors").is_file():
        torch.manual_seed(0)
        mpma_ds.create_model("mpma_tiny", image_size=64).save_pretrained(out)
        load_tokenizer(tiny_tokenizer(base)).save_pretrained(str(out / "text_encoder"))
    return out


@pytest.fixture(scope="module")
def predictor(model_dir):
    return mpma_ds.Predictor(model_dir, device="cpu", calibration=None)


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> Path:
    """Four synthetic frontal films (JPG) of the tiny corpus, a CT slice, a truncated JPEG and a text file."""
    base = str(tmp_path_factory.getbasetemp())
    corpus = tiny_shards(base).parent / "corpus"
    out = Path(base) / "predict-films"
    if not out.is_dir():
        out.mkdir()
        jpgs = sorted(corpus.rglob("*.jpg"))[:4]
        for p in jpgs:
            shutil.copy(p, out / p.name)
        shutil.copy(CT, out / "ct_slice.dcm")
        (out / "truncated.jpg").write_bytes(jpgs[0].read_bytes()[:1500])
        (out / "notes.txt").write_text("not a film\n")
    return out


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*argv, "--no-progress"])
    return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------------ DICOM
def test_real_chest_cr_and_its_jpeg2000_twin_score_the_same(predictor):
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg decodes the JPEG 2000 twin")
    a, b = predictor.predict([UNCR, J2KR], phrases=["left pleural effusion"])
    assert (a["width"], a["height"]) == (b["width"], b["height"]) == (1841, 1955)
    assert a["view"] == b["view"]
    assert list(a["scores"]) == list(mpma_ds.predict.predictor.CHEXPERT_LABELS)
    for label in a["scores"]:
        assert a["scores"][label] == pytest.approx(b["scores"][label], abs=1e-6)
    # the map covers the film in its own aspect (the decoded film: shorter side 512), not the model's square
    grid = a["maps"]["left pleural effusion"]
    assert grid.shape == (round(1955 * 512 / 1841), 512)
    np.testing.assert_allclose(grid, b["maps"]["left pleural effusion"], atol=1e-5)
    # MONOCHROME1 is inverted as build_shards does: the lungs (dark) are darker than the film's border (bright)
    img = np.asarray(a["film"].image, dtype=np.float64)
    h, w = img.shape
    assert img[h // 3 : h // 2, w // 5 : w // 3].mean() < img[:, : w // 20].mean()


# ------------------------------------------------------------------------------------------ grounding
def test_square_film_map_is_the_evaluations_phrase_map(predictor):
    """One window on a square film: the map is eval.grounding.phrase_maps of the eval tensor, upsampled."""
    rng = np.random.default_rng(0)
    film = Image.fromarray(rng.integers(0, 255, (96, 96), dtype=np.uint8), "L")
    rec = predictor.predict(film, phrases=["pleural effusion"])[0]
    tensor = predictor.input_tensor(rec["film"])[None]
    ref = phrase_maps(predictor.model, predictor.tokenizer, tensor, "pleural effusion")  # (1, Hp, Wp)
    up = torch.nn.functional.interpolate(ref[:, None], size=(96, 96), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(rec["maps"]["pleural effusion"], up.numpy(), atol=1e-5)


def test_tall_film_is_covered_by_overlapping_windows(predictor):
    film = Image.fromarray(np.tile(np.linspace(0, 255, 150, dtype=np.uint8)[:, None], (1, 64)), "L")  # 64 x 150
    p = mpma_ds.predict.predictor.as_film(film)
    tiles, where, (h, w) = predictor.windows(p)
    assert tiles.shape == (3, 1, 64, 64) and (h, w) == (150, 64)
    assert [t for t, _ in where] == [0, 43, 86]  # ceil(150 / 64) = 3 windows, evenly overlapping, to the end
    grid = predictor.phrase_maps(p, ["edema"])["edema"]
    assert grid.shape == (150, 64) and np.isfinite(grid).all() and -2 <= grid.min() <= grid.max() <= 2


# ------------------------------------------------------------------------------------------ the command
def test_mixed_folder_bad_files_named_once_then_resume(films, model_dir, tmp_path):
    out = tmp_path / "pred"
    rc, stdout, stderr = run_cli("--model", str(model_dir), str(films), "--out", str(out), "--phrase",
                                 "left pleural effusion", "--workers", "1")  # fmt: skip
    assert rc == 0, stderr
    for name, reason in (("ct_slice.dcm", "modality_filtered"), ("truncated.jpg", "corrupt_image"),
                         ("notes.txt", "not_an_image")):  # fmt: skip
        lines = [line for line in stderr.splitlines() if name in line]
        assert len(lines) == 1 and reason in lines[0], stderr
    assert "Modality CT" in stderr
    assert "scored 4 film(s)" in stdout and "skipped 3 file(s)" in stdout
    assert stdout.splitlines()[0].startswith("model: ")
    rows = list(csv.DictReader((out / "predictions.csv").open(encoding="utf-8")))
    assert len(rows) == 4 and {Path(r["file"]).name for r in rows} == {p.name for p in films.glob("*.jpg")} - {
        "truncated.jpg"
    }
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["key"] for r in records] == [r["key"] for r in rows]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["reason"] for s in skipped) == ["corrupt_image", "modality_filtered", "not_an_image"]
    for rec in records:
        assert rec["probabilities"] is None
        # findings: score >= 0 (positive prompt closer than negative), highest first; No Finding is no finding
        assert rec["findings"] == sorted(
            [n for n, s in rec["scores"].items() if s >= 0 and n != "No Finding"], key=lambda n: -rec["scores"][n]
        )
        phrases = [o["phrase"] for o in rec["overlays"]]
        assert phrases[0] == "left pleural effusion" and 1 <= len(phrases) <= 4
        for o in rec["overlays"]:
            with Image.open(out / o["file"]) as im:
                # the film's own aspect (below an 18-px caption strip), not the model's square
                assert abs(im.width / (im.height - 18) - rec["width"] / rec["height"]) < 0.02
            assert 0 <= o["peak"][0] < rec["width"] and 0 <= o["peak"][1] < rec["height"]
        assert (out / rec["thumb"]).is_file()
    assert (out / "index.html").is_file()
    # a rerun keeps what was written: nothing scored again, the same records
    rc, stdout, _ = run_cli("--model", str(model_dir), str(films), "--out", str(out), "--workers", "0",
                            "--phrase", "left pleural effusion")  # fmt: skip
    assert rc == 0 and "scored 0 film(s), 4 kept from an earlier run" in stdout
    again = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert again == records
    # other options (no phrase): the films are redone
    rc, stdout, _ = run_cli("--model", str(model_dir), str(films), "--out", str(out), "--workers", "0")
    assert rc == 0 and "scored 4 film(s)" in stdout


def test_nothing_scored_exits_non_zero(films, model_dir, tmp_path):
    bad = [str(films / n) for n in ("ct_slice.dcm", "truncated.jpg", "notes.txt")]
    rc, stdout, stderr = run_cli("--model", str(model_dir), *bad, "--out", str(tmp_path / "o"), "--workers", "0")
    assert rc == 1 and "none of the 3 file(s) could be scored" in stderr and "skipped 3 file(s)" in stdout
    # the reason names the flag that widens the rule, and the flag works as build_shards' does
    rc, stdout, _ = run_cli("--model", str(model_dir), bad[0], "--out", str(tmp_path / "ct"), "--workers", "0",
                            "--modalities", "all", "--max-findings", "0")  # fmt: skip
    assert rc == 0 and "scored 1 film(s)" in stdout
    rc, _, stderr = run_cli("--model", str(tmp_path / "nope"), *bad, "--out", str(tmp_path / "o"))
    assert rc == 2 and "does not exist" in stderr and len(stderr.strip().splitlines()) == 1
    rc, _, stderr = run_cli(
        "--model", str(model_dir), str(tmp_path / "missing*.png"), "--out", str(tmp_path / "o")
    )
    assert rc == 2 and "matches no file" in stderr


def test_a_phrase_the_model_cannot_read_is_refused_before_any_film(films, model_dir, tmp_path):
    """Longer than the model's max_text_len (BERT's position table would crash mid-run), or nothing but special
    tokens: one line naming the phrase and the limit, exit 2, no film scored and nothing written."""
    limit = mpma_ds.Predictor(model_dir, device="cpu", calibration=None).model.config.max_text_len
    long = " ".join(["left pleural effusion"] * limit)
    out = tmp_path / "o"
    for phrase, why in ((long, f"this model reads at most {limit} (its max_text_len)"), ("[UNK]", "no token")):
        rc, stdout, stderr = run_cli("--model", str(model_dir), str(films), "--phrase", phrase, "--out", str(out))
        assert rc == 2 and why in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert "scored" not in stdout and not out.exists()


def test_inputs_files_folders_globs_each_once(films):
    files, problems = expand_inputs([str(films), str(films / "*.jpg"), str(films / "ct_slice.dcm")])
    assert len(files) == 7 and len({f.resolve() for f in files}) == 7 and problems == []
    assert film_key(films / "a.dcm") != film_key(films / "sub" / "a.dcm")


# ------------------------------------------------------------------------------------------ calibration
def test_platt_fit_recovers_known_parameters_and_ece():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 1, 20000)
    y = (rng.random(20000) < sigmoid(3.0 * s - 1.0)).astype(float)
    a, b = fit_platt(s, y)
    assert a == pytest.approx(3.0, abs=0.15) and b == pytest.approx(-1.0, abs=0.1)
    a_t, b_t = fit_platt(s, y, method="temperature")
    assert b_t == 0.0 and a_t > 0
    assert expected_calibration_error(sigmoid(a * s + b), y) < 0.02
    # hand-made: two bins, |0.1 - 0| * 0.5 + |0.9 - 0.5| * 0.5
    assert expected_calibration_error(np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 0, 1, 0])) == pytest.approx(
        0.25
    )


def test_calibrate_on_labelled_shards_saved_and_reused(films, tmp_path_factory, tmp_path):
    base = str(tmp_path_factory.getbasetemp())
    model = tmp_path / "model"
    torch.manual_seed(1)
    mpma_ds.create_model("mpma_tiny", image_size=64).save_pretrained(model)
    load_tokenizer(tiny_tokenizer(base)).save_pretrained(str(model / "text_encoder"))
    shards = tiny_shards(base)
    jpgs = [str(p) for p in sorted(films.glob("*.jpg")) if p.name != "truncated.jpg"]
    rc, stdout, stderr = run_cli("--model", str(model), *jpgs, "--out", str(tmp_path / "a"), "--calibrate", str(shards),
                                 "--calibration-split", "train", "--calibration-min-count", "5", "--workers", "0")  # fmt: skip
    assert rc == 0, stderr
    cal = json.loads((model / "calibration.json").read_text())
    assert cal["fitted_on"]["split"] == "train" and cal["fitted_on"]["reference"] == "truth"
    fitted = [n for n, v in cal["params"].items() if v is not None]
    assert fitted and set(fitted) | set(cal["left_out"]) == set(cal["labels"])
    before, after = cal["ece"]["train"]["before"], cal["ece"]["train"]["after"]
    assert after < before, cal["ece"]
    assert re.search(r"ECE on train \(\d+ film-label pairs\): uncalibrated [\d.]+ -> calibrated [\d.]+", stdout)
    rows = list(csv.DictReader((tmp_path / "a" / "predictions.csv").open(encoding="utf-8")))
    p = [float(r[f"probability/{fitted[0]}"]) for r in rows]
    assert all(0 < v < 1 for v in p)
    # reused by the next run (no --calibrate): the same probabilities
    rc, stdout, _ = run_cli("--model", str(model), *jpgs, "--out", str(tmp_path / "b"), "--workers", "0")
    assert rc == 0 and "calibration: platt" in stdout
    rows_b = list(csv.DictReader((tmp_path / "b" / "predictions.csv").open(encoding="utf-8")))
    assert [float(r[f"probability/{fitted[0]}"]) for r in rows_b] == p
    # a calibration of another model is not applied
    other = mpma_ds.Predictor(model, device="cpu", labels=["Edema", "Cardiomegaly"])
    assert other.calibration is None


# ------------------------------------------------------------------------------------------ the viewer
CHECK = """<script>window.addEventListener('load', async () => {
  const all = document.querySelectorAll('#grid .card').length;
  const sel = document.getElementById('finding'); sel.value = LABEL; sel.dispatchEvent(new Event('input'));
  const rng = document.getElementById('min'); rng.value = MIN; rng.dispatchEvent(new Event('input'));
  const keys = [...document.querySelectorAll('#grid .card')].map(c => c.dataset.key);
  document.querySelector('#grid .card').click();
  const img = document.getElementById('dimg');
  await new Promise(r => { if (img.complete && img.naturalWidth) r(); else { img.onload = r; img.onerror = r; } });
  const out = document.createElement('pre'); out.id = 'browser-check';
  out.textContent = JSON.stringify({all, keys, min: parseFloat(rng.value), open: document.getElementById('detail').style.display,
    key: document.getElementById('detail').dataset.key, src: img.getAttribute('src'), width: img.naturalWidth,
    buttons: [...document.querySelectorAll('#phrases button')].map(b => b.textContent),
    rows: document.querySelectorAll('#dscores tr').length});
  document.body.appendChild(out);
});</script>"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_viewer_opens_filters_and_shows_an_overlay_in_headless_chromium(films, model_dir, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium: install it with `make browser` (apt-get install chromium) to run this test")
    out = tmp_path / "view"
    rc, _, stderr = run_cli("--model", str(model_dir), str(films), "--out", str(out), "--phrase", "cardiomegaly",
                            "--workers", "0")  # fmt: skip
    assert rc == 0, stderr
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    label = "Edema"
    values = sorted(r["scores"][label] for r in records)
    wanted = (values[1] + values[2]) / 2  # between the 2nd and 3rd film: the filter keeps two
    page = (out / "index.html").read_text(encoding="utf-8")
    checked = out / "checked.html"  # beside index.html: the same relative overlay paths
    checked.write_text(page.replace("</body>", CHECK.replace("LABEL", json.dumps(label)).replace("MIN", repr(wanted))
                                    + "</body>"))  # fmt: skip
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]  # fmt: skip
    dom = subprocess.run([*flags, "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"chromium did not run the page: rc {dom.returncode}\n{dom.stderr[-2000:]}"
    seen = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    expected = [
        r["key"] for r in sorted(records, key=lambda r: -r["scores"][label]) if r["scores"][label] >= seen["min"]
    ]
    assert seen["all"] == 4 and seen["keys"] == expected and 1 <= len(expected) < 4, seen
    assert seen["open"] == "block" and seen["key"] == expected[0]
    first = next(r for r in records if r["key"] == expected[0])
    assert seen["src"] == first["overlays"][0]["file"] and seen["width"] > 0
    assert seen["buttons"] == [o["phrase"] for o in first["overlays"]] and seen["buttons"][0] == "cardiomegaly"
    assert seen["rows"] == 1 + 14
    shot = tmp_path / "viewer.png"
    subprocess.run([*flags, "--window-size=1200,800", "--hide-scrollbars", f"--screenshot={shot}",
                    (out / "index.html").as_uri()], capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.read_bytes()[:4] == b"\x89PNG"
    keep = ROOT / "test-artifacts"
    keep.mkdir(exist_ok=True)
    shutil.copy(shot, keep / "predict_viewer.png")


# ------------------------------------------------------------------------------------------ the package
def test_import_mpma_ds_stays_light_and_predictor_is_exported():
    code = ("import sys, mpma_ds; assert 'mpma_ds.predict' not in sys.modules; "
            "from mpma_ds import Predictor; assert Predictor.__module__ == 'mpma_ds.predict.predictor'; "
            "assert 'Predictor' in mpma_ds.__all__")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    assert math.isfinite(sigmoid(np.array([1e9]))[0])


def test_user_labels_file_and_the_api_gives_the_cli_records(films, model_dir, tmp_path):
    labels = {"Edema": {"positive": ["Pulmonary edema."], "negative": ["No edema."]},
              "Granuloma": {"positive": ["A calcified granuloma."], "negative": ["No granuloma."]}}  # fmt: skip
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    film = sorted(films.glob("*.jpg"))[1]
    rc, _, stderr = run_cli("--model", str(model_dir), str(film), "--out", str(tmp_path / "o"), "--workers", "0",
                            "--labels", str(tmp_path / "labels.json"), "--max-findings", "0")  # fmt: skip
    assert rc == 0, stderr
    (rec,) = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert list(rec["scores"]) == ["Edema", "Granuloma"] and rec["overlays"] == []
    prompts = {k: (v["positive"], v["negative"]) for k, v in labels.items()}
    api = mpma_ds.Predictor(model_dir, device="cpu", labels=list(labels), prompts=prompts, calibration=None)
    (same,) = api.predict(str(film))
    assert {
        k: same[k] for k in ("file", "key", "width", "height", "view", "scores", "probabilities", "findings")
    } == {k: rec[k] for k in ("file", "key", "width", "height", "view", "scores", "probabilities", "findings")}
    (tmp_path / "bad.json").write_text(json.dumps({"Edema": {"positive": ["x"]}}))
    rc, _, stderr = run_cli("--model", str(model_dir), str(film), "--out", str(tmp_path / "o2"),
                            "--labels", str(tmp_path / "bad.json"))  # fmt: skip
    assert rc == 2 and "'Edema' needs 'positive' and 'negative'" in stderr
