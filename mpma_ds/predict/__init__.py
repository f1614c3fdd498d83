"""Use a model on one's own films: zero-shot findings (calibrated when labelled data is given), phrase-grounding
overlays and a self-contained viewer (``mpma-predict``; ``mpma_ds.Predictor`` in notebooks)."""

from mpma_ds.predict.predictor import Predictor, load_model

__all__ = ["Predictor", "load_model"]
