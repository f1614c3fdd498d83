"""Grounding maps and the pointing game: hand-made maps and boxes with known answers (borders, ties), the
box-area chance level, boxes carried through the loader's eval transform, `MPMA.grounding` against the local
alignment loss's own similarities, and `evaluate.py --grounding` on tiny shards with truth written here."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from mpma_ds.data import DataConfig
from mpma_ds.data.transforms import XrayTransform
from mpma_ds.eval.grounding import (
    BEST_MAP,
    box_fraction,
    eval_box,
    evaluate_grounding,
    finding_phrase,
    phrase_maps,
    pointing_game,
    pointing_game_with_intervals,
    pointing_hit,
    stored_sizes,
    write_overlays,
)

STORED = (96, 80)  # (width, height) of the test shards' JPEGs
BRIGHT = [50, 16, 90, 64]  # where the "Pleural Effusion" is drawn (bright), stored pixels
DARK = [4, 40, 30, 76]  # a "Pneumothorax" box over plain background


# ------------------------------------------------------------------------------------------ the pointing game
def _grid(cells: list[tuple[int, int]], shape=(4, 4)) -> torch.Tensor:
    g = torch.zeros(shape)
    for r, c in cells:
        g[r, c] = 1.0
    return g


def test_pointing_hit_on_hand_made_maps_borders_and_ties():
    size = (64, 64)  # 4 x 4 cells of 16 px: cell (1, 2) has its centre at x = 40, y = 24
    g = _grid([(1, 2)])
    assert pointing_hit(g, [32, 16, 48, 32], size)
    assert not pointing_hit(g, [0, 0, 32, 64], size)
    # the centre on the box's left / top edge is in, on its right / bottom (exclusive) edge is out
    assert pointing_hit(g, [40, 24, 41, 25], size)
    assert not pointing_hit(g, [30, 16, 40, 32], size)
    assert not pointing_hit(g, [32, 10, 48, 24], size)
    # a tie is a hit only when every tied maximum is in the box
    tie = _grid([(1, 2), (3, 0)])
    assert not pointing_hit(tie, [32, 16, 48, 32], size)
    assert pointing_hit(tie, [0, 16, 48, 64], size)
    assert not pointing_hit(torch.zeros(4, 4), [0, 0, 48, 64], size)  # a constant map never scores by luck
    assert pointing_hit(torch.zeros(4, 4), [0, 0, 64, 64], size)
    # non-square grids / images: cell (0, 3) of a 2 x 4 map over 32 x 64 px has its centre at (56, 8)
    assert pointing_hit(_grid([(0, 3)], (2, 4)), [50, 0, 60, 10], (32, 64))


def test_pointing_game_accuracy_per_finding_and_chance():
    hits = [1, 0, 1, 1, 0]
    chance = [0.1, 0.3, 0.2, 0.2, 0.5]
    names = ["Edema", "Edema", "Pneumothorax", "Pneumothorax", "Fracture"]
    m = pointing_game(hits, chance, names)
    assert m["pointing_game"] == pytest.approx(0.6)
    assert m["pointing_game_chance"] == pytest.approx(0.26)
    assert m["pointing_game/Edema"] == 0.5 and m["pointing_game/Pneumothorax"] == 1.0
    assert m["pointing_game/Fracture"] == 0.0
    assert m["pointing_game_chance/Edema"] == pytest.approx(0.2)
    assert m["pointing_game_pairs"] == 5
    with pytest.raises(ValueError, match="no .image, finding. pair"):
        pointing_game([], [], [])


def test_pointing_game_intervals():
    # a constant accuracy has a zero-width interval; a mixed one brackets its value
    const = pointing_game_with_intervals([1] * 20, [0.1] * 20, ["Edema"] * 20, n_resamples=200)
    assert const["pointing_game_ci95"] == [1.0, 1.0]
    hits = [1, 0] * 50
    names = ["Edema"] * 98 + ["Fracture"] * 2  # Fracture: absent from some resamples -> skipped there
    m = pointing_game_with_intervals(hits, [0.2] * 100, names, n_resamples=300, seed=1)
    lo, hi = m["pointing_game_ci95"]
    assert 0.35 < lo < 0.5 < hi < 0.65
    assert m["bootstrap_resamples"] == 300
    assert m["bootstrap_skipped"]["pointing_game/Fracture"] > 0


def test_chance_level_of_known_boxes():
    assert box_fraction([0, 0, 32, 16], (64, 64)) == 0.125
    assert box_fraction([10, 10, 10, 30], (64, 64)) == 0.0
    assert box_fraction([0, 0, 64, 64], (64, 64)) == 1.0
    m = pointing_game([0, 1], [box_fraction([0, 0, 32, 64], (64, 64)), box_fraction([0, 0, 16, 16], (64, 64))],
                      ["Edema", "Edema"])  # fmt: skip
    assert m["pointing_game_chance"] == pytest.approx((0.5 + 1 / 16) / 2)


def test_finding_phrases_follow_the_reports_wording():
    assert finding_phrase("Pleural Effusion", "left") == "left pleural effusion"
    assert finding_phrase("Pleural Effusion", "bilateral") == "pleural effusion"
    assert finding_phrase("Lung Lesion", "right") == "right nodule"
    assert finding_phrase("Cardiomegaly", None) == "cardiomegaly"
    assert finding_phrase("Something New") == "something new"


# ------------------------------------------------------------------------------------------ boxes through the transform
def test_eval_box_geometry_by_hand():
    cfg = DataConfig(image_size=40, augment=False)
    # 100 x 80 stored -> shorter side 80 -> 40 (x0.5): 50 x 40, centre crop drops 5 px left and right
    assert eval_box([10, 20, 30, 60], (100, 80), cfg) == (0.0, 10.0, 10.0, 30.0)
    assert eval_box([0, 0, 8, 10], (100, 80), cfg) is None  # all of it in the cropped margin
    assert eval_box([80, 0, 100, 80], (100, 80), cfg) == (35.0, 0.0, 40.0, 40.0)  # clipped to the crop
    assert eval_box([96, 0, 100, 80], (100, 80), cfg) is None


@pytest.mark.parametrize("crop_fraction", [1.0, 0.8])
@pytest.mark.parametrize("stored", [(96, 80), (70, 110)])
def test_box_drawn_in_pixels_lands_under_the_mapped_box(crop_fraction, stored):
    """Bright pixels drawn in a stored image end up under `eval_box` of their box after the loader's transform."""
    width, height = stored
    box = [int(width * 0.55), int(height * 0.2), int(width * 0.9), int(height * 0.6)]
    img = Image.new("L", stored, 20)
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=235)  # x1/y1 exclusive
    cfg = DataConfig(image_size=48, augment=False, eval_crop_fraction=crop_fraction)
    out = XrayTransform(cfg, train=False)(img)[0] * 0.5 + 0.5  # (S, S) back to [0, 1]
    x0, y0, x1, y1 = eval_box(box, stored, cfg)
    inside = out[math.ceil(y0) + 1 : math.floor(y1) - 1, math.ceil(x0) + 1 : math.floor(x1) - 1]
    assert inside.numel() > 0 and inside.min() > 0.85
    bright = torch.nonzero(out > 0.5)
    ys, xs = bright[:, 0].float(), bright[:, 1].float()
    # the bright pixels' extent matches the mapped box within a pixel of interpolation
    assert abs(xs.min() - x0) <= 1.0 and abs(xs.max() + 1 - x1) <= 1.0
    assert abs(ys.min() - y0) <= 1.0 and abs(ys.max() + 1 - y1) <= 1.0


# ------------------------------------------------------------------------------------------ the model's maps
def _tiny_model(**overrides):
    from mpma_ds import create_model

    torch.manual_seed(0)
    return create_model("mpma_tiny", image_size=64, vocab_size=512, max_text_len=32, **overrides).eval()


def test_grounding_shape_and_equal_to_the_local_alignment_similarities():
    from model_testdata import make_batch

    from mpma_ds.models.losses import late_interaction_scores

    model = _tiny_model(align_on="full")
    batch = make_batch(3, 20, 64, vocab_size=512, mask_prob=0.0)
    batch["mlm_labels"].fill_(-100)  # nothing masked: the loss's text pass sees these very ids
    seen = {}
    model.local_loss.register_forward_hook(lambda m, args, out: seen.update(args=args))
    with torch.no_grad():
        model(batch)
        maps = model.grounding(batch["image"], batch["input_ids"], batch["attention_mask"])
    assert maps.shape == (3, 20, 4, 4)
    tokens, valid, patches = seen["args"][:3]  # (B, L, E), (B, L), (B, N, E): what the loss scored
    expected = torch.einsum("ble,bne->bln", tokens, patches).reshape(3, 20, 4, 4)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)
    assert maps.abs().max() <= 1.0 + 1e-5
    # the loss's late-interaction score of each matched pair, rebuilt from the maps
    flat = maps.flatten(2)  # (B, L, N)
    t2p = (flat.amax(-1) * valid).sum(-1) / valid.sum(-1)
    p2t = flat.masked_fill(~valid[..., None], -2.0).amax(1).mean(-1)
    torch.testing.assert_close(0.5 * (t2p + p2t), late_interaction_scores(tokens, valid, patches).diagonal())


# ------------------------------------------------------------------------------------------ tiny shards with truth
def _jpeg(box: list[int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(10, 40, size=(STORED[1], STORED[0])).astype(np.uint8)
    pixels[box[1] : box[3], box[0] : box[2]] = 230
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_split(folder: Path, n: int, *, truth: bool, start: int = 0) -> None:
    from loader_testdata import write_shard

    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(start, start + n):
        # width / height: the ORIGINAL image's size, as build_shards writes them (the stored JPEG is smaller)
        meta = {"source": "mimic-cxr", "subject_id": str(100 + i), "study_id": str(500 + i), "view": "PA",
                "width": 3 * STORED[0], "height": 3 * STORED[1] + 7,
                "labels": {"Pleural Effusion": 1, "Pneumothorax": 1}}  # fmt: skip
        if truth:
            meta["truth"] = {
                "Pleural Effusion": {"present": True, "side": "left", "box": BRIGHT},
                "Pneumothorax": {"present": True, "side": "right", "box": DARK},
                "Edema": {"present": False, "side": None, "box": None},
            }
        report = "FINDINGS: Moderate left pleural effusion. Small right apical pneumothorax. No pulmonary edema."
        samples.append({"__key__": f"s{i:04d}", "jpg": _jpeg(BRIGHT, i), "json": json.dumps(meta).encode(),
                        "txt": report.encode()})  # fmt: skip
    write_shard(folder / "shard-000000.tar", samples)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """``(with truth, without truth, tokenizer)``: validate splits of 6 samples, a tokenizer trained on them."""
    from data_tools.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("grounding")
    _write_split(root / "truth" / "train", 6, truth=True, start=100)
    _write_split(root / "truth" / "validate", 6, truth=True)
    _write_split(root / "plain" / "validate", 6, truth=False)
    tok = root / "tokenizer"
    train_tokenizer(root / "truth", tok, 200, min_frequency=1)
    return root / "truth", root / "plain", tok


class BrightnessModel(nn.Module):
    """A hand-made model whose phrase maps are each patch's mean brightness: every map's maximum is the bright
    square, so the pointing game's answer is known (the box drawn there: hit; any other: miss)."""

    patch = 8

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def grounding(self, *args):  # marks it as the model (not an engine wrapping one)
        raise NotImplementedError

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        p = self.patch
        cells = images[:, 0].reshape(b, h // p, p, w // p, p).mean((2, 4))  # (B, Hp, Wp)
        return torch.stack([cells, torch.ones_like(cells)], -1) * self.scale  # (B, Hp, Wp, 2)

    def token_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, 0.0]).expand(*input_ids.shape, 2)  # (B, L, 2)


def _batches(shard_dir: Path, tok: Path, image_size: int = 64, backend: str = "wds"):
    from mpma_ds.data import build_loader
    from mpma_ds.tokenizer import load_tokenizer

    cfg = DataConfig(val_shards=str(shard_dir), tokenizer=str(tok), image_size=image_size, max_text_len=32,
                     num_workers=0 if backend == "wds" else 1, augment=False, backend=backend)  # fmt: skip
    info = build_loader(cfg, 0, 1, split="validate", batch_size=4, seed=0, train=False)
    return cfg, list(info.loader), load_tokenizer(tok)


@pytest.mark.parametrize("backend", ["wds", "dali"])  # both apply the same eval geometry the boxes follow
def test_evaluate_grounding_known_answer_through_the_real_loader(shards, tmp_path, backend):
    truth, plain, tok = shards
    cfg, batches, tokenizer = _batches(truth / "validate", tok, backend=backend)
    sizes = stored_sizes(truth / "validate")  # read from the JPEGs, not the json's (original) width / height
    assert sizes == {f"s{i:04d}": STORED for i in range(6)}
    # the raw similarity: every token of the hand model is the same, so a neutral phrase's map would cancel it
    found = evaluate_grounding(BrightnessModel(), batches, tokenizer=tokenizer, data_cfg=cfg, sizes=sizes,
                               n_examples=3, n_resamples=100, map="similarity")  # fmt: skip
    m = found.metrics
    assert m["pointing_game/Pleural Effusion"] == 1.0 and m["pointing_game/Pneumothorax"] == 0.0
    assert m["pointing_game"] == 0.5 and m["pointing_game_pairs"] == 12 and m["grounding_images"] == 6
    assert "pointing_game/Edema" not in m  # absent findings are not played
    # the stored 96 x 80 image -> 76 x 64 (x 76/96, y 0.8), 6 px cropped on the left; x1 = 90 * 76/96 - 6 > 64
    expected = (64 - (50 * 76 / 96 - 6)) * (64 - 16) * 0.8 / 64**2
    assert m["pointing_game_chance/Pleural Effusion"] == pytest.approx(expected)
    assert m["pointing_game_ci95"][0] <= 0.5 <= m["pointing_game_ci95"][1]
    assert [(e.finding, e.phrase, e.hit) for e in found.examples[:2]] == [
        ("Pleural Effusion", "left pleural effusion", True), ("Pneumothorax", "right pneumothorax", False)]  # fmt: skip
    paths = write_overlays(tmp_path / "ov", {"hand": found.examples, "again": found.examples})
    assert len(paths) == 3 and all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    with pytest.raises(ValueError, match="no sample of this split has a 'truth'"):
        evaluate_grounding(BrightnessModel(), _batches(plain / "validate", tok)[1], tokenizer=tokenizer,
                           data_cfg=cfg, sizes=stored_sizes(plain / "validate"))  # fmt: skip


def test_phrase_maps_average_the_phrase_tokens_maps(shards):
    _, _, tok = shards
    from mpma_ds.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok)
    model = _tiny_model()
    images = torch.randn(2, 1, 64, 64)
    maps = phrase_maps(model, tokenizer, images, "left pleural effusion", map="similarity")
    assert maps.shape == (2, 4, 4)
    enc = tokenizer(["left pleural effusion"] * 2, return_tensors="pt")
    with torch.no_grad():
        full = model.grounding(images, enc["input_ids"], enc["attention_mask"])  # (2, L, 4, 4)
    torch.testing.assert_close(maps, full[:, 1:-1].mean(1), atol=1e-5, rtol=1e-5)  # [CLS] and [SEP] left out
    # BEST_MAP, the neutral phrase's map taken off: the same as the registered map through model_grids
    neutral = phrase_maps(model, tokenizer, images, "left pleural effusion", map="similarity_neutral")
    from mpma_ds.eval.prior_maps import NEUTRAL_PHRASES

    def mean_map(phrases):  # each phrase's map as MPMA.grounding gives it, averaged ([UNK]-only phrases left out)
        found = []
        for phrase in phrases:
            enc = tokenizer([phrase], return_tensors="pt")
            own = ~torch.isin(enc["input_ids"][0], torch.tensor(tokenizer.all_special_ids))
            if own.any():
                with torch.no_grad():
                    ids, mask = enc["input_ids"].expand(2, -1), enc["attention_mask"].expand(2, -1)
                    found.append(model.grounding(images, ids, mask)[:, own].mean(1))
        return torch.stack(found).mean(0), len(found)

    normal, spelled = mean_map(NEUTRAL_PHRASES)
    assert spelled == len(NEUTRAL_PHRASES)  # this tokenizer spells every neutral phrase: all seven in the mean
    torch.testing.assert_close(neutral, maps - normal, atol=1e-5, rtol=1e-5)
    from mpma_ds.eval.grounding_maps import phrase_grids

    registered = phrase_grids(model, tokenizer, images, ["left pleural effusion"] * 2, map="similarity_neutral")
    torch.testing.assert_close(neutral, registered, atol=1e-5, rtol=1e-5)
    # BEST_MAP, the finding phrases' mean map taken off: each phrase's map through MPMA.grounding, averaged
    from mpma_ds.eval.prior_maps import FINDING_PHRASES

    findings = phrase_maps(model, tokenizer, images, "left pleural effusion", map="similarity_findings")
    reference, spelled = mean_map(FINDING_PHRASES.values())
    assert 0 < spelled < len(FINDING_PHRASES)  # this small tokenizer cannot spell some: the mean skips them
    torch.testing.assert_close(findings, maps - reference, atol=1e-5, rtol=1e-5)
    registered = phrase_grids(model, tokenizer, images, ["left pleural effusion"] * 2, map="similarity_findings")
    torch.testing.assert_close(findings, registered, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ evaluate.py --grounding
def test_evaluate_cli_grounding_writes_overlays_metrics_and_mlflow(shards, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from mpma_ds.cli.evaluate import main

    truth, _, tok = shards
    out = tmp_path / "eval"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["--random-init", "mpma_tiny", "--shards", str(truth), "--tokenizer", str(tok), "--grounding", "2",
                 "--out-dir", str(out), "--tracking-uri", uri, "--experiment", "g", "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    pngs = sorted((out / "grounding").glob("*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 5000 for p in pngs)
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert 0.0 <= metrics["pointing_game"] <= 1.0 and metrics["pointing_game_pairs"] == 12
    lo, hi = metrics["pointing_game_ci95"]
    assert lo <= metrics["pointing_game"] <= hi
    assert metrics["pointing_game_chance"] == pytest.approx(metrics["pointing_game_chance/Pleural Effusion"] / 2
                                                           + metrics["pointing_game_chance/Pneumothorax"] / 2)  # fmt: skip
    assert "pointing game " in printed and "Pleural Effusion" in printed and "grounding overlays: 2" in printed
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("g").experiment_id])[0]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "grounding")) == [
        f"grounding/{p.name}" for p in pngs] + ["grounding/overlays.json"]  # fmt: skip
    index = json.loads((out / "grounding" / "overlays.json").read_text())  # what the comparison's gallery reads
    assert [e["file"] for e in index] == [p.name for p in pngs]
    assert all(e["finding"] in ("Pleural Effusion", "Pneumothorax") and set(e["hit"]) == {"random-mpma_tiny"}
               and e["map"] == BEST_MAP for e in index)  # fmt: skip
    assert run.data.metrics["eval/pointing_game"] == metrics["pointing_game"]
    assert "eval/pointing_game_ci95_low" in run.data.metrics


def test_evaluate_cli_grounding_without_truth_is_one_clear_line(shards, tmp_path, capsys):
    from mpma_ds.cli.evaluate import main

    _, plain, tok = shards
    code = main(["--random-init", "mpma_tiny", "--shards", str(plain), "--tokenizer", str(tok), "--grounding", "2",
                 "--out-dir", str(tmp_path / "e"), "--no-mlflow", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "--grounding needs ground truth" in err and "truth" in err
    assert not (tmp_path / "e" / "results.json").exists()


def test_demo_summary_of_both_models():
    from mpma_ds.eval.grounding import format_pointing_game, pointing_game_summary

    pre = {"pointing_game": 0.7, "pointing_game_ci95": [0.6, 0.8], "pointing_game_chance": 0.12,
           "pointing_game_pairs": 40}  # fmt: skip
    rnd = {"pointing_game": 0.2, "pointing_game_ci95": [0.1, 0.3], "pointing_game_chance": 0.12}
    assert pointing_game_summary({**pre, "grounding_map": "similarity"}, rnd) == {
        "pretrained": 0.7, "random": 0.2, "ci95_pretrained": [0.6, 0.8], "ci95_random": [0.1, 0.3], "chance": 0.12,
        "map": "similarity"}  # fmt: skip
    assert pointing_game_summary({}, {}) is None  # shards without truth: no entry to fill
    line = format_pointing_game(pre, rnd, "out/grounding")
    assert "pretrained 0.700 [0.600, 0.800], random 0.200 [0.100, 0.300], chance (box area) 0.120" in line
    assert "40 pairs" in line and "out/grounding" in line
