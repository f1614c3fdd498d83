"""A synthetic VQA set in exactly the VQA-RAD layout, asked about what each synthetic film shows.

`generate_vqa(corpus, out)` reads a corpus made by `data_tools.synth_corpus` — its `synth_truth.jsonl`
(what each film draws, with sides) and its official split file — and writes::

    OUT/trainset.json  OUT/valset.json  OUT/testset.json   VQA-RAD entries (qid, image_name, question, ...)
    OUT/images/<dicom_id>.jpg                             the frontal films (copied, or shrunk)
    OUT/synth_vqa.json                                    the arguments and the summary

so `build_shards --format vqa-rad` reads it like the real set. Only frontal films (PA / AP) of regular
studies are asked about: they draw every finding on its side (a lateral film shows no side). Questions
(`question_type` / `answer_type`):

- `PRES` / CLOSED: "Is there a pleural effusion?" — yes when the finding is drawn at full strength
  (label 1), no when it is absent (0 or blank); findings drawn at half strength (uncertain, -1) are
  not asked about;
- `POS` / CLOSED: "Is the pneumothorax on the left side?" — only for a finding drawn on one side; the
  side asked is the patient's (radiological convention: the patient's left is on the image's right);
- `DEVICE` / CLOSED: "Is there a support device?", "Are there any lines or tubes?";
- `ABN` / OPEN: "What abnormality is seen in this film?" — the one drawn finding's name, or "no
  finding" (label No Finding = 1; asked only while it is not the majority answer, so about half at
  most); films with several or uncertain findings are not asked;
- `POS` / OPEN: "Where is the opacity?" — "left lung", "right lung" or "both lungs".

CLOSED answers are balanced *per question text*: a question is asked only when its answer does not make
yes and no of that same text differ by more than one, so yes is about half of every CLOSED type and a
question-only guess scores about 0.5. Everything follows from the corpus and `seed`: the same
arguments give the same bytes.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_tools.synth.corpus import TRUTH_FILE

SPLIT_FILES = {"train": "trainset.json", "validate": "valset.json", "test": "testset.json"}
"""Our split names -> the VQA-RAD file names (as M3AE / MEVF ship them)."""

PRESENCE_QUESTIONS: dict[str, str] = {
    "Atelectasis": "Is there atelectasis?",
    "Cardiomegaly": "Is the heart enlarged?",
    "Consolidation": "Is there a consolidation?",
    "Edema": "Is there pulmonary edema?",
    "Enlarged Cardiomediastinum": "Is the mediastinum widened?",
    "Fracture": "Is there a rib fracture?",
    "Lung Lesion": "Is there a lung nodule or mass?",
    "Lung Opacity": "Is there a lung opacity?",
    "Pleural Effusion": "Is there a pleural effusion?",
    "Pleural Other": "Is there pleural thickening?",
    "Pneumothorax": "Is there a pneumothorax?",
}
"""The CLOSED presence question of each drawn pathology."""

SIDE_NOUNS: dict[str, str] = {
    "Atelectasis": "atelectasis",
    "Consolidation": "consolidation",
    "Fracture": "rib fracture",
    "Lung Lesion": "lung lesion",
    "Lung Opacity": "opacity",
    "Pleural Effusion": "pleural effusion",
    "Pleural Other": "pleural thickening",
    "Pneumothorax": "pneumothorax",
}
"""Findings drawn on a side, as the side questions name them."""

WHERE_FINDINGS = (
    "Atelectasis",
    "Consolidation",
    "Lung Lesion",
    "Lung Opacity",
    "Pleural Effusion",
    "Pneumothorax",
)
"""Findings of the lungs and pleura asked "Where is the ...?" (answers: left lung / right lung / both lungs)."""

DEVICE_QUESTIONS = ("Is there a support device?", "Are there any lines or tubes?")
ABNORMALITY_QUESTION = "What abnormality is seen in this film?"
ANSWER_NAMES: dict[str, str] = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "pulmonary edema",
    "Enlarged Cardiomediastinum": "widened mediastinum",
    "Fracture": "rib fracture",
    "Lung Opacity": "lung opacity",
    "Pleural Effusion": "pleural effusion",
    "Pleural Other": "pleural thickening",
    "Pneumothorax": "pneumothorax",
}
"""OPEN answers naming a finding (Lung Lesion: "lung nodule" below 3 cm, else "lung mass", as the reports)."""

_KINDS = ("PRES", "PRES", "POS", "DEVICE", "ABN", "WHERE")
"""The question kinds a film draws from, in a per-film random order (presence twice as often)."""


@dataclass
class _Question:
    question: str
    answer: str
    answer_type: str
    question_type: str
    finding: str | None


def read_truth(corpus: Path) -> list[dict]:
    """The corpus's `synth_truth.jsonl` rows, their splits checked against the official split file.

    Raises:
        ValueError: not a synthetic corpus, or one written before the generator recorded its truth.
    """
    path = corpus / TRUTH_FILE
    if not corpus.exists():
        raise ValueError(
            f"--corpus {corpus} does not exist; make one with python -m data_tools.synth_corpus --out {corpus}"
        )
    if not corpus.is_dir():
        raise ValueError(f"--corpus {corpus} is a file; give the folder python -m data_tools.synth_corpus wrote")
    if not path.is_file():
        older = (corpus / "synth_corpus.json").is_file()
        raise ValueError(
            f"--corpus {corpus} has no {TRUTH_FILE}: "
            + ("it was made by an older synth_corpus, which did not record what each film shows; regenerate it"
               if older else "give a folder made by python -m data_tools.synth_corpus")
        )  # fmt: skip
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    split_csv = corpus / "mimic-cxr-2.0.0-split.csv.gz"
    if not split_csv.is_file():
        raise ValueError(f"--corpus {corpus} has no mimic-cxr-2.0.0-split.csv.gz (the official split file)")
    with gzip.open(split_csv, "rt", encoding="utf-8", newline="") as f:
        split_of = {r["dicom_id"]: r["split"] for r in csv.DictReader(f)}
    for row in rows:
        if split_of.get(row["dicom_id"], row["split"]) != row["split"]:
            raise ValueError(
                f"{TRUTH_FILE} and the split file disagree on {row['dicom_id']}; regenerate the corpus"
            )
        row["split"] = split_of.get(row["dicom_id"], row["split"])
    return rows


class _Balancer:
    """Yes/no counts per CLOSED question text; a candidate may not leave yes and no more than one apart.
    OPEN "no finding" is asked only while it is not the majority of the abnormality answers."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.abnormality: Counter = Counter()

    def open_ok(self, cand: _Question) -> bool:
        """Whether an OPEN candidate may be asked (and counts it if so)."""
        if cand.question_type == "ABN":
            named = sum(self.abnormality.values()) - self.abnormality["no finding"]
            if cand.answer == "no finding" and self.abnormality["no finding"] >= named:
                return False
            self.abnormality[cand.answer] += 1
        return True

    def pick(self, candidates: list[_Question], rng: np.random.Generator) -> _Question | None:
        """The candidate whose answer its text needs most (ties: random); None if each would unbalance."""
        best: list[_Question] = []
        best_score = 0
        for cand in candidates:
            c = self.counts[cand.question]
            score = c["no" if cand.answer == "yes" else "yes"] - c[cand.answer]  # >= 0: not past one apart
            if score > best_score:
                best, best_score = [cand], score
            elif score == best_score:
                best.append(cand)
        if not best:
            return None
        choice = best[int(rng.integers(len(best)))]
        self.counts[choice.question][choice.answer] += 1
        return choice


def _closed(question: str, yes: bool, qtype: str, finding: str | None) -> _Question:
    return _Question(question, "yes" if yes else "no", "CLOSED", qtype, finding)


def _candidates(kind: str, drawn: dict[str, dict], labels: dict[str, Any]) -> list[_Question]:
    """Every question of `kind` this film can answer from what it draws."""
    present = {n for n, e in drawn.items() if e["state"] == 1}
    uncertain = {n for n, e in drawn.items() if e["state"] == -1}
    if kind == "PRES":
        return [_closed(q, n in present, "PRES", n) for n, q in PRESENCE_QUESTIONS.items() if n not in uncertain]
    if kind == "POS":
        out = []
        for name, noun in SIDE_NOUNS.items():
            side = drawn.get(name, {}).get("side") if name in present else None
            if side in ("left", "right"):
                for asked in ("left", "right"):
                    out.append(_closed(f"Is the {noun} on the {asked} side?", asked == side, "POS", name))
        return out
    if kind == "DEVICE":
        if "Support Devices" in uncertain:
            return []
        return [_closed(q, "Support Devices" in present, "DEVICE", "Support Devices") for q in DEVICE_QUESTIONS]
    if kind == "ABN":
        pathologies = (present | uncertain) - {"Support Devices"}
        if labels.get("No Finding") == 1 and not pathologies:
            return [_Question(ABNORMALITY_QUESTION, "no finding", "OPEN", "ABN", "No Finding")]
        if len(pathologies) == 1 and not uncertain - {"Support Devices"}:
            (name,) = pathologies
            answer = ANSWER_NAMES.get(name)
            if name == "Lung Lesion":
                answer = "lung mass" if float(drawn[name].get("size_cm", 0)) >= 3.0 else "lung nodule"
            return [_Question(ABNORMALITY_QUESTION, answer, "OPEN", "ABN", name)] if answer else []
        return []
    if kind == "WHERE":
        out = []
        for name in WHERE_FINDINGS:
            side = drawn.get(name, {}).get("side") if name in present else None
            if side in ("left", "right", "bilateral"):
                where = "both lungs" if side == "bilateral" else f"{side} lung"
                noun = SIDE_NOUNS[name]
                out.append(_Question(f"Where is the {noun}?", where, "OPEN", "POS", name))
        return out
    raise KeyError(kind)


def ask_film(
    drawn: dict[str, dict], labels: dict[str, Any], n: int, rng: np.random.Generator, balancer: _Balancer
) -> list[_Question]:
    """Up to `n` different questions about one film: kinds in a random order, CLOSED ones balanced."""
    asked: list[_Question] = []
    texts: set[str] = set()
    kinds = [_KINDS[i] for i in rng.permutation(len(_KINDS))]
    for kind in kinds:
        if len(asked) >= n:
            break
        candidates = [c for c in _candidates(kind, drawn, labels) if c.question not in texts]
        if not candidates:
            continue
        if candidates[0].answer_type == "CLOSED":
            choice = balancer.pick(candidates, rng)
        else:
            choice = candidates[int(rng.integers(len(candidates)))]
            choice = choice if balancer.open_ok(choice) else None
        if choice is not None:
            asked.append(choice)
            texts.add(choice.question)
    return asked


def _write_image(src: Path, dest: Path, image_size: int) -> None:
    """Copy a film, or shrink it to a shorter side of `image_size` (never enlarged) as a grayscale JPEG."""
    if image_size <= 0:
        shutil.copyfile(src, dest)
        return
    with Image.open(src) as img:
        w, h = img.size
        if min(w, h) <= image_size:
            shutil.copyfile(src, dest)
            return
        size = (
            (image_size, max(1, round(h * image_size / w)))
            if w <= h
            else (max(1, round(w * image_size / h)), image_size)
        )
        img.draft("L", size)
        img = img.convert("L").resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
    dest.write_bytes(buf.getvalue())


def _prepare_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the VQA set")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "synth_vqa.json").is_file():
            raise ValueError(f"--out {out} is not empty and holds no synth_vqa.json; give a new or empty folder")
        shutil.rmtree(out / "images", ignore_errors=True)  # a previous synthetic VQA set: replace it
        for name in (*SPLIT_FILES.values(), "synth_vqa.json"):
            (out / name).unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)


def generate_vqa(
    corpus: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    image_size: int = 0,
    questions_per_image: int = 4,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the synthetic VQA set of a synthetic corpus to `out` (VQA-RAD layout) and return its summary.

    Args:
        corpus: a folder made by `data_tools.synth_corpus` (with its `synth_truth.jsonl`).
        out: the VQA folder (created; a previous synthetic VQA set there is replaced).
        seed: seeds the choice and order of questions.
        image_size: 0 copies the films unchanged; PX > 0 shrinks larger films to a shorter side of PX.
        questions_per_image: at most this many questions per film.
        progress: show a tqdm bar.

    Returns:
        {"out", "corpus", "seed", "images", "questions", "splits": {split: {"patients", "images",
        "questions"}}, "types": {"<question_type>/<answer_type>": {"questions", "yes" (CLOSED: share of
        yes), "answers": {answer: n}}}, "closed_yes": share of yes over all CLOSED, "seconds"}.

    Raises:
        ValueError: a bad argument, a corpus without its truth file, or an output folder in use.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    corpus, out = Path(corpus), Path(out)
    if questions_per_image < 1 or image_size < 0:
        raise ValueError("--questions-per-image must be >= 1 and --image-size >= 0")
    films = [r for r in read_truth(corpus) if r["fault"] is None and r["view"] in ("PA", "AP")]
    if not films:
        raise ValueError(f"--corpus {corpus} has no regular frontal film to ask about")
    _prepare_output(out)
    rng = np.random.default_rng(seed)
    balancer = _Balancer()
    entries: dict[str, list[dict]] = {split: [] for split in SPLIT_FILES}
    qid = 0
    for film in tqdm(films, desc="synth vqa", unit="img", disable=not progress):
        name = f"{film['dicom_id']}.jpg"
        questions = ask_film(film["drawn"], film["labels"], questions_per_image, rng, balancer)
        if questions:  # images/ holds exactly the films asked about
            _write_image(corpus / film["path"], out / "images" / name, image_size)
        for q in questions:
            qid += 1
            entries.setdefault(film["split"], []).append({
                "qid": qid, "image_name": name, "image_organ": "CHEST", "answer": q.answer,
                "answer_type": q.answer_type, "question_type": q.question_type, "question": q.question,
                "phrase_type": "freeform", "finding": q.finding, "subject_id": film["subject_id"],
                "study_id": film["study_id"],
            })  # fmt: skip
    for split, file_name in SPLIT_FILES.items():
        (out / file_name).write_text(json.dumps(entries[split], indent=1) + "\n", encoding="utf-8")
    summary = _summarise(films, entries)
    summary.update(corpus=str(corpus), seed=seed)
    args = {
        "corpus": str(corpus),
        "seed": seed,
        "image_size": image_size,
        "questions_per_image": questions_per_image,
    }
    (out / "synth_vqa.json").write_text(json.dumps({"args": args, "summary": summary}, indent=2) + "\n")
    summary["out"] = str(out)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def _summarise(films: list[dict], entries: dict[str, list[dict]]) -> dict[str, Any]:
    splits = {}
    for split, rows in entries.items():
        in_split = [f for f in films if f["split"] == split]
        splits[split] = {"patients": len({f["subject_id"] for f in in_split}),
                         "images": len({r["image_name"] for r in rows}), "questions": len(rows)}  # fmt: skip
    types: dict[str, dict] = {}
    everything = [r for rows in entries.values() for r in rows]
    for row in everything:
        t = types.setdefault(
            f"{row['question_type']}/{row['answer_type']}", {"questions": 0, "answers": Counter()}
        )
        t["questions"] += 1
        t["answers"][row["answer"]] += 1
    for t in types.values():
        if set(t["answers"]) <= {"yes", "no"}:
            t["yes"] = round(t["answers"]["yes"] / t["questions"], 4)
        t["answers"] = dict(t["answers"].most_common())
    closed = [r for r in everything if r["answer_type"] == "CLOSED"]
    return {
        "images": len({r["image_name"] for r in everything}),
        "questions": len(everything),
        "splits": splits,
        "types": dict(sorted(types.items())),
        "closed_yes": round(sum(r["answer"] == "yes" for r in closed) / max(1, len(closed)), 4),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The answer distribution of a `generate_vqa` summary, as a short table."""
    lines = [f"VQA set {summary.get('out', '')}: {summary['questions']} questions on {summary['images']} films "
             f"in {summary.get('seconds', 0):.1f} s; CLOSED answers yes {summary['closed_yes']:.1%}"]  # fmt: skip
    lines.append(f"{'split':<10}{'patients':>10}{'images':>10}{'questions':>11}")
    for split, row in summary["splits"].items():
        lines.append(f"{split:<10}{row['patients']:>10}{row['images']:>10}{row['questions']:>11}")
    lines.append(f"{'type':<14}{'questions':>10}  answers")
    for name, t in summary["types"].items():
        if "yes" in t:
            answers = f"yes {t['yes']:.1%} / no {1 - t['yes']:.1%}"
        else:
            top = list(t["answers"].items())
            answers = ", ".join(f"{a} {n / t['questions']:.0%}" for a, n in top[:6]) + (
                ", ..." if len(top) > 6 else ""
            )
        lines.append(f"{name:<14}{t['questions']:>10}  {answers}")
    return "\n".join(lines)
