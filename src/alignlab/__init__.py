"""alignlab: train language models from feedback."""

__version__ = "0.1.0"
