"""How fast does MPMA learn image-report alignment under each GLA setting, and what does MA-CMF's memory buy?
(one process, CPU or GPU)

Trains `mpma_tiny` from scratch for `--steps` AdamW steps on built shards (e.g. the demo's) once per
variant, then evaluates retrieval R@K, zero-shot CheXpert AUROC and masked-token accuracy (overall and on
finding words, `mpma_ds.eval.mlm`) on the validation split. The first variant is the baseline of the table.

    python benchmarks/bench_alignment.py --shards demo_runs/shards --tokenizer demo_runs/tokenizer
    python benchmarks/bench_alignment.py --ablation memory --studies 600 --steps 150

`--ablation gla` (default) compares pooling / alignment pass ([CLS] pooling on the masked pass, M3AE's
setting, is the baseline). `--ablation memory` trains the demo's setting (mean pooling, alignment on the
full pass) with MA-CMF's memory and without it (`memory_slots: 0`): the same initial weights for every
shared parameter, the same batches, image masks and dropout draws, so the memory is the only difference.
`--ablation stem` trains the same setting with the ViT's linear patch projection and with the convolutional
stem (`patch_stem: conv`, docs/model.md).
Without `--shards`/`--tokenizer` a synthetic corpus of `--studies` studies is generated, sharded and
tokenised in a temporary folder first (the demo's pipeline at `--image-size`).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mpma_ds import create_model, load_tokenizer
from mpma_ds.data import build_loader
from mpma_ds.data.config import DataConfig
from mpma_ds.eval.alignment import evaluate_alignment

ABLATIONS = {
    "gla": {
        "cls+masked (baseline)": {"global_pool": "cls", "align_on": "masked"},
        "mean+masked": {"global_pool": "mean", "align_on": "masked"},
        "mean+full": {"global_pool": "mean", "align_on": "full"},
    },
    "memory": {
        "memory (MA-CMF)": {"global_pool": "mean", "align_on": "full"},
        "no memory (slots 0)": {"global_pool": "mean", "align_on": "full", "memory_slots": 0},
    },
    "stem": {
        "linear patches (ViT)": {"global_pool": "mean", "align_on": "full", "patch_stem": "linear"},
        "conv stem": {"global_pool": "mean", "align_on": "full", "patch_stem": "conv"},
    },
}
COLUMNS = {
    "gla": ("i2t_R@10", "t2i_R@10", "zeroshot_auroc_mean"),
    "memory": ("mlm_acc_findings", "mlm_acc", "i2t_R@1", "i2t_R@10", "t2i_R@10", "zeroshot_auroc_mean"),
    "stem": ("zeroshot_auroc_mean", "i2t_R@1_abnormal", "i2t_R@10", "t2i_R@10", "mlm_acc_findings"),
}


def initial_weights(args: argparse.Namespace, variants: dict) -> dict[str, torch.Tensor]:
    """One initialisation (seed ``args.seed``) holding every parameter any variant has: each variant starts
    from it, so they differ only in what their overrides add or remove."""
    torch.manual_seed(args.seed)
    richest = max(variants.values(), key=lambda o: o.get("memory_slots", 1) > 0)
    return {k: v.clone() for k, v in create_model(args.model, **richest).state_dict().items()}


def run_variant(overrides: dict, args: argparse.Namespace, cfg: DataConfig, tok, init: dict) -> dict:
    from mpma_ds.eval.mlm import MaskedTokenAccuracy

    torch.manual_seed(args.seed)
    model = create_model(args.model, **overrides)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in init.items() if k in own and v.shape == own[k].shape}, strict=False)
    torch.manual_seed(args.seed)  # the same dropout draws in every variant
    masks = torch.Generator().manual_seed(args.seed)  # the same image masks
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup, steps = max(1, args.steps // 10), args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    stream = iter(build_loader(cfg, 0, 1, batch_size=args.batch_size, tokenizer=tok, seed=args.seed).loader)
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(next(stream), generator=masks)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    val = build_loader(cfg, 0, 1, split="validate", batch_size=64, tokenizer=tok, seed=0, train=False)
    mlm = MaskedTokenAccuracy(model, tok, "cpu")
    res = evaluate_alignment(
        model, mlm.stream(val.loader), tokenizer=tok, device="cpu", max_text_len=cfg.max_text_len
    )
    res.update(mlm.result())
    rows = {kind: mlm.per_sample(kind).tolist() for kind in ("all", "findings")}
    return {**res, "train_seconds": seconds, "final_loss": loss.item(), "mlm_rows": rows}


def mlm_accuracy(rows) -> dict[str, float]:
    """Masked-token accuracy of (N, 2) per-sample (correct, masked) counts."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
    total = rows[:, 1].sum()
    return {"acc": rows[:, 0].sum() / total if total else float("nan")}


def paired_mlm_difference(a: dict, b: dict, kind: str, n_resamples: int = 1000) -> dict:
    """Variant a - variant b in masked-token accuracy (``kind``: "all" / "findings") with a paired bootstrap 95 %
    interval over the validation samples (the same masked tokens for both: the eval pass is deterministic)."""
    from mpma_ds.eval.bootstrap import paired_difference

    rows_a, rows_b = np.asarray(a["mlm_rows"][kind]), np.asarray(b["mlm_rows"][kind])
    return paired_difference(mlm_accuracy, [rows_a], [rows_b], keys=["acc"], n_resamples=n_resamples)["acc"]


def synthetic_data(work: Path, studies: int, image_size: int, seed: int) -> tuple[Path, Path]:
    """The demo's pipeline in small: synthetic corpus -> shards (train/validate) -> WordPiece tokenizer."""
    from data_tools.build_shards import build_shards
    from data_tools.synth.corpus import generate_corpus
    from data_tools.train_tokenizer import train_tokenizer

    generate_corpus(work / "corpus", studies, seed, min_size=2 * image_size, max_size=2 * image_size + 64,
                    eval_fraction=0.2, workers=2)  # fmt: skip
    build_shards("mimic-cxr", work / "corpus", work / "shards", shard_size=256, image_size=image_size,
                 progress=False, workers=2)  # fmt: skip
    train_tokenizer(work / "shards", work / "tokenizer", 4096)
    return work / "shards", work / "tokenizer"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ablation", choices=list(ABLATIONS), default="gla", help="which comparison (default: gla)")
    p.add_argument("--shards", help="shard build folder holding train/ and validate/ (default: synthesise)")
    p.add_argument("--tokenizer", help="tokenizer folder (with --shards)")
    p.add_argument("--studies", type=int, default=600, help="synthetic studies when no --shards (default: 600)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--model", default="mpma_tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="*", help="a subset of the ablation's variants (default: all)")
    p.add_argument("--out", default="benchmarks/results/bench_alignment.json")
    args = p.parse_args()
    variants = ABLATIONS[args.ablation]
    args.variants = args.variants or list(variants)
    unknown = sorted(set(args.variants) - set(variants))
    if unknown:
        p.error(f"--variants {unknown}: the {args.ablation} ablation has {list(variants)}")
    if bool(args.shards) != bool(args.tokenizer):
        p.error("--shards and --tokenizer go together (or give neither to synthesise a corpus)")
    with tempfile.TemporaryDirectory(prefix="bench_alignment_") as tmp:
        if args.shards:
            shards, tokenizer = Path(args.shards), Path(args.tokenizer)
        else:
            shards, tokenizer = synthetic_data(Path(tmp), args.studies, args.image_size, args.seed)
        run_all(args, variants, shards, tokenizer)


def run_all(args: argparse.Namespace, variants: dict, shards: Path, tokenizer: Path) -> None:
    columns = COLUMNS[args.ablation]
    cfg = DataConfig(
        backend="wds",
        train_shards=str(shards / "train"),
        val_shards=str(shards / "validate"),
        tokenizer=str(tokenizer),
        image_size=args.image_size,
        max_text_len=64,
        num_workers=1,
        augment=True,
    )
    tok = load_tokenizer(str(tokenizer))
    init = initial_weights(args, {n: variants[n] for n in args.variants})
    results = {name: run_variant(variants[name], args, cfg, tok, init) for name in args.variants}

    base = results[args.variants[0]]
    some = next(iter(results.values()))
    print(f"\n{args.model}, {args.steps} steps x batch {args.batch_size}, lr {args.lr}, seed {args.seed}; "
          f"validation split: {int(some['eval_samples'])} images, {int(some['mlm_tokens'])} masked tokens "
          f"({int(some['mlm_tokens_findings'])} of finding words)")  # fmt: skip
    print(f"{'variant':<24}" + "".join(f"{c:>22}" for c in columns) + f"{'train s':>10}")
    for name, r in results.items():
        cells = "".join(f"{r[c]:>14.3f} ({r[c] / max(base[c], 1e-9):4.2f}x)" for c in columns)
        print(f"{name:<24}{cells}{r['train_seconds']:>10.0f}")
    if args.ablation == "memory":  # is the difference outside the noise? paired over the same masked tokens
        for name in args.variants[1:]:
            for kind, key in (("findings", "mlm_acc_findings"), ("all", "mlm_acc")):
                d = paired_mlm_difference(results[name], base, kind)
                results[name][f"{key}_minus_baseline"] = d
                lo, hi = d["difference_ci95"]
                print(
                    f"{key}: {name} - {args.variants[0]} = {d['difference']:+.3f} [paired 95 %: {lo:+.3f}, {hi:+.3f}]"
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
