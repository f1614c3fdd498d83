"""Tasks the ``Trainer`` runs — pretraining and the fine-tuning tasks — each owning its model, ``batch -> loss``
and its metrics, one module each:

- ``base``: the ``Task`` hooks and the ``RunContext`` the trainer hands them;
- ``pretrain``: MPMA pretraining; ``finetune``: what the fine-tuning tasks share (backbone from ``init.from``,
  layer-wise learning rates, tags); ``vqa``, ``classification`` (``cls``), ``linear_probe``, ``retrieval``,
  ``zero_shot``;
- ``config``: the recipe sections ``task`` and ``init``; ``init``: resolving and loading ``init.from``;
- ``registry``: ``build_task(recipe)`` / ``task_class(name)``.

This package module imports nothing, so the recipe (which composes ``tasks.config``) never pulls in a task.
"""
