"""The fine-tuning tasks' own ``evaluate`` on stand-in modules whose outputs are fixed, against references computed
by hand: VQA accuracy with answers unseen in training counted wrong and padding rows left out, the cls task's
macro AUROC when labels are missing from a split (and each uncertain-label policy), retrieval R@K with ties
counted against the query and duplicate reports de-duplicated. The metric functions themselves are unit-tested
in test_downstream_metrics.py; this is the task layer around them (batches -> targets -> scores -> metrics).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from finetune_testdata import recipe_name
from torch import nn

from mpma_ds.tasks.base import RunContext


def _recipe(task: str, overrides: list[str]):
    from mpma_ds.recipes import find_recipe
    from mpma_ds.training import load_recipe
    from mpma_ds.training.recipe import FinetuneRecipe

    return load_recipe(find_recipe(recipe_name(task)), overrides, cls=FinetuneRecipe)


class _Fixed(nn.Module):
    """A stand-in task module whose outputs are fixed per sample key."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the evaluation a parameter dtype
        self.table = table

    def logits(self, batch: dict) -> torch.Tensor:
        return torch.tensor([self.table[k] for k in batch["key"]])


def _ctx(recipe) -> RunContext:
    return RunContext(recipe, 0, 1, 1, {}, torch.device("cpu"))


def test_vqa_accuracy_on_fixed_logits_counts_unseen_answers_wrong(tmp_path):
    from mpma_ds.tasks.vqa import VQATask

    recipe = _recipe("vqa", [f"train.output_dir={tmp_path}"])
    task = VQATask(recipe)
    task.answers = ["no", "yes", "left"]
    table = {  # argmax: yes, no, left, yes, no, left(unseen gold), padding
        "a": [0, 1, 0], "b": [2, 1, 0], "c": [0, 0, 3], "d": [0, 5, 1], "e": [9, 0, 0], "f": [0, 0, 1],
        "pad": [0, 1, 0],
    }  # fmt: skip
    gold = [
        ("a", "Yes", "CLOSED"),  # right (case folded)
        ("b", "yes", "CLOSED"),  # wrong
        ("c", " left ", "OPEN"),  # right (space stripped)
        ("d", "yes", "CLOSED"),  # right
        ("e", "right", "OPEN"),  # unseen in training: wrong whatever is predicted
        ("f", "left lung", "OPEN"),  # unseen: wrong
    ]
    metas = [{"answer": g, "answer_type": t} for _, g, t in gold]
    keys = [k for k, _, _ in gold]
    batches = [
        {"key": keys[:4], "meta": metas[:4], "image": torch.zeros(4, 1, 2, 2), "valid": torch.ones(4, dtype=torch.bool)},
        {"key": [*keys[4:], "pad"], "meta": [*metas[4:], metas[0]], "image": torch.zeros(3, 1, 2, 2),
         "valid": torch.tensor([True, True, False])},
    ]  # fmt: skip
    out = task.evaluate(_Fixed(table), batches, _ctx(recipe))
    assert out["questions"] == 6 and out["questions_closed"] == 3 and out["questions_open"] == 3
    assert out["accuracy_overall"] == pytest.approx(3 / 6)
    assert out["accuracy_closed"] == pytest.approx(2 / 3)
    assert out["accuracy_open"] == pytest.approx(1 / 3)
    assert out["unseen_answers"] == 2 and out["unseen_open"] == 2 and out["unseen_closed"] == 0
    with_ci = task.evaluate(_Fixed(table), batches, _ctx(recipe), n_resamples=200)
    assert with_ci["accuracy_overall"] == out["accuracy_overall"]
    low, high = with_ci["accuracy_overall_ci95"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0 and low < high
    # the training targets of the same answers: one-hot over the answer set, all-zero for an unseen answer
    batch = task.to_model({"meta": metas})
    assert batch["answer_ids"].tolist() == [1, 1, 2, 1, -1, -1]
    assert batch["answer_targets"].sum(dim=1).tolist() == [1, 1, 1, 1, 0, 0]


def test_cls_macro_auroc_on_fixed_logits_with_labels_missing_from_the_split(tmp_path):
    """Three labels; in this split Edema has no labelled row and Cardiomegaly only negatives: both are left out
    and the macro is Atelectasis alone; with U-Ones the uncertain rows become positives and the AUROC moves."""
    from mpma_ds.data.batch import labels_vector
    from mpma_ds.tasks.classification import ClassificationTask, Labels

    names = ["Atelectasis", "Cardiomegaly", "Edema"]
    nan = float("nan")
    rows = {  # key: (Atelectasis, Cardiomegaly, Edema) labels, and the module's scores
        "a": ((1, 0, nan), (0.9, 0.2, 0.5)),
        "b": ((0, 0, nan), (0.1, 0.4, 0.5)),
        "c": ((0, 0, nan), (0.8, 0.6, 0.5)),
        "d": ((1, nan, nan), (0.3, 0.1, 0.5)),
        "e": ((-1, 0, nan), (0.85, 0.3, 0.5)),  # uncertain Atelectasis
    }

    def auroc(policy: str) -> dict:
        recipe = _recipe("cls", [f"train.output_dir={tmp_path}", f"task.cls.label_names={names}",
                                 f"task.cls.uncertain={policy}"])  # fmt: skip
        task = ClassificationTask(recipe)
        task.labels = Labels(recipe.task.cls)
        metas = [{"labels": dict(zip(names, lab))} for lab, _ in rows.values()]
        full = torch.from_numpy(np.stack([labels_vector(m) for m in metas])).float()
        batch = task.to_model({"labels": full, "key": list(rows), "image": torch.zeros(5, 1, 2, 2),
                               "valid": torch.ones(5, dtype=torch.bool)})  # fmt: skip
        return task.evaluate(_Fixed({k: s for k, (_, s) in rows.items()}), [batch], _ctx(recipe))

    ignore = auroc("ignore")
    # Atelectasis, rows a-d: positives {0.9, 0.3} vs negatives {0.1, 0.8}: 3 of 4 pairs ordered right
    assert ignore["auroc/Atelectasis"] == pytest.approx(3 / 4)
    assert ignore["auroc_macro"] == pytest.approx(3 / 4) and ignore["labels_used"] == 1
    assert set(ignore["labels_left_out"]) == {"Cardiomegaly", "Edema"}
    assert "auroc/Cardiomegaly" not in ignore and "auroc/Edema" not in ignore
    ones = auroc("ones")  # e (0.85) is a positive now: {0.9, 0.3, 0.85} vs {0.1, 0.8}: 5 of 6 pairs
    assert ones["auroc_macro"] == pytest.approx(5 / 6)
    zeros = auroc("zeros")  # e is a negative: {0.9, 0.3} vs {0.1, 0.8, 0.85}: 4 of 6
    assert zeros["auroc_macro"] == pytest.approx(4 / 6)


class _Embedder(nn.Module):
    """encode_image gives row i of a fixed similarity matrix for image i, encode_text the one-hot of report j,
    so image i scores report j at exactly S[i, j]."""

    def __init__(self, sim: torch.Tensor) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.sim = sim

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.sim[images[:, 0, 0, 0].long()]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.eye(self.sim.shape[1])[input_ids[:, 0]]


class _ReportIds:
    """A tokenizer stand-in: ``"report j"`` (any case and spacing) -> input id j."""

    def __call__(self, texts, **kwargs):
        ids = torch.tensor([[int(t.split()[-1])] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_retrieval_recall_at_k_on_fixed_embeddings_counts_ties_against_the_query(tmp_path):
    from mpma_ds.tasks.retrieval import RetrievalTask

    sim = torch.tensor([
        [0.9, 0.1, 0.2, 0.3],  # image 0: its report first                      -> rank 0
        [0.5, 0.5, 0.1, 0.0],  # image 1: ties with report 0                      -> rank 1
        [0.7, 0.8, 0.6, 0.6],  # image 2: two above, one tie                      -> rank 3
        [0.0, 0.0, 0.0, 0.0],  # image 3: everything tied                         -> rank 3
    ])  # fmt: skip
    # reports as queries (columns): 0 -> rank 0; 1 -> rank 1 (image 2 higher); 2 -> rank 0; 3 -> rank 3 (all tie)
    recipe = _recipe("retrieval", [f"train.output_dir={tmp_path}", "task.retrieval.ks=[1, 2]"])
    task = RetrievalTask(recipe)
    ctx = _ctx(recipe)
    ctx.tokenizer = _ReportIds()

    def images(*ids: int) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)

    batches = [
        {"image": images(0, 1, 2), "text": ["report 0", "report 1", "report 2"], "valid": torch.ones(3, dtype=torch.bool)},
        # image 0 again with the same report written differently (one candidate), then padding
        {"image": images(3, 0, 1), "text": ["report 3", "Report  0", "report 1"],
         "valid": torch.tensor([True, True, False])},
    ]  # fmt: skip
    out = task.evaluate(_Embedder(sim), batches, ctx)
    assert out["eval_samples"] == 5 and out["retrieval_pairs"] == 4
    # identical reports merged: all 5 images are queries (image 0 twice, ranks 0 0 1 3 3); reports 0 and
    # "Report  0" are one candidate, and report 0's query finds either copy of image 0
    assert out["i2t_R@1"] == pytest.approx(2 / 5) and out["i2t_R@2"] == pytest.approx(3 / 5)
    assert out["t2i_R@1"] == pytest.approx(2 / 4) and out["t2i_R@2"] == pytest.approx(3 / 4)
    assert out["rsum"] == pytest.approx(2 / 5 + 3 / 5 + 2 / 4 + 3 / 4)
    with_ci = task.evaluate(_Embedder(sim), batches, ctx, n_resamples=100)
    for key in ("i2t_R@1", "t2i_R@2"):
        low, high = with_ci[f"{key}_ci95"]
        assert 0.0 <= low <= out[key] <= high <= 1.0
