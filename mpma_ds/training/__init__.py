"""The training system: typed recipe, ``build_engine`` (the only ``deepspeed.initialize``), the loop,
checkpoints with exact resume.

``deepspeed`` is imported lazily (inside ``build_engine`` / ``train``), so reading a recipe stays cheap.
"""

from mpma_ds.training.config import (
    ModelSection,
    Recipe,
    RecipeError,
    TrainConfig,
    load_recipe,
    recipe_to_dict,
    save_recipe,
)

__all__ = [
    "ModelSection",
    "Recipe",
    "RecipeError",
    "TrainConfig",
    "build_engine",
    "load_recipe",
    "recipe_to_dict",
    "save_recipe",
    "train",
]


def __getattr__(name: str):
    # build_engine / train pull in deepspeed; import them on first use only.
    if name == "build_engine":
        from mpma_ds.training.engine import build_engine

        return build_engine
    if name == "train":
        from mpma_ds.training.loop import train

        return train
    raise AttributeError(name)
