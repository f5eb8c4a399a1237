"""The offline demo (``cmpt demo``): synthetic data generators, tiny starting models pretrained
with :mod:`cmpt.train`, the end-to-end run and its report (docs/method.md §4)."""

from .run import run_demo
from .tiny_models import prepare_tiny

__all__ = ["prepare_tiny", "run_demo"]
