"""Which class runs which task: ``build_task(recipe)`` picks it by ``recipe.task.name`` (a pretraining recipe
has no ``task``). Each task class lives in its own module and is imported on demand."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mpma_ds.tasks.config import FINETUNE_TASKS

if TYPE_CHECKING:
    from mpma_ds.tasks.base import Task
    from mpma_ds.training.recipe import Recipe

__all__ = ["FINETUNE_TASKS", "build_task", "task_class"]


def task_class(name: str) -> type[Task]:
    """The class of task ``name`` (imported on demand: each lives in its own module)."""
    if name == "pretrain":
        from mpma_ds.tasks.pretrain import PretrainTask

        return PretrainTask
    if name == "vqa":
        from mpma_ds.tasks.vqa import VQATask

        return VQATask
    if name == "cls":
        from mpma_ds.tasks.classification import ClassificationTask

        return ClassificationTask
    if name == "linear_probe":
        from mpma_ds.tasks.linear_probe import LinearProbeTask

        return LinearProbeTask
    if name == "retrieval":
        from mpma_ds.tasks.retrieval import RetrievalTask

        return RetrievalTask
    if name == "zero_shot":
        from mpma_ds.tasks.zero_shot import ZeroShotTask

        return ZeroShotTask
    raise ValueError(f"unknown task {name!r}; choose one of pretrain, {', '.join(FINETUNE_TASKS)}")


def build_task(recipe: Recipe) -> Task:
    """The task object of ``recipe``: its ``task.name`` for a fine-tuning recipe, else pretraining."""
    section = getattr(recipe, "task", None)
    return task_class(section.name if section is not None else "pretrain")(recipe)
