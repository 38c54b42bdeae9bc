"""Reproducible image-classification experiments: fetch, preprocess, train, evaluate, predict."""

__version__ = "0.1.0"
