"""The task registry: every task registers itself where its class is defined, with the recipe sections it reads::

    @TASKS.register("vqa", sections={"vqa": VQAOptions})
    class VQATask(FinetuneTask): ...

A task of another package registers through the ``mpma_ds.tasks`` entry-point group (``examples/plugin_task``);
``build_task(recipe)`` picks the class by ``recipe.task.name`` (a pretraining recipe has no ``task``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from data_tools.registry import Registry, RegistryError

if TYPE_CHECKING:
    from mpma_ds.tasks.base import Task
    from mpma_ds.training.recipe import Recipe

__all__ = ["TASKS", "build_task", "finetune_task_names", "task_class", "task_sections", "unknown_task"]

TASKS: Registry[type[Task]] = Registry(
    "task",
    "mpma_ds.tasks",
    builtins=(
        "mpma_ds.tasks.pretrain",
        "mpma_ds.tasks.vqa",
        "mpma_ds.tasks.classification",
        "mpma_ds.tasks.linear_probe",
        "mpma_ds.tasks.retrieval",
        "mpma_ds.tasks.zero_shot",
    ),
)
"""Every task by name. Register with ``@TASKS.register(name, sections={key: OptionsClass})``: ``sections`` are
the ``task.<key>`` recipe sections the task reads (two tasks may share one, with the same class)."""


def finetune_task_names() -> list[str]:
    """The registered fine-tuning tasks (everything but pretraining), plugins included."""
    return [e.name for e in TASKS if e.obj.kind == "finetune"]


def unknown_task(name: str) -> str:
    """The one line for a fine-tuning task name that is not registered: the registered ones, plugins named."""
    names = [f"{e.name} (plugin {e.plugin})" if e.plugin else e.name for e in TASKS if e.obj.kind == "finetune"]
    return f"unknown task {name!r}; choose one of {', '.join(names)}"


def task_sections() -> dict[str, type]:
    """Every ``task.<key>`` option section some registered task reads, by key.

    Raises:
        RegistryError: two tasks declare the same key with different classes.
    """
    sections: dict[str, type] = {}
    owner: dict[str, str] = {}
    for entry in TASKS:
        for key, cls in entry.meta.get("sections", {}).items():
            if sections.setdefault(key, cls) is not cls:
                raise RegistryError(
                    f"task {entry.name!r} declares section task.{key} as {cls.__qualname__}, but task "
                    f"{owner[key]!r} declares it as {sections[key].__qualname__}; rename one of them"
                )
            owner.setdefault(key, entry.name)
    return sections


def task_class(name: str) -> type[Task]:
    """The class of task ``name``.

    Raises:
        RegistryError: ``name`` is not registered (the message lists what is).
    """
    return TASKS[name]


def build_task(recipe: Recipe) -> Task:
    """The task object of ``recipe``: its ``task.name`` for a fine-tuning recipe, else pretraining."""
    section = getattr(recipe, "task", None)
    return task_class(section.name if section is not None else "pretrain")(recipe)
