"""An mpma-ds plugin task: the view position of a film (PA / AP / LATERAL) from the image encoder.

Installed with ``pip install examples/plugin_task``; the ``mpma_ds.tasks`` entry point in its pyproject.toml is
the only registration. Nothing of mpma_ds is changed or forked.
"""
