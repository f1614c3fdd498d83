"""The training system: typed recipe, ``build_engine`` (the only ``deepspeed.initialize``), the ``Trainer`` that
runs every task, checkpoints with exact resume.

``deepspeed`` is imported lazily (inside ``build_engine`` / the trainer), so reading a recipe stays cheap.
"""

from mpma_ds.training.recipe import (
    RECIPE_FILE,
    ModelSection,
    Recipe,
    RecipeError,
    TrainConfig,
    load_recipe,
    recipe_to_dict,
    save_recipe,
)

__all__ = [
    "RECIPE_FILE",
    "ModelSection",
    "Recipe",
    "RecipeError",
    "TrainConfig",
    "Trainer",
    "build_engine",
    "load_recipe",
    "recipe_to_dict",
    "save_recipe",
    "train",
]


def __getattr__(name: str):
    # the trainer and build_engine pull in deepspeed; import them on first use only.
    if name == "build_engine":
        from mpma_ds.training.engine import build_engine

        return build_engine
    if name in ("train", "Trainer"):
        from mpma_ds.training import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
