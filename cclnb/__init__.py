"""cclnb: a Jupyter-first, reproducible study of Continual Contrastive Learning (CCL)."""

__version__ = "0.1.0"
