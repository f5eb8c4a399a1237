"""cmpt.eval: benchmark scorers, frozen-feature probes, VQA, resolution sweep, retrieval (docs/method.md §5).

Submodules are imported lazily (``cmpt.eval.linear_probe`` imports :mod:`cmpt.eval.probe` on first
use), so importing :mod:`cmpt.eval.metrics` alone stays cheap.

* :mod:`~cmpt.eval.metrics`: relaxed accuracy, ANLS, VQA accuracy, Recall@k, P@1, nDCG, mIoU.
* :mod:`~cmpt.eval.features`: ``extract_features`` / ``extract_patch_maps`` (native resolution).
* :mod:`~cmpt.eval.probe`: ``linear_probe`` (DINOv2 protocol, scaled down), ``probe_main``.
* :mod:`~cmpt.eval.segmentation`: ``seg_probe`` (BN + 1×1 head, mIoU), ``seg_main``.
* :mod:`~cmpt.eval.vqa`: ``evaluate_vqa``, ``caption_loss``, ``vqa_main``.
* :mod:`~cmpt.eval.resolution`: ``resolution_sweep`` (paper Fig. 3), ``resolution_main``.
* :mod:`~cmpt.eval.retrieval`: ``retrieval_eval`` (image↔text Recall@k), ``retrieval_main``.
* :mod:`~cmpt.eval.lmms_eval_plugin`: ``CmptLMMS`` for ``lmms_eval --model cmpt``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "extract_features": "features",
    "extract_patch_maps": "features",
    "linear_probe": "probe",
    "probe_main": "probe",
    "seg_probe": "segmentation",
    "seg_main": "segmentation",
    "evaluate_vqa": "vqa",
    "caption_loss": "vqa",
    "vqa_main": "vqa",
    "resolution_sweep": "resolution",
    "resolution_main": "resolution",
    "retrieval_eval": "retrieval",
    "retrieval_main": "retrieval",
    "CmptLMMS": "lmms_eval_plugin",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cmpt.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cmpt.eval.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
