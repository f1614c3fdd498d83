"""The stages of ``make demo``: the whole product on a laptop-sized synthetic corpus, end to end.

    python launch/demo.py [--out demo_runs] [--studies N] [--steps N]        (what `make demo` runs; also
    mpma-demo, the command in mpma_ds.cli.demo)

1. synthetic MIMIC-CXR-JPG corpus     python -m data_tools.synth_corpus
2. WebDataset shards (+ DALI index)  python -m data_tools.build_shards
3. WordPiece tokenizer               python -m data_tools.train_tokenizer
4. a synthetic VQA-RAD set + shards  python -m data_tools.synth_vqa; build_shards --format vqa-rad
5. pretraining, ZeRO-3               deepspeed --num_gpus 2 --module mpma_ds.cli.pretrain --config pretrain_tiny
                                     (2 CPU processes on gloo; on a GPU machine, its GPUs)
6. export                            python launch/export.py
7. evaluation of the pretrained model AND of a randomly initialised twin on the validation split
8. the supervised bound of the zero-shot AUROC: the same image encoder at the same budget trained on the truth
   labels (python launch/finetune.py --config finetune_cls_tiny --set task.cls.labels=truth ...), measured once
   per corpus, encoder and budget and cached (mpma_ds.runner.supervised_bound)
9. downstream, pretrained AND random twin: linear-probe CheXpert AUROC at 1 %, 10 %, 100 % of the labels
   (python launch/finetune.py --config launch/configs/finetune_linear_probe_tiny.yaml) and VQA on the synthetic
   VQA-RAD set with the backbone frozen (... finetune_vqa_frozen_tiny.yaml), features extracted once per model
   and cached; run in this process, as launch/finetune.py would
10. the tables (retrieval / zero-shot; the label-efficiency table), the targets and whether each holds
   (mpma_ds.runner.targets), results.json, everything in MLflow, the
   comparison report (report/report.html, as launch/compare_runs.py writes it) and the `mlflow ui` line.

Reruns reuse finished stages (each stage records what it was run with); an interrupted pretraining resumes
from its newest checkpoint. ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mpma_ds.distributed import free_port
from mpma_ds.eval.grounding import BEST_MAP, pointing_game_summary, shards_have_truth, write_overlays
from mpma_ds.eval.prior_maps import NEUTRAL_PHRASES
from mpma_ds.fileio import atomic_write_text
from mpma_ds.recipes import find_recipe
from mpma_ds.runner.evaluate import TABLE_ROWS, run_evaluation
from mpma_ds.runner.export import ExportError, export_checkpoint, load_run_recipe
from mpma_ds.runner.supervised_bound import bound_inputs, bound_key, supervised_bound
from mpma_ds.runner.targets import demo_targets
from mpma_ds.runner.trainer import PREDICTIONS_FILE, train
from mpma_ds.tasks.registry import task_class
from mpma_ds.tracking.pairs import paired_interval
from mpma_ds.tracking.params import json_safe
from mpma_ds.tracking.report import write_report as write_comparison
from mpma_ds.training.recipe import RECIPE_FILE, FinetuneRecipe, load_recipe, recipe_to_dict

EXPERIMENT = "mpma-demo"
STAGES = 9
FRACTIONS = "0.01,0.1,1.0"  # linear-probe label fractions (the Med-VLP label-efficiency protocol)
INITS = ("pretrained", "random")
RESULTS_FILE = "results.json"
MEASURE_BOUND = "make demo-bound"  # the demo with --measure-bound
# VQA with the backbone frozen and the fused features cached: full M3AE fine-tuning (finetune_vqa_tiny.yaml)
# needs tens of epochs, which do not fit the demo's 15 minutes on 2 cores; the frozen protocol measures what
# pretraining bought the fused representation at a fraction of the cost.
VQA_RECIPE = "finetune_vqa_frozen_tiny"
# a label counts in the linear probe's test macro AUROC with >= this many positives and negatives (default of
# --min-label-count): one with 3 moves the mean by chance, not by skill
LP_MIN_LABEL_COUNT = 10
# The validation split holds >= MIN_VALIDATION_IMAGES frontal films (one per study) at the default --studies and
# --eval-fraction: below that the zero-shot AUROC's labels fall under their 20 positives / negatives and the R@1
# intervals are wider than the pretrained - random gap. 2500 studies, 22 % of the patients in each of validate
# and test: 547 validation images at seed 0 (tests/test_eval_protocol.py plans the default corpus and counts
# them), where all 14 labels have >= 20 positives (the rarest, Fracture and Pleural Other: 23 and 24).
MIN_VALIDATION_IMAGES = 500
DEFAULT_STUDIES = 2500
DEFAULT_EVAL_FRACTION = 0.22
# pretrain_eval in results.json: (key written, metric key) — each {pretrained, random, ci95_pretrained, ci95_random}
PRETRAIN_EVAL_KEYS: tuple[tuple[str, str], ...] = (
    ("zero_shot_auroc", "zeroshot_auroc_mean"),
    *((key, key) for key, _ in TABLE_ROWS if key != "zeroshot_auroc_mean"),
)
# overlays of finding-phrase maps written per model (and side by side, pretrained | random, in eval/grounding/)
# when the shards carry ground truth
GROUNDING_OVERLAYS = 6


class DemoError(RuntimeError):
    """A stage failed; the message says which and where its log is."""


class Demo:
    """Runs the stages under ``out``, skipping those already finished with the same settings."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.logs = self.out / "logs"
        self.marks = self.out / ".stages"
        self.python = sys.executable
        self.tracking_uri = "sqlite:///" + str(self.out / "mlflow.db")
        self.n_stage = 0

    # -- plumbing ------------------------------------------------------------------------------------------
    def stage(
        self,
        name: str,
        title: str,
        settings: dict[str, Any],
        run: Callable[[], Any],
        outputs: tuple[str, ...] = (),
        resumable: bool = True,
    ) -> Any:
        """Run ``run`` unless a marker records the same ``settings`` as finished; returns what it returned.

        A stage that finished with other settings has its ``outputs`` (folders under ``out``) deleted first;
        one that never finished keeps them when it is ``resumable`` (an interrupted pretraining resumes from its
        checkpoints), else they go too (the downstream runs start over: an earlier run's checkpoints in a run
        folder would be taken for the new run's).
        """
        self.n_stage += 1
        mark = self.marks / f"{name}.json"
        prefix = f"[{self.n_stage}/{STAGES}] {title}"
        if mark.is_file():
            saved = json.loads(mark.read_text())
            if saved.get("settings") == settings:
                print(f"{prefix}: reused ({mark.relative_to(self.out)})", flush=True)
                return saved.get("result")
            mark.unlink()
            resumable = False
        if not resumable:
            for folder in outputs:
                shutil.rmtree(self.out / folder, ignore_errors=True)
        print(f"{prefix} ...", flush=True)
        start = time.monotonic()
        result = run()
        self.marks.mkdir(parents=True, exist_ok=True)
        atomic_write_text(mark, json.dumps({"settings": settings, "result": result}, indent=1, default=str))
        print(f"{prefix}: done in {time.monotonic() - start:.0f} s", flush=True)
        return result

    def command(self, name: str, cmd: list[str], *, env: dict[str, str] | None = None) -> None:
        """Run ``cmd`` with its output in ``logs/<name>.log``; a failure raises with the log's tail."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "w", encoding="utf-8") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        if res.returncode != 0:
            raise DemoError(f"{name} failed (exit {res.returncode}); log: {log}\n" + _tail(log))

    # -- stages ------------------------------------------------------------------------------------------------
    def corpus(self) -> None:
        dest = self.out / "corpus"
        shutil.rmtree(dest, ignore_errors=True)
        self.command(
            "synth_corpus",
            [
                self.python,
                "-m",
                "data_tools.synth_corpus",
                "--out",
                str(dest),
                "--studies",
                str(self.args.studies),
                "--seed",
                str(self.args.seed),
                # films a little over the shard size: rendering is most of this stage
                "--min-size",
                str(2 * self.args.image_size),
                "--max-size",
                str(2 * self.args.image_size + 64),
                "--eval-fraction",
                str(self.args.eval_fraction),
                "--workers",
                "2",
            ],
        )

    def shards(self) -> dict[str, Any]:
        self.command(
            "build_shards",
            [
                self.python,
                "-m",
                "data_tools.build_shards",
                "--format",
                "mimic-cxr",
                "--input",
                str(self.out / "corpus"),
                "--output",
                str(self.out / "shards"),
                "--image-size",
                str(self.args.image_size),
                "--workers",
                "2",
                "--no-progress",
            ],
        )
        manifest = json.loads((self.out / "shards" / "manifest.json").read_text())
        return {"counts": manifest.get("counts")}

    def tokenizer(self) -> None:
        # --overwrite: a rerun of this stage replaces what an interrupted run left in the folder
        self.command(
            "train_tokenizer",
            [
                self.python,
                "-m",
                "data_tools.train_tokenizer",
                "--shards",
                str(self.out / "shards"),
                "--out",
                str(self.out / "tokenizer"),
                "--vocab-size",
                "4096",
                "--overwrite",
            ],
        )

    def pretrain_overrides(self) -> list[str]:
        steps = self.args.steps
        every = max(1, min(200, steps))
        return [
            f"data.train_shards={self.out / 'shards' / 'train'}",
            f"data.val_shards={self.out / 'shards' / 'validate'}",
            f"data.tokenizer={self.out / 'tokenizer'}",
            f"train.output_dir={self.out / 'pretrain'}",
            f"train.max_steps={steps}",
            f"train.warmup_steps={max(1, min(30, steps // 10))}",
            f"train.save_every={every}",
            # one validation pass, at the end: every rank runs all of it (16 s at 547 images, about 23 steps'
            # worth), and stage 7 evaluates the exported model on the same split anyway
            f"train.eval_every={steps}",
            f"tracking.uri={self.tracking_uri}",
            f"tracking.experiment={EXPERIMENT}",
            "tracking.run_name=demo-pretrain",
        ]

    def pretrain_settings(self, data: dict[str, Any]) -> dict[str, Any]:
        """The pretraining stage's settings: the corpus's ``data``, the ranks, the overrides and the recipe it runs,
        resolved (``pretrain_tiny`` + the overrides, every default filled in) as JSON reads it back, so an edited
        recipe or a changed default pretrains again."""
        overrides = self.pretrain_overrides()
        recipe = load_recipe(find_recipe("pretrain_tiny"), overrides, check_files=False)
        resolved = json.loads(json.dumps(recipe_to_dict(recipe), default=str))
        return {"overrides": overrides, "recipe": resolved, "ranks": self.args.num_gpus, **data}

    def launch(
        self,
        name: str,
        module: str,
        config: str,
        overrides: list[str],
        run_dir: Path,
        total: int,
        extra: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """``deepspeed --num_gpus N --module <module> --config <config> --set ...`` (what ``deepspeed
        launch/pretrain.py`` runs) with a progress bar read from the run's metrics.jsonl; returns its
        summary.json."""
        summary_file = run_dir / "summary.json"
        summary_file.unlink(missing_ok=True)
        cmd = [
            str(Path(self.python).with_name("deepspeed")),
            "--num_gpus",
            str(self.args.num_gpus),
            "--master_port",
            str(free_port()),
            "--module",
            module,
            "--config",
            config,
            *extra,
        ]
        for item in overrides:
            cmd += ["--set", item]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")  # one core per CPU rank: oversubscription slows both
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "w", encoding="utf-8") as fh, tqdm(total=total, desc=name, unit="step") as bar:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
            while proc.poll() is None:
                time.sleep(2)
                step, loss = _latest_step(run_dir / "metrics.jsonl")
                if step > bar.n:
                    bar.update(min(step, total) - bar.n)
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.3f}")
        if proc.returncode != 0 or not summary_file.is_file():
            raise DemoError(f"{name} failed (exit {proc.returncode}); log: {log}\n" + _tail(log))
        return json.loads(summary_file.read_text())

    def pretrain(self) -> dict[str, Any]:
        summary = self.launch(
            "pretraining",
            "mpma_ds.cli.pretrain",
            "pretrain_tiny",
            self.pretrain_overrides(),
            self.out / "pretrain",
            self.args.steps,
            ("--resume", "auto"),
        )
        return {
            "step": summary.get("step"),
            "samples_per_s": summary.get("samples_per_s"),
            "mlflow_run_id": summary.get("mlflow_run_id"),
        }

    def vqa_set(self) -> dict[str, Any]:
        dest, shards = self.out / "vqa", self.out / "vqa_shards"
        shutil.rmtree(dest, ignore_errors=True)
        self.command(
            "synth_vqa",
            [
                self.python,
                "-m",
                "data_tools.synth_vqa",
                "--corpus",
                str(self.out / "corpus"),
                "--out",
                str(dest),
                "--seed",
                str(self.args.seed),
                "--image-size",
                str(2 * self.args.image_size),
                "--questions-per-image",
                str(self.args.vqa_questions),
            ],
        )
        self.command(
            "build_vqa_shards",
            [
                self.python,
                "-m",
                "data_tools.build_shards",
                "--format",
                "vqa-rad",
                "--input",
                str(dest),
                "--output",
                str(shards),
                "--image-size",
                str(self.args.image_size),
                "--workers",
                "2",
                "--no-progress",
            ],
        )
        return {"counts": json.loads((shards / "manifest.json").read_text()).get("counts")}

    # -- downstream --------------------------------------------------------------------------------------------
    def finetune_overrides(self, task: str, init: str, tag: str, shards: str) -> list[str]:
        split = self.out / shards
        return [
            f"init.from={self.out / 'exported' if init == 'pretrained' else 'random'}",
            f"data.train_shards={split / 'train'}",
            f"data.val_shards={split / 'validate'}",
            f"data.test_shards={split / 'test'}",
            f"data.tokenizer={self.out / 'tokenizer'}",
            f"data.image_size={self.args.image_size}",
            f"train.output_dir={self.out / 'finetune' / tag}",
            f"tracking.uri={self.tracking_uri}",
            f"tracking.experiment={EXPERIMENT}",
            f"tracking.run_name=demo-{tag}",
        ]

    def finetune_in_process(self, recipe_name: str, tag: str, overrides: list[str]) -> dict[str, Any]:
        """One fine-tuning run in this process, its output in ``logs/finetune-<tag>.log``; what
        ``python launch/finetune.py --config <recipe> --set ...`` runs (no interpreter start, no launcher: the
        heads on cached features take seconds, a launcher's start-up would cost more than the training)."""
        log = self.logs / f"finetune-{tag}.log"
        try:
            with output_to(log):
                recipe = load_recipe(find_recipe(recipe_name), overrides, cls=FinetuneRecipe)
                return train(recipe)
        except Exception as err:
            raise DemoError(f"fine-tuning {tag} failed: {err}; log: {log}") from err

    def linear_probe(self, init: str, fraction: str) -> dict[str, Any]:
        tag = f"linear_probe-{init}-{fraction}"
        overrides = self.finetune_overrides("linear_probe", init, tag, "shards")
        overrides += [
            f"data.label_fraction={fraction}",
            f"task.linear_probe.cache_dir={self.out / 'feature_cache'}",
            f"task.cls.min_label_count={self.args.min_label_count}",
        ]
        return self.finetune_in_process("finetune_linear_probe_tiny", tag, overrides)

    def vqa(self, init: str) -> dict[str, Any]:
        tag = f"vqa-{init}"
        overrides = self.finetune_overrides("vqa", init, tag, "vqa_shards")
        overrides.append(f"task.vqa.cache_dir={self.out / 'feature_cache'}")
        return self.finetune_in_process(VQA_RECIPE, tag, overrides)

    def downstream(self) -> dict[str, Any]:
        """Linear probe at each label fraction and VQA, for the pretrained model and its random twin; each
        pretrained - random difference with a paired bootstrap interval over the same test samples."""
        fractions = self.args.label_fractions
        out: dict[str, Any] = {"linear_probe": {f: {} for f in fractions}, "vqa": {}, "runs": {}}
        for init in INITS:
            for fraction in fractions:
                summary = self.linear_probe(init, fraction)
                test = summary.get("test") or {}
                entry = out["linear_probe"][fraction]
                entry[init] = test.get("test/auroc_macro")
                entry[f"{init}_ci95"] = test.get("test/auroc_macro_ci95")
                entry[f"{init}_subset"] = summary.get("subset")
                out["runs"][f"linear_probe-{init}-{fraction}"] = summary.get("mlflow_run_id")
                print(
                    f"      linear probe {init:<10} {float(fraction):>5.0%} labels: test AUROC "
                    f"{_fmt(entry[init])}",
                    flush=True,
                )
        for fraction in fractions:
            out["linear_probe"][fraction].update(self.paired("linear_probe", fraction, "auroc_macro"))
        for init in INITS:
            summary = self.vqa(init)
            test = summary.get("test") or {}
            for kind in ("overall", "closed", "open"):
                entry = out["vqa"].setdefault(kind, {})
                entry[init] = test.get(f"test/accuracy_{kind}")
                entry[f"{init}_ci95"] = test.get(f"test/accuracy_{kind}_ci95")
            out["vqa"]["questions"] = test.get("test/questions")
            out["vqa"]["unseen_answers"] = test.get("test/unseen_answers")
            out["runs"][f"vqa-{init}"] = summary.get("mlflow_run_id")
            print(
                f"      VQA {init:<10} test accuracy {_fmt(test.get('test/accuracy_overall'))} (CLOSED "
                f"{_fmt(test.get('test/accuracy_closed'))}, OPEN {_fmt(test.get('test/accuracy_open'))})",
                flush=True,
            )
        for kind in ("overall", "closed", "open"):
            out["vqa"][kind].update(self.paired("vqa", None, f"accuracy_{kind}"))
        return out

    def paired(self, task: str, fraction: str | None, metric: str) -> dict[str, Any]:
        """``difference`` (pretrained - random) of ``metric`` and its paired bootstrap 95 % interval, from the
        two runs' ``test_predictions.pt`` (the same test samples, aligned by key): ``tracking.pairs``'s, as the
        comparison report computes it; ``None`` where the difference is undefined (a label without both
        classes in every resample)."""
        tags = [f"{task}-{init}" + (f"-{fraction}" if fraction else "") for init in INITS]
        pre, rnd = (torch.load(self.out / "finetune" / t / PREDICTIONS_FILE, weights_only=True) for t in tags)
        if pre["keys"] != rnd["keys"]:
            raise DemoError(f"{tags[0]} and {tags[1]} were tested on different samples")
        if task == "vqa" and pre["answer_vocab"] != rnd["answer_vocab"]:
            raise DemoError("the two VQA runs have different answer sets")
        params = {"task.cls.min_label_count": str(self.args.min_label_count)}
        found = paired_interval(task_class(task).pairing, f"test/{metric}", pre, rnd, params=params)
        difference, ci = found if found else (None, None)
        return {"difference": difference, "difference_ci95": ci}

    def export(self) -> None:
        # what `python launch/export.py --checkpoint pretrain --out exported --overwrite` runs, in this process
        # (one interpreter start fewer; the evaluation below needs the same imports)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / "export.log"
        try:
            with output_to(log):
                export_checkpoint(self.out / "pretrain", self.out / "exported", overwrite=True)
        except ExportError as err:
            raise DemoError(f"export failed: {err}; log: {log}") from err

    def evaluate(self) -> dict[str, dict[str, float]]:
        grounding = GROUNDING_OVERLAYS if shards_have_truth(self.out / "shards" / "validate") else None
        common = dict(
            shards=self.out / "shards",
            split="validate",
            tracking_uri=self.tracking_uri,
            experiment=EXPERIMENT,
            batch_size=32,
            min_count=self.args.zero_shot_min_count,
            n_resamples=1000,
            grounding=grounding,
            grounding_map=BEST_MAP,
        )
        pre = run_evaluation(
            model=self.out / "exported", out_dir=self.out / "eval" / "pretrained", name="pretrained", **common
        )
        rnd = run_evaluation(
            random_init="mpma_tiny",
            recipe=self.out / "pretrain" / "recipe.yaml",
            tokenizer=self.out / "tokenizer",
            seed=self.args.seed,
            out_dir=self.out / "eval" / "random-init",
            name="random-init",
            **common,
        )
        if grounding is not None:  # the same pairs from both models, side by side
            write_overlays(
                self.out / "eval" / "grounding",
                {"pretrained": pre["grounding_examples"], "random": rnd["grounding_examples"]},
                map=pre["metrics"].get("grounding_map"),
            )
        return {"pretrained": pre["metrics"], "random-init": rnd["metrics"]}

    def bound_recipe(self):
        """The pretraining recipe as it ran (its encoder and budget are what the bound holds equal)."""
        return load_run_recipe(self.out / "pretrain" / RECIPE_FILE)

    def bound_settings(self) -> dict[str, Any]:
        return {
            "key": bound_key(
                bound_inputs(self.out / "shards", self.bound_recipe(), self.args.zero_shot_min_count)
            ),
            "measure": self.args.measure_bound,
        }

    def supervised_bound(self) -> dict[str, Any]:
        """The zero-shot AUROC's supervised bound (`runner.supervised_bound`): read from its cache, else — with
        ``--measure-bound`` — measured in this process (output in ``logs/supervised_bound.log``) and cached, or left
        unknown (measuring it adds about 100 s on 2 CPU cores: the demo would end at the edge of 15 minutes)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / "supervised_bound.log"
        tracking = [f"tracking.uri={self.tracking_uri}", f"tracking.experiment={EXPERIMENT}",
                    "tracking.run_name=demo-supervised-bound"]  # fmt: skip
        try:
            with output_to(log):
                found = supervised_bound(
                    self.out / "shards",
                    self.out / "tokenizer",
                    self.bound_recipe(),
                    out_dir=self.out / "supervised_bound",
                    min_count=self.args.zero_shot_min_count,
                    cache_dir=self.args.bound_cache,
                    tracking=tracking,
                    measure=self.args.measure_bound,
                )
        except Exception as err:
            raise DemoError(f"the supervised bound failed: {err}; log: {log}") from err
        if not found["measured"]:
            print(f"      supervised bound: not cached for this corpus and budget; `{MEASURE_BOUND}` measures it "
                  "once (about 100 s on 2 CPU cores) and caches it", flush=True)  # fmt: skip
            return {k: v for k, v in found.items() if k != "inputs"}
        how = (
            f"cached {found['measured_at']} ({found['cache_file']})" if found["cached"] else "measured and cached"
        )
        print(f"      supervised bound: validation AUROC {_fmt(found['auroc'])}, {how}", flush=True)
        return {k: v for k, v in found.items() if k != "inputs"}

    # -- the whole thing ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, dict[str, float]]:
        a = self.args
        if a.fresh and self.out.exists():
            if not (self.marks.is_dir() or self.logs.is_dir()) and any(self.out.iterdir()):
                raise DemoError(  # not a demo's work folder: never delete it
                    f"--fresh deletes --out {self.out}, which holds files but no {self.marks.name}/ or "
                    f"{self.logs.name}/ (it is not a demo's work folder); choose another --out"
                )
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"studies": a.studies, "seed": a.seed, "image_size": a.image_size, "eval": a.eval_fraction}
        self.stage("corpus", f"synthetic corpus ({a.studies} studies)", data, self.corpus, ("corpus",))
        counts = self.stage("shards", "shards", data, self.shards, ("shards",))
        print(f"      samples per split: {counts['counts']}", flush=True)
        self.stage("tokenizer", "tokenizer", data, self.tokenizer, ("tokenizer",))
        vqa = self.stage(
            "vqa_set",
            "synthetic VQA-RAD set + VQA shards",
            {**data, "questions": a.vqa_questions},
            self.vqa_set,
            ("vqa", "vqa_shards"),
        )
        print(f"      questions per split: {vqa['counts']}", flush=True)
        pre = self.stage(
            "pretrain",
            f"pretraining mpma_tiny, {a.steps} steps on {a.num_gpus} ranks (ZeRO-3)",
            self.pretrain_settings(data),
            self.pretrain,
            ("pretrain",),
        )
        self.stage("export", "export", {"pretrain": pre}, self.export, ("exported",))
        results = self.stage(
            "evaluate",
            "evaluation: pretrained vs random twin",
            {
                "pretrain": pre,
                "zero_shot_min_count": a.zero_shot_min_count,
                "grounding": GROUNDING_OVERLAYS,
                "map": BEST_MAP,
                "neutral": list(NEUTRAL_PHRASES),  # what similarity_neutral takes off: another set re-scores
            },  # fmt: skip
            self.evaluate,
            ("eval",),
        )
        bound = self.stage(
            "supervised_bound",
            "supervised bound: the image encoder trained on the truth at the same budget",
            self.bound_settings(),
            self.supervised_bound,
            ("supervised_bound",),
            resumable=False,
        )
        down = self.stage(
            "downstream",
            "downstream: linear probe at 1/10/100 % labels and VQA, pretrained vs random",
            {"pretrain": pre, "vqa": vqa, "fractions": a.label_fractions, "min_label_count": a.min_label_count},
            self.downstream,
            ("finetune", "feature_cache"),
            resumable=False,
        )
        return {"pretrain_eval": results, "supervised_bound": bound, **down}


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr to ``log`` for a stage run in process — at the file-descriptor
    level, so what compilers and C extensions print (DeepSpeed probes its ops at start-up) goes there too."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w", encoding="utf-8") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _latest_step(path: Path) -> tuple[int, float | None]:
    """Newest step (and loss) in a metrics.jsonl being written."""
    if not path.is_file():
        return 0, None
    step, loss = 0, None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()[-20:]
    except OSError:
        return 0, None
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            step = max(step, int(rec["step"]))
            loss = rec.get("loss", loss)
    return step, loss


def _tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join("    " + ln for ln in text[-lines:])


def pretrain_eval_block(
    pre: dict[str, Any], rnd: dict[str, Any], bound: dict[str, Any] | None = None
) -> dict[str, Any]:
    """results.json's ``pretrain_eval``: ``{key: {"pretrained", "random", "ci95_pretrained", "ci95_random"}}`` for
    ``zero_shot_auroc`` (with ``"supervised_bound"``, ``"ci95_supervised_bound"`` from ``bound``, the
    `runner.supervised_bound` result) and every retrieval metric of the table (``i2t_R@10``,
    ``i2t_R@1_abnormal`` ...), then the evaluation's size and the zero-shot labels left out of each model's mean
    (``zero_shot_labels_left_out``)."""
    block: dict[str, Any] = {}
    for out_key, key in PRETRAIN_EVAL_KEYS:
        block[out_key] = {
            "pretrained": pre.get(key),
            "random": rnd.get(key),
            "ci95_pretrained": pre.get(f"{key}_ci95"),
            "ci95_random": rnd.get(f"{key}_ci95"),
        }
    block["zero_shot_auroc"]["supervised_bound"] = (bound or {}).get("auroc")
    block["zero_shot_auroc"]["ci95_supervised_bound"] = (bound or {}).get("ci95")
    block["zero_shot_labels_left_out"] = pre.get("zeroshot_labels_left_out")
    block["zero_shot_reference"] = pre.get("zeroshot_reference")
    for key in ("eval_samples", "retrieval_pairs", "retrieval_abnormal_images"):
        block[key] = pre.get(key)
    return block


def results_payload(results: dict[str, Any]) -> dict[str, Any]:
    """What results.json holds: ``pretrain_eval`` (`pretrain_eval_block`, with ``pointing_game``: {pretrained,
    random, ci95_*, chance, map}), ``supervised_bound`` (the measurement and its cache entry), ``linear_probe``
    ({fraction: {pretrained, random, *_ci95, *_subset, difference, difference_ci95}}), ``vqa``
    ({overall|closed|open: {...}}), ``targets`` (`runner.targets.demo_targets`: each target's verdict) and
    ``runs``."""
    evals = results["pretrain_eval"]
    table = pretrain_eval_block(evals["pretrained"], evals["random-init"], results.get("supervised_bound"))
    table["pointing_game"] = pointing_game_summary(evals["pretrained"], evals["random-init"])  # None: no truth
    payload = {
        "pretrain_eval": table,
        "supervised_bound": results.get("supervised_bound"),
        "linear_probe": results["linear_probe"],
        "vqa": results["vqa"],
        "runs": results["runs"],
    }
    payload = json_safe(payload)  # NaN -> null before the verdicts read it
    payload["targets"] = demo_targets(payload)
    return payload


def write_results(demo: Demo, payload: dict[str, Any]) -> Path:
    """``<out>/results.json`` (`results_payload`)."""
    return atomic_write_text(demo.out / RESULTS_FILE, json.dumps(json_safe(payload), indent=1, default=str) + "\n")


def write_report(demo: Demo) -> Path:
    """``<out>/report/report.html`` (+ PNGs, CSV / JSON): what ``launch/compare_runs.py`` writes for the demo's
    experiment."""
    return write_comparison(EXPERIMENT, demo.out / "report", tracking_uri=demo.tracking_uri).html


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"
