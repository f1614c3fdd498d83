"""``make demo``: the whole product on a laptop-sized synthetic corpus, end to end.

    python launch/demo.py [--out demo_runs] [--studies N] [--steps N]        (what `make demo` runs)

1. synthetic MIMIC-CXR-JPG corpus     python -m data_tools.synth_corpus
2. WebDataset shards (+ DALI index)  python -m data_tools.build_shards
3. WordPiece tokenizer               python -m data_tools.train_tokenizer
4. pretraining, ZeRO-3               deepspeed --num_gpus 2 launch/pretrain.py --config launch/configs/pretrain_tiny.yaml
                                     (2 CPU processes on gloo; on a GPU machine, its GPUs)
5. export                            python launch/export.py
6. evaluation of the pretrained model AND of a randomly initialised twin on the validation split
7. a table (retrieval R@1/5/10 both ways, zero-shot AUROC), everything in MLflow, and the `mlflow ui` line.

Reruns reuse finished stages (each stage records what it was run with); an interrupted pretraining resumes
from its newest checkpoint. ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpma_ds.training.distributed import free_port

LAUNCH = Path(__file__).resolve().parent  # the launch/ scripts beside this one
REPO = LAUNCH.parent
EXPERIMENT = "mpma-demo"


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
    ) -> Any:
        """Run ``run`` unless a marker records the same ``settings`` as finished; returns what it returned.

        A stage that finished with other settings has its ``outputs`` (folders under ``out``) deleted first;
        one that never finished keeps them (an interrupted pretraining resumes from its checkpoints).
        """
        self.n_stage += 1
        mark = self.marks / f"{name}.json"
        prefix = f"[{self.n_stage}/7] {title}"
        if mark.is_file():
            saved = json.loads(mark.read_text())
            if saved.get("settings") == settings:
                print(f"{prefix}: reused ({mark.relative_to(self.out)})", flush=True)
                return saved.get("result")
            mark.unlink()
            for folder in outputs:
                shutil.rmtree(self.out / folder, ignore_errors=True)
        print(f"{prefix} ...", flush=True)
        start = time.monotonic()
        result = run()
        self.marks.mkdir(parents=True, exist_ok=True)
        mark.write_text(json.dumps({"settings": settings, "result": result}, indent=1, default=str))
        print(f"{prefix}: done in {time.monotonic() - start:.0f} s", flush=True)
        return result

    def command(self, name: str, cmd: list[str], *, env: dict[str, str] | None = None) -> None:
        """Run ``cmd`` with its output in ``logs/<name>.log``; a failure raises with the log's tail."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "w", encoding="utf-8") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            res = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
        if res.returncode != 0:
            raise DemoError(f"{name} failed (exit {res.returncode}); log: {log}\n" + _tail(log))

    # -- stages ------------------------------------------------------------------------------------------------
    def corpus(self) -> None:
        dest = self.out / "corpus"
        shutil.rmtree(dest, ignore_errors=True)
        self.command("synth_corpus", [self.python, "-m", "data_tools.synth_corpus", "--out", str(dest),
                                      "--studies", str(self.args.studies), "--seed", str(self.args.seed),
                                      # films a little over the shard size: rendering is most of this stage
                                      "--min-size", str(2 * self.args.image_size),
                                      "--max-size", str(2 * self.args.image_size + 64),
                                      "--workers", "2"])  # fmt: skip

    def shards(self) -> dict[str, Any]:
        self.command("build_shards", [self.python, "-m", "data_tools.build_shards", "--format", "mimic-cxr",
                                      "--input", str(self.out / "corpus"), "--output", str(self.out / "shards"),
                                      "--image-size", str(self.args.image_size), "--workers", "2",
                                      "--no-progress"])  # fmt: skip
        manifest = json.loads((self.out / "shards" / "manifest.json").read_text())
        return {"counts": manifest.get("counts")}

    def tokenizer(self) -> None:
        self.command("train_tokenizer", [self.python, "-m", "data_tools.train_tokenizer", "--shards",
                                         str(self.out / "shards"), "--out", str(self.out / "tokenizer"),
                                         "--vocab-size", "4096"])  # fmt: skip

    def pretrain_overrides(self) -> list[str]:
        steps = self.args.steps
        every = max(1, min(100, steps))
        return [
            f"data.train_shards={self.out / 'shards' / 'train'}",
            f"data.val_shards={self.out / 'shards' / 'validate'}",
            f"data.tokenizer={self.out / 'tokenizer'}",
            f"train.output_dir={self.out / 'pretrain'}",
            f"train.max_steps={steps}",
            f"train.warmup_steps={max(1, min(30, steps // 10))}",
            f"train.save_every={every}",
            f"train.eval_every={every}",
            f"tracking.uri={self.tracking_uri}",
            f"tracking.experiment={EXPERIMENT}",
            "tracking.run_name=demo-pretrain",
        ]

    def pretrain(self) -> dict[str, Any]:
        run_dir = self.out / "pretrain"
        summary_file = run_dir / "summary.json"
        summary_file.unlink(missing_ok=True)
        ranks = self.args.num_gpus
        cmd = [str(Path(self.python).with_name("deepspeed")), "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(LAUNCH / "pretrain.py"), "--config", "pretrain_tiny",
               "--resume", "auto"]  # fmt: skip
        for item in self.pretrain_overrides():
            cmd += ["--set", item]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")  # one core per CPU rank: oversubscription slows both
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / "pretrain.log"
        from tqdm import tqdm

        with (
            open(log, "w", encoding="utf-8") as fh,
            tqdm(total=self.args.steps, desc="pretraining", unit="step") as bar,
        ):
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
            while proc.poll() is None:
                time.sleep(2)
                step, loss = _latest_step(run_dir / "metrics.jsonl")
                if step > bar.n:
                    bar.update(step - bar.n)
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.3f}")
        if proc.returncode != 0 or not summary_file.is_file():
            raise DemoError(f"pretraining failed (exit {proc.returncode}); log: {log}\n" + _tail(log))
        summary = json.loads(summary_file.read_text())
        return {"step": summary.get("step"), "samples_per_s": summary.get("samples_per_s"),
                "mlflow_run_id": summary.get("mlflow_run_id")}  # fmt: skip

    def export(self) -> None:
        # what `python launch/export.py --checkpoint pretrain --out exported --overwrite` runs, in this process
        # (one interpreter start fewer; the evaluation below needs the same imports)
        import contextlib

        from mpma_ds.export import ExportError, export_checkpoint

        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / "export.log"
        try:
            with (
                open(log, "w", encoding="utf-8") as fh,
                contextlib.redirect_stdout(fh),
                contextlib.redirect_stderr(fh),
            ):
                export_checkpoint(self.out / "pretrain", self.out / "exported", overwrite=True)
        except ExportError as err:
            raise DemoError(f"export failed: {err}; log: {log}") from err

    def evaluate(self) -> dict[str, dict[str, float]]:
        from mpma_ds.eval.split_eval import run_evaluation

        common = dict(shards=self.out / "shards", split="validate", tracking_uri=self.tracking_uri,
                      experiment=EXPERIMENT, batch_size=32)  # fmt: skip
        pre = run_evaluation(model=self.out / "exported", out_dir=self.out / "eval" / "pretrained",
                             name="pretrained", **common)  # fmt: skip
        rnd = run_evaluation(random_init="mpma_tiny", recipe=self.out / "pretrain" / "recipe.yaml",
                             tokenizer=self.out / "tokenizer", seed=self.args.seed,
                             out_dir=self.out / "eval" / "random-init", name="random-init", **common)  # fmt: skip
        return {"pretrained": pre["metrics"], "random-init": rnd["metrics"]}

    # -- the whole thing ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, dict[str, float]]:
        a = self.args
        if a.fresh and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage("corpus", f"synthetic corpus ({a.studies} studies)",
                   {"studies": a.studies, "seed": a.seed, "image_size": a.image_size},
                   self.corpus, ("corpus",))  # fmt: skip
        counts = self.stage("shards", "shards", {"image_size": a.image_size, "studies": a.studies, "seed": a.seed},
                            self.shards, ("shards",))  # fmt: skip
        print(f"      samples per split: {counts['counts']}", flush=True)
        self.stage("tokenizer", "tokenizer", {"studies": a.studies, "seed": a.seed, "image_size": a.image_size},
                   self.tokenizer, ("tokenizer",))  # fmt: skip
        pre = self.stage("pretrain", f"pretraining mpma_tiny, {a.steps} steps on {a.num_gpus} ranks (ZeRO-3)",
                         {"overrides": self.pretrain_overrides(), "ranks": a.num_gpus, "studies": a.studies,
                          "seed": a.seed, "image_size": a.image_size},
                         self.pretrain, ("pretrain",))  # fmt: skip
        self.stage("export", "export", {"pretrain": pre}, self.export, ("exported",))
        results = self.stage("evaluate", "evaluation: pretrained vs random twin", {"pretrain": pre}, self.evaluate,
                             ("eval",))  # fmt: skip
        return results


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


def _default_ranks() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python launch/demo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="demo_runs", help="working folder (default: demo_runs)")
    p.add_argument("--studies", type=int, default=1500, help="synthetic studies (default: 1500)")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps (default: 300)")
    p.add_argument("--image-size", type=int, default=128, help="stored image size in px (default: 128)")
    p.add_argument("--num-gpus", type=int, default=None,
                   help="ranks for deepspeed --num_gpus (default: the GPUs, else 2 CPU processes)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="delete --out first and redo every stage")
    args = p.parse_args(argv)
    for name in ("studies", "steps", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_gpus is None:
        args.num_gpus = _default_ranks()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    demo = Demo(args)
    try:
        results = demo.run()
    except DemoError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted; run it again to continue where it stopped", file=sys.stderr)
        return 130
    from mpma_ds.eval.split_eval import format_table

    pre, rnd = results["pretrained"], results["random-init"]
    keys = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "zeroshot_auroc_mean")
    better = sum(1 for k in keys if pre.get(k, 0) > rnd.get(k, 0))
    print()
    print(f"validation split, {int(pre.get('eval_samples', 0))} images, {int(pre.get('retrieval_pairs', 0))} "
          "distinct reports (R@K: fraction of queries whose match ranks in the top K)")  # fmt: skip
    print(format_table(results))
    print(f"\npretrained beats the random twin on {better} of {len(keys)} metrics")
    print(f"\nwork folder:   {demo.out}  (logs in {demo.logs})")
    print(f"exported model: {demo.out / 'exported'}")
    print(f"MLflow:        mlflow ui --backend-store-uri {demo.tracking_uri}   (experiment {EXPERIMENT!r})")
    print(f"compare runs:  python launch/compare_runs.py --experiment {EXPERIMENT} "
          f"--tracking-uri {demo.tracking_uri}")  # fmt: skip
    print(f"total {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
