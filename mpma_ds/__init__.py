"""mpma-ds: MPMA medical vision-language pretraining at cluster scale.

The stable Python API (SPEC §5a)::

    import mpma_ds
    mpma_ds.list_models()
    model = mpma_ds.create_model("mpma_tiny")
    tok = mpma_ds.load_tokenizer(folder)
    records = mpma_ds.Predictor(exported_folder).predict(["film.dcm"], phrases=["left pleural effusion"])
"""

from importlib.metadata import PackageNotFoundError, version

from mpma_ds.models import MPMA, MPMAConfig, create_model, list_models
from mpma_ds.tokenizer import load_tokenizer

try:
    __version__ = version("mpma-ds")  # the one version source is setup.py
except PackageNotFoundError:  # a checkout on sys.path without `pip install`
    __version__ = "0+unknown"
__all__ = ["MPMA", "MPMAConfig", "Predictor", "create_model", "list_models", "load_tokenizer", "__version__"]


def __getattr__(name: str):
    # Predictor on first use: it pulls in the data, evaluation and image-decoding code (pydicom, Pillow,
    # matplotlib), which `import mpma_ds` does not need
    if name == "Predictor":
        from mpma_ds.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'mpma_ds' has no attribute {name!r}")
