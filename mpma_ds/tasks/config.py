"""The sections a fine-tuning recipe adds to a pretraining one: ``task`` (which task, its options) and ``init``
(where the backbone's weights come from). ``mpma_ds.training.recipe.FinetuneRecipe`` composes them; the same
config engine builds them; every field documented here::

    task:
      name: vqa                 # any registered task: vqa | cls | linear_probe | retrieval | zero_shot | a plugin's
      vqa: {answer_set: train, loss: bce}   # the option sections the task reads (declared where it registers)
    init:
      from: demo_runs/exported  # an exported folder, a pretraining run folder, or random
    model: {name: mpma_tiny}    # the architecture (random init; for a folder it must agree with it)
    data: {...}                 # shards, tokenizer, data.label_fraction
    train: {...}                # epochs, head_lr_mult, layer_decay, early_stopping, best_metric ...

The option sections are not listed here: each task registers its own beside its class
(``@TASKS.register("vqa", sections={"vqa": VQAOptions})``), and ``task`` accepts the sections of every registered
task, plugins included (``ConfigSection.OPEN``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mpma_ds.config import ConfigSection
from mpma_ds.tasks.registry import TASKS, finetune_task_names, task_sections, unknown_task


@dataclass
class TaskSection(ConfigSection):
    """``task``: which fine-tuning task and its options."""

    SECTION = "task"

    OPEN = "options"

    name: str = "vqa"
    """A registered fine-tuning task: ``vqa``, ``cls``, ``linear_probe``, ``retrieval``, ``zero_shot`` or one an
    installed plugin registers (``mpma-finetune --list-tasks``)."""

    bootstrap: int = 1000
    """Resamples of the bootstrap 95 % interval reported beside each final test metric (0 = none)."""

    options: dict[str, Any] = field(default_factory=dict)
    """The option sections the task reads, by key (``task.vqa``, ``task.cls`` ...): given ones as built, the
    others at their defaults. Written in YAML beside ``name``, not under ``options``."""

    @classmethod
    def open_sections(cls) -> dict[str, type]:
        return task_sections()

    def __getattr__(self, key: str) -> Any:
        # task.vqa, task.cls ...: the option sections read like the fixed fields they used to be
        options = self.__dict__.get("options")
        if options is not None and key in options:
            return options[key]
        raise AttributeError(f"task has no option section {key!r} (task.name is {self.__dict__.get('name')!r})")

    def validate(self) -> None:
        if self.name not in finetune_task_names():
            raise ValueError(unknown_task(self.name))
        if self.bootstrap < 0:
            raise ValueError(f"task.bootstrap must be >= 0, got {self.bootstrap}")
        reads = TASKS.get(self.name).meta.get("sections", {})
        given = dict(self.options)
        for key, section in given.items():
            if key in reads:
                continue
            # a recipe.yaml saved before the task sections were open holds every task's section at its
            # defaults: those are no choice of the user's and are dropped; a changed one is a mistake
            if section != type(section)():
                raise ValueError(
                    f"task.{key} options are set but task.name is {self.name!r}, which does not read them; "
                    f"remove them or set task.name"
                )
        self.options = {key: given.get(key) or options_cls() for key, options_cls in reads.items()}


@dataclass
class InitSection(ConfigSection):
    """``init``: the backbone's starting weights."""

    SECTION = "init"

    from_: str = "random"
    """``random`` (a randomly initialised twin of ``model``, seeded by ``train.seed`` — the baseline of every
    comparison), an exported folder (``launch/export.py --out``), or a pretraining run folder / checkpoint
    (consolidated on the fly). Written ``from:`` in YAML."""

    def validate(self) -> None:
        if not self.from_:
            raise ValueError("init.from must be random, an exported folder or a pretraining run folder")
