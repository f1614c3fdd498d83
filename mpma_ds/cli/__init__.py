"""Command-line entry points (``mpma-pretrain``, ``mpma-finetune``, ``mpma-export``, ``mpma-evaluate``,
``mpma-compare``); ``launch/*.py`` are thin scripts over them. Each parses, builds, runs and closes, and turns
bad input into one ``<prog>: error: ...`` line and a non-zero exit."""
