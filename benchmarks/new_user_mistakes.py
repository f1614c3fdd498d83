"""Issue 26's new-user mistakes, fed to the real commands of a checkout, each answer sorted into one of:

- ``clear``: the outcome the issue asks for (one line naming the problem and the file, a reject with its reason,
  or a note with the counts);
- ``misleading``: a non-zero exit whose line does not name the problem (or names the wrong file);
- ``traceback``: a Python traceback on stderr;
- ``silent``: exit 0 and nothing said, though the result is wrong;
- ``refused``: (``--set train.max_steps`` on an epochs recipe only) a clear refusal of what users expect to work.

    python benchmarks/new_user_mistakes.py                    # this checkout
    python benchmarks/new_user_mistakes.py --tree /tmp/old    # another checkout of mpma-ds (e.g. git archive)

Every command runs as its own process with ``PYTHONPATH=<tree>`` (the tree's ``data_tools`` / ``mpma_ds``), in
a fresh temporary folder. The inputs are built with *this* checkout's ``data_tools`` (a small synthetic corpus,
its shards and tokenizer, a two-question VQA-RAD set), so both trees see the same bytes. Prints one line per
case and the counts; ``--json PATH`` writes them. Takes a few minutes (the training commands start torch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.build_shards import build_shards
from data_tools.shard_format import CHEXPERT_LABELS
from data_tools.synth.corpus import generate_corpus
from data_tools.train_tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
REPORT = "FINDINGS: Heart size is normal. Lungs are clear.\n\nIMPRESSION: No acute process.\n"


@dataclass
class Case:
    name: str
    klass: str
    make: Callable[[Path, dict], list[str]]
    """Builds the input under the case folder; returns the command (argv after the python executable)."""
    good: Callable[[int, str, Path], bool]
    """The outcome the issue asks for, from (exit status, stdout + stderr, case folder)."""


# --------------------------------------------------------------------------------------------- inputs


def film(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 80), dtype=np.uint8), "L").save(path)
    return path


def mimic(root: Path, n: int = 3, reports: dict[int, bytes] | None = None) -> Path:
    for i in range(n):
        study = root / "files" / "p10" / f"p{10000001 + i}" / f"s{50000001 + i}"
        film(study / f"img{i}.png", i)
        (study.parent / f"s{50000001 + i}.txt").write_bytes((reports or {}).get(i, REPORT.encode()))
    return root


def chexpert(root: Path, ids: list[tuple[str, str]]) -> None:
    rows = "".join(f"{s},{t},1.0" + "," * (len(CHEXPERT_LABELS) - 1) + "\n" for s, t in ids)
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text(
        "subject_id,study_id," + ",".join(CHEXPERT_LABELS) + "\n" + rows
    )


def split_table(root: Path, rows: list[tuple[str, str, str]]) -> None:
    text = "dicom_id,study_id,subject_id,split\n" + "".join(
        f"{d},5000000{i + 1},{s},{sp}\n" for i, (d, s, sp) in enumerate(rows)
    )
    (root / "mimic-cxr-2.0.0-split.csv").write_text(text)


def build(work: Path, fmt: str = "mimic-cxr", inp: Path | None = None, *extra: str) -> list[str]:
    return ["-m", "data_tools.build_shards", "--format", fmt, "--input", str(inp or work / "c"),
            "--output", str(work / "o"), "--no-progress", *extra]  # fmt: skip


def metas(out: Path) -> list[dict]:
    found = []
    for tar_path in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            found += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return found


def texts(out: Path) -> list[str]:
    found = []
    for tar_path in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            found += [tar.extractfile(m).read().decode("utf-8", "replace") for m in tar if m.name.endswith(".txt")]
    return found


def reasons(out: Path) -> list[str]:
    path = out / "rejects.jsonl"
    return [json.loads(line)["reason"] for line in path.read_text().splitlines()] if path.is_file() else []


def err_line(rc: int, text: str, *needles: str) -> bool:
    errors = [line for line in text.splitlines() if "error:" in line]
    return rc != 0 and len(errors) == 1 and all(n in errors[0] for n in needles)


# --------------------------------------------------------------------------------------------- the cases


def data_cases() -> list[Case]:
    def float_ids(w, _):
        chexpert(mimic(w / "c"), [(f"{10000001 + i}.0", f"{50000001 + i}.0") for i in range(3)])
        return build(w)

    def other_table(w, _):
        chexpert(mimic(w / "c"), [("19999999", "59999999")])
        return build(w)

    def partial_table(w, _):
        chexpert(mimic(w / "c"), [("10000001", "50000001")])
        return build(w)

    def split_typo(w, _):
        split_table(
            mimic(w / "c"),
            [("img0", "10000001", "train"), ("img1", "10000002", "tset"), ("img2", "10000003", "test")],
        )
        return build(w)

    def split_synonyms(w, _):
        split_table(
            mimic(w / "c"),
            [("img0", "10000001", "training"), ("img1", "10000002", "valid"), ("img2", "10000003", "test")],
        )
        return build(w)

    def patient_two_splits(w, _):
        root = w / "c"
        for i in range(2):
            study = root / "files" / "p10" / "p10000001" / f"s{50000001 + i}"
            film(study / f"img{i}.png", i)
            (study.parent / f"s{50000001 + i}.txt").write_text(REPORT)
        split_table(root, [("img0", "10000001", "train"), ("img1", "10000001", "test")])
        return build(w)

    def manifest_split_typo(w, _):
        film(w / "m" / "a.png")
        (w / "m" / "m.csv").write_text("image,text,split\na.png,heart size normal lungs clear,tset\n")
        return build(w, "manifest", w / "m" / "m.csv")

    def conflicting_views(w, _):
        root = mimic(w / "c")
        (root / "mimic-cxr-2.0.0-metadata.csv").write_text(
            "dicom_id,ViewPosition\nimg0,PA\nimg0,LATERAL\nimg1,PA\nimg2,AP\n"
        )
        return build(w, "mimic-cxr", None, "--views", "all")

    def two_files_one_id(w, _):
        root = mimic(w / "c")
        film(root / "files" / "p10" / "p10000001" / "s50000001" / "img0.jpg", 7)
        return build(w)

    def deid_only(w, _):
        mimic(w / "c", 2, {0: b"FINDINGS: ___ ___ ___ . ___\n\nIMPRESSION: ___\n"})
        return build(w)

    def binary_report(w, _):
        mimic(w / "c", 2, {0: bytes(range(256)) * 4})
        return build(w)

    def utf16_no_bom(w, _):
        mimic(w / "c", 2, {0: REPORT.replace("normal", "enlarged").encode("utf-16-le")})
        return build(w)

    def outside_report(w, _):
        root = mimic(w / "c")
        (w / "services").write_text("FINDINGS: ftp 21/tcp ssh 22/tcp telnet 23/tcp smtp 25/tcp domain 53/tcp\n")
        report = root / "files" / "p10" / "p10000001" / "s50000001.txt"
        report.unlink()
        report.symlink_to(w / "services")
        return build(w)

    def outside_image(w, _):
        root = mimic(w / "c")
        image = root / "files" / "p10" / "p10000002" / "s50000002" / "img1.png"
        image.unlink()
        image.symlink_to(film(w / "elsewhere.png", 9))
        return build(w)

    def outside_manifest_image(w, _):
        (w / "m").mkdir()
        (w / "m" / "a.png").symlink_to(film(w / "elsewhere.png", 9))
        (w / "m" / "m.csv").write_text("image,text\na.png,heart size normal lungs clear\n")
        return build(w, "manifest", w / "m" / "m.csv")

    def output_inside(w, _):
        mimic(w / "c")
        return ["-m", "data_tools.build_shards", "--format", "mimic-cxr", "--input", str(w / "c"), "--output",
                str(w / "c" / "shards"), "--no-progress"]  # fmt: skip

    def gz_not_gzip(w, _):
        film(w / "a.png")
        (w / "m.csv.gz").write_text("image,text\na.png,heart size normal lungs clear\n")
        return build(w, "manifest", w / "m.csv.gz")

    def verify_member(w, shared):
        out = w / "o"
        build_shards("mimic-cxr", mimic(w / "c"), out, progress=False)
        with tarfile.open(next(out.glob("*/*.tar")), "a") as tar:
            info = tarfile.TarInfo("../x")
            info.size = 1
            tar.addfile(info, __import__("io").BytesIO(b"x"))
        return ["-m", "data_tools.verify_shards", str(out), "--no-progress"]

    def verify_fifo(w, shared):
        out = w / "o"
        build_shards("mimic-cxr", mimic(w / "c"), out, progress=False)
        tar_path = next(out.glob("*/*.tar"))
        tar_path.unlink()
        os.mkfifo(tar_path)
        return ["-m", "data_tools.verify_shards", str(out), "--no-progress"]

    def verify_file(w, shared):
        return ["-m", "data_tools.verify_shards", str(shared["shards"] / "manifest.json"), "--no-progress"]

    def tokenizer_on_vqa(w, shared):
        return ["-m", "data_tools.train_tokenizer", "--shards", str(shared["vqa"]), "--out", str(w / "tok"),
                "--vocab-size", "300"]  # fmt: skip

    return [
        Case("chexpert ids re-saved by pandas (50000001.0)", "silent", float_ids,
             lambda rc, t, w: rc == 0 and sum(m["labels"]["Atelectasis"] == 1 for m in metas(w / "o")) == 3),
        Case("chexpert table of another corpus", "silent", other_table,
             lambda rc, t, w: err_line(rc, t, "chexpert.csv", "matches none")),
        Case("chexpert table covering 1 of 3 studies", "silent", partial_table,
             lambda rc, t, w: rc == 0 and "covers 1 of the 3 studies" in t),
        Case("split file says tset", "silent", split_typo, lambda rc, t, w: err_line(rc, t, "'tset'", "validate")),
        Case("split file says training / valid", "silent", split_synonyms,
             lambda rc, t, w: rc == 0 and sorted(p.name for p in (w / "o").iterdir() if p.is_dir()) == ["test", "train", "validate"]),
        Case("one patient in two splits", "silent", patient_two_splits,
             lambda rc, t, w: err_line(rc, t, "1 patient(s)", "--allow-shared-patients")),
        Case("manifest split column says tset", "silent", manifest_split_typo, lambda rc, t, w: err_line(rc, t, "'tset'")),
        Case("two metadata rows, two views for one dicom_id", "silent", conflicting_views,
             lambda rc, t, w: rc == 0 and "conflicting_metadata" in reasons(w / "o")),
        Case("two files of one dicom_id in a study", "silent", two_files_one_id,
             lambda rc, t, w: rc == 0 and "kept" in (w / "o" / "rejects.jsonl").read_text()),
        Case("report of only ___ marks", "silent", deid_only, lambda rc, t, w: rc == 0 and "empty_report" in reasons(w / "o")),
        Case("binary bytes as a report", "silent", binary_report,
             lambda rc, t, w: rc == 0 and "report_not_text" in reasons(w / "o")),
        Case("UTF-16 report without BOM", "silent", utf16_no_bom,
             lambda rc, t, w: rc == 0 and any("enlarged" in s for s in texts(w / "o"))),
        Case("report symlinked outside --input", "silent", outside_report,
             lambda rc, t, w: rc == 0 and "symlink_outside_input" in reasons(w / "o") and not any("tcp" in s for s in texts(w / "o"))),
        Case("image symlinked outside --input", "silent", outside_image,
             lambda rc, t, w: rc == 0 and "symlink_outside_input" in reasons(w / "o")),
        Case("manifest image symlinked outside its folder", "silent", outside_manifest_image,
             lambda rc, t, w: rc != 0 or "symlink_outside_input" in reasons(w / "o")),
        Case("--output inside --input", "silent", output_inside, lambda rc, t, w: err_line(rc, t, "inside --input")),
        Case("manifest .csv.gz that is not gzip", "misleading", gz_not_gzip,
             lambda rc, t, w: err_line(rc, t, "m.csv.gz", "gzip")),
        Case("verify: tar member ../x", "silent", verify_member, lambda rc, t, w: rc == 1 and "'../x'" in t),
        Case("verify: a shard that is a FIFO", "misleading", verify_fifo, lambda rc, t, w: rc == 1 and "FIFO" in t),
        Case("verify FILE", "misleading", verify_file, lambda rc, t, w: err_line(rc, t, "is a file")),
        Case("train_tokenizer on VQA shards", "silent", tokenizer_on_vqa,
             lambda rc, t, w: err_line(rc, t, "image-question-answer", "--format mimic-cxr")),
    ]  # fmt: skip


def run_cases() -> list[Case]:
    def pretrain(shared, w, *sets: str) -> list[str]:
        base = [f"data.train_shards={shared['shards'] / 'train'}", f"data.val_shards={shared['shards'] / 'validate'}",
                f"data.tokenizer={shared['tok']}", "data.image_size=64", "data.max_text_len=32", "data.num_workers=0",
                f"train.output_dir={w / 'run'}", "train.global_batch_size=4", "train.micro_batch_size=4",
                "train.max_steps=3", "train.eval_every=0", "train.save_every=0", "tracking.enabled=false"]  # fmt: skip
        return [str(shared["tree"] / "launch" / "pretrain.py"), "--config", "pretrain_tiny", "--set", *base, *sets]

    def finetune(shared, w, *sets: str) -> list[str]:
        s = shared["shards"]
        base = ["init.from=random", f"data.tokenizer={shared['tok']}", f"data.train_shards={s / 'train'}",
                f"data.val_shards={s / 'validate'}", f"data.test_shards={s / 'test'}", "data.image_size=64",
                "data.num_workers=0", f"train.output_dir={w / 'run'}", "train.global_batch_size=4",
                "train.micro_batch_size=4", "train.eval_every_epochs=0", "train.eval_every=0", "task.bootstrap=0",
                "tracking.enabled=false"]  # fmt: skip
        return [
            str(shared["tree"] / "launch" / "finetune.py"),
            "--config",
            "finetune_cls_tiny",
            "--set",
            *base,
            *sets,
        ]

    def evaluate(shared, w, shards: Path, split: str) -> list[str]:
        return [str(shared["tree"] / "launch" / "evaluate.py"), "--random-init", "mpma_tiny", "--shards", str(shards),
                "--split", split, "--tokenizer", str(shared["tok"]), "--max-batches", "1", "--bootstrap", "0",
                "--device", "cpu", "--out-dir", str(w / "eval"), "--no-mlflow"]  # fmt: skip

    return [
        Case("pretrain --set train.lr=nan", "traceback", lambda w, sh: pretrain(sh, w, "train.lr=nan"),
             lambda rc, t, w: err_line(rc, t, "train.lr", "finite")),
        Case("finetune --set train.weight_decay=inf", "traceback",
             lambda w, sh: finetune(sh, w, "train.weight_decay=inf", "train.max_steps=2", "train.epochs=0"),
             lambda rc, t, w: err_line(rc, t, "train.weight_decay", "finite")),
        Case("finetune whose data.test_shards do not exist", "found after the work",
             lambda w, sh: finetune(sh, w, f"data.test_shards={w / 'typo'}", "train.max_steps=2", "train.epochs=0"),
             lambda rc, t, w: err_line(rc, t, "data.test_shards") and not (w / "run" / "metrics.jsonl").exists()),
        Case("pretrain on VQA shards", "silent", lambda w, sh: pretrain(sh, w, f"data.train_shards={sh['vqa'] / 'train'}"),
             lambda rc, t, w: err_line(rc, t, "image-question-answer", "--format mimic-cxr")),
        Case("evaluate on VQA shards", "silent", lambda w, sh: evaluate(sh, w, sh["vqa"], "test"),
             lambda rc, t, w: err_line(rc, t, "image-question-answer")),
        Case("evaluate --split valid on the build folder", "silent",
             lambda w, sh: evaluate(sh, w, sh["shards"], "valid"),
             lambda rc, t, w: rc == 0 and json.loads((w / "eval" / "results.json").read_text())["split"] == "validate"),
        Case("evaluate --split tset", "silent", lambda w, sh: evaluate(sh, w, sh["shards"] / "validate", "tset"),
             lambda rc, t, w: err_line(rc, t, "'tset'")),
        Case("compare_runs --tracking-uri foo://bar", "misleading",
             lambda w, sh: [str(sh["tree"] / "launch" / "compare_runs.py"), "--experiment", "e", "--tracking-uri", "foo://bar"],
             lambda rc, t, w: err_line(rc, t, "foo://", "sqlite://")),
        Case("--set train.max_steps=20 on an epochs recipe", "friction",
             lambda w, sh: finetune(sh, w, "train.max_steps=20", f"data.train_shards={w / 'none'}"),
             lambda rc, t, w: "max_steps=20 wins over" in t),
    ]  # fmt: skip


def shared_inputs(base: Path) -> dict:
    """A 24-study synthetic corpus -> shards + tokenizer, and a two-question VQA-RAD build."""
    generate_corpus(base / "corpus", 24, 3, min_size=96, max_size=128, lateral_fraction=0.0)
    build_shards("mimic-cxr", base / "corpus", base / "shards", image_size=64, progress=False, val_fraction=0.25,
                 test_fraction=0.25)  # fmt: skip
    train_tokenizer(base / "shards", base / "tok", 400, min_frequency=1)
    rad = base / "rad"
    film(rad / "images" / "a.png")
    entry = {"qid": 1, "image_name": "a.png", "question": "Is there an effusion?", "answer": "yes",
             "answer_type": "CLOSED", "question_type": "PRES"}  # fmt: skip
    (rad / "trainset.json").write_text(json.dumps([entry]))
    (rad / "testset.json").write_text(json.dumps([{**entry, "qid": 2}]))
    build_shards("vqa-rad", rad, base / "vqa", image_size=64, progress=False)
    return {"shards": base / "shards", "tok": base / "tok", "vqa": base / "vqa"}


def classify(case: Case, rc: int, text: str, work: Path) -> str:
    if "Traceback" in text:
        return "traceback"
    try:
        if case.good(rc, text, work):
            return "clear"
    except (OSError, ValueError, KeyError, StopIteration):
        pass
    if case.klass == "friction":
        return "refused"  # a clear line, but it refuses what users expect to work
    return "misleading" if rc != 0 else "silent"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, default=REPO, help="the mpma-ds checkout whose commands are run")
    p.add_argument("--only", choices=("data", "run"), help="only the data-tool or only the training-command cases")
    p.add_argument("--json", type=Path, help="write the per-case results here")
    args = p.parse_args(argv)
    tree = args.tree.resolve()
    env = {**os.environ, "PYTHONPATH": str(tree), "MLFLOW_TRACKING_URI": ""}
    cases = ([] if args.only == "run" else data_cases()) + ([] if args.only == "data" else run_cases())
    results = []
    with tempfile.TemporaryDirectory(prefix="mistakes-") as tmp:
        shared = {**shared_inputs(Path(tmp) / "shared"), "tree": tree}
        for n, case in enumerate(cases):
            work = Path(tmp) / f"case{n:02d}"
            work.mkdir()
            cmd = [sys.executable, *case.make(work, shared)]
            proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            text = proc.stdout + proc.stderr
            verdict = classify(case, proc.returncode, text, work)
            last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
            results.append({"case": case.name, "issue_class": case.klass, "exit": proc.returncode, "verdict": verdict,
                            "last_line": last[:300]})  # fmt: skip
            print(f"{verdict:10s} exit {proc.returncode:3d}  {case.name}  | {last[:140]}", flush=True)
    counts = Counter(r["verdict"] for r in results)
    print(
        f"\n{tree}: {len(results)} cases: "
        + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("clear", "misleading", "traceback", "silent", "refused"))
    )
    if args.json:
        args.json.write_text(json.dumps({"tree": str(tree), "counts": dict(counts), "cases": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
