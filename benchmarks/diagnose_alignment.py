"""Where does a model's image-report alignment stop: the data, the text side or the image side? (one process, CPU)

On a shard split whose samples carry the synthetic `truth` (the demo's), for an exported model and/or a randomly
initialised twin:

1. **Retrieval ceiling** (the data): the image->report R@1 on abnormal studies that a model reaching the
   *truth* exactly would get. An image shows which findings were drawn (and on which side), never the report's
   wording (which phrasing, which negatives it lists, the device details): every merged report of the gallery
   whose study has the query's drawn findings ties with its own, so the best expected R@1 is the mean of
   1/(those reports) over the queries. Printed for "findings" and "findings + side".
2. **Zero-shot AUROC of the reports** (the text side): the evaluation's prompt classifier (`CHEXPERT_PROMPTS`,
   cos(x, positive) - cos(x, negative)) applied to each study's *report* embedding instead of its image's. The
   report states the finding in words, so this is what the text encoder's embedding space lets the prompts
   read off when the image side is perfect; an image cannot score above what its report's embedding would.
3. **Zero-shot AUROC of the images**, the metric of `launch/evaluate.py`, and a **linear probe** on the image
   encoder's pooled features (5-fold logistic regression against the truth; the image side: what the image
   encoder holds, however well it is aligned).

    python benchmarks/diagnose_alignment.py --model demo_runs/exported --shards demo_runs/shards
    python benchmarks/diagnose_alignment.py --model demo_runs/exported --random-init --shards demo_runs/shards
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mpma_ds.eval.alignment import encode_texts
from mpma_ds.eval.retrieval import normalise_report
from mpma_ds.eval.zeroshot import CHEXPERT_PROMPTS, PATHOLOGIES


def drawn_signature(truth: Mapping[str, Any], with_side: bool) -> frozenset:
    """What an image shows of its study: the present pathologies (+ their side) and whether devices are drawn."""
    names = (*PATHOLOGIES, "Support Devices")
    return frozenset(
        (name, truth[name].get("side") if with_side else None)
        for name in names
        if name in truth and truth[name].get("present")
    )


def retrieval_ceiling(texts: Sequence[str], truths: Sequence[Mapping[str, Any]], with_side: bool) -> float:
    """Expected image->report R@1 over abnormal queries of a model that knows each image's drawn findings
    exactly and nothing of the wording: 1 / (merged reports with the query's signature), averaged."""
    reports: dict[frozenset, set[str]] = defaultdict(set)
    sigs = [drawn_signature(t, with_side) for t in truths]
    for text, sig in zip(texts, sigs):
        reports[sig].add(normalise_report(text))
    abnormal = [i for i, t in enumerate(truths) if any(t.get(n, {}).get("present") for n in PATHOLOGIES)]
    if not abnormal:
        raise ValueError("no abnormal study in the split: nothing to retrieve")
    return float(np.mean([1.0 / len(reports[sigs[i]]) for i in abnormal]))


def prompt_auroc(emb: torch.Tensor, model: Any, tok: Any, truths: Sequence[Mapping[str, Any]], **kw) -> dict:
    """Per label (>= 20 positives and negatives in the truth) the AUROC of the prompt classifier on ``emb``."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for label, (pos, neg) in CHEXPERT_PROMPTS.items():
        y = np.array([bool(t.get(label, {}).get("present")) for t in truths], dtype=int)
        if min(y.sum(), (1 - y).sum()) < 20:
            continue
        p = F.normalize(F.normalize(encode_texts(model, list(pos), tokenizer=tok, **kw), dim=-1).mean(0), dim=0)
        n = F.normalize(F.normalize(encode_texts(model, list(neg), tokenizer=tok, **kw), dim=-1).mean(0), dim=0)
        out[label] = float(roc_auc_score(y, (emb @ p - emb @ n).numpy()))
    return out


def probe_auroc(features: np.ndarray, truths: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict:
    """Per label, the 5-fold cross-validated AUROC of a logistic regression on ``features`` (standardised)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = {}
    for label in labels:
        y = np.array([bool(t.get(label, {}).get("present")) for t in truths], dtype=int)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        prob = cross_val_predict(clf, features, y, cv=folds, method="predict_proba")[:, 1]
        out[label] = float(roc_auc_score(y, prob))
    return out


def load_split(args: argparse.Namespace, model: Any, tok: Any, recipe: Any) -> dict[str, Any]:
    from mpma_ds.runner.evaluate import data_config_for, one_pass, split_folder

    shard_dir = split_folder(args.shards, args.split)
    cfg = data_config_for(model.config, recipe=recipe, shards=shard_dir, tokenizer=args.tok_dir, backend="wds")
    images, feats, texts, truths = [], [], [], []
    with one_pass(cfg, tok, split=args.split, batch_size=64) as batches, torch.no_grad():
        for batch in batches:
            keep = torch.as_tensor(batch["valid"]).bool()
            x = batch["image"][keep]
            images.append(model.encode_image(x))
            feats.append(model.image_features(x))
            texts += [t for t, k in zip(batch["text"], keep.tolist()) if k]
            truths += [m.get("truth") for m, k in zip(batch["meta"], keep.tolist()) if k]
    if not truths or any(t is None for t in truths):
        raise SystemExit(f"{shard_dir}: samples without 'truth' (build the shards from data_tools.synth_corpus)")
    return {"image_emb": torch.cat(images), "features": torch.cat(feats).numpy(), "texts": texts,
            "truths": truths, "max_text_len": cfg.max_text_len}  # fmt: skip


def diagnose(model: Any, tok: Any, data: dict[str, Any]) -> dict[str, Any]:
    kw = {"device": "cpu", "max_text_len": data["max_text_len"]}
    with torch.no_grad():
        report_emb = encode_texts(model, data["texts"], tokenizer=tok, **kw)
        zs_image = prompt_auroc(data["image_emb"], model, tok, data["truths"], **kw)
        zs_report = prompt_auroc(report_emb, model, tok, data["truths"], **kw)
    probe = probe_auroc(data["features"], data["truths"], list(zs_image))
    return {"zs_image": zs_image, "zs_report": zs_report, "probe_image": probe}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model folder (launch/export.py --out)")
    p.add_argument("--random-init", action="store_true", help="also diagnose a randomly initialised twin (seed 0)")
    p.add_argument("--shards", required=True, help="shard build folder (synthetic corpus, with truth)")
    p.add_argument("--split", default="validate")
    p.add_argument("--out", default="benchmarks/results/diagnose_alignment.json")
    args = p.parse_args()

    from mpma_ds import MPMA, create_model, load_tokenizer
    from mpma_ds.runner.export import load_run_recipe

    folder = Path(args.model)
    recipe = load_run_recipe(folder / "recipe.yaml") if (folder / "recipe.yaml").is_file() else None
    args.tok_dir = str(folder / "text_encoder")
    tok = load_tokenizer(args.tok_dir)
    models = {"pretrained": MPMA.from_pretrained(folder).eval()}
    if args.random_init:
        if recipe is None:
            raise SystemExit(f"--random-init: {folder / 'recipe.yaml'} is missing (it names the architecture)")
        torch.manual_seed(0)
        models["random"] = create_model(recipe.model.name, **dict(recipe.model.overrides)).eval()
    results: dict[str, Any] = {}
    for name, model in models.items():
        data = load_split(args, model, tok, recipe)
        if not results:
            results["ceiling_i2t_R@1_abnormal"] = {
                "findings": retrieval_ceiling(data["texts"], data["truths"], with_side=False),
                "findings+side": retrieval_ceiling(data["texts"], data["truths"], with_side=True),
            }
            results["images"] = len(data["texts"])
        results[name] = diagnose(model, tok, data)

    c = results["ceiling_i2t_R@1_abnormal"]
    print(f"{args.split}: {results['images']} images; image->report R@1 (abnormal) ceiling of a model that knows the "
          f"drawn findings: {c['findings']:.3f}, findings + side: {c['findings+side']:.3f}")  # fmt: skip
    names = [n for n in models]
    head = "".join(f"{f'{n} {col}':>24}" for n in names for col in ("zs image", "zs report", "probe"))
    print(f"{'label':<28}{head}")
    labels = list(results[names[0]]["zs_image"])
    for label in [*labels, "MEAN"]:
        cells = ""
        for n in names:
            for key in ("zs_image", "zs_report", "probe_image"):
                vals = results[n][key]
                v = float(np.mean(list(vals.values()))) if label == "MEAN" else vals[label]
                cells += f"{v:>24.3f}"
        print(f"{label:<28}{cells}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
