"""The training engine: typed recipe, ``build_engine`` (the only ``deepspeed.initialize``), checkpoints with
exact resume, the DeepSpeed JSON. The ``Trainer`` that drives them sits above, in ``mpma_ds.runner.trainer``.

``deepspeed`` is imported lazily (inside ``build_engine``), so reading a recipe stays cheap.
"""

from mpma_ds.training.engine import build_engine
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
    "build_engine",
    "load_recipe",
    "recipe_to_dict",
    "save_recipe",
]
