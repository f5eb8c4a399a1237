"""Which backbone a directory holds, and loading it (docs/method.md §3 "Backbones").

A MoCa backbone is either a cmpt :class:`~cmpt.vlm.model.VisionLanguageModel` directory (e.g. a
CoMP stage-III ``final/``: "CoMP → MoCa") or a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint,
loaded through transformers' own classes (:class:`~cmpt.embed.qwen_vl.QwenVLBackbone`). An Embedder
directory is one of these with an ``embedder_config.json`` beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from cmpt.hub import missing_path_error, read_json

__all__ = ["BACKBONE_KWARGS", "QWEN_VL_TYPES", "backbone_kind", "load_backbone"]

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
#: The keyword arguments of :func:`load_backbone` (what ``Embedder.from_pretrained`` passes on).
BACKBONE_KWARGS = ("dtype", "attn_implementation", "weights")


def backbone_kind(path: str | Path) -> str:
    """``"cmpt"`` (a VisionLanguageModel directory) or ``"qwen_vl"``; ``ValueError`` naming what the
    directory holds otherwise (a path that does not exist: :func:`cmpt.hub.missing_path_error`)."""
    d = Path(path)
    if not d.exists():
        raise missing_path_error(path, "backbone")
    if (d / "vlm_config.json").is_file():
        return "cmpt"
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{d}: neither a cmpt VLM directory (vlm_config.json) nor a Hugging Face checkpoint (config.json)"
        )
    cfg = read_json(cfg_file)
    if cfg.get("model_type") in QWEN_VL_TYPES:
        return "qwen_vl"
    raise ValueError(
        f"{d}: unsupported architecture {cfg.get('architectures') or cfg.get('model_type')!r}; MoCa "
        f"backbones are cmpt VLM directories and Hugging Face model types {list(QWEN_VL_TYPES)}"
    )


def load_backbone(
    path: str | Path, *, dtype: Any = None, attn_implementation: str | None = None, weights: bool = True
) -> nn.Module:
    """The backbone in ``path`` (eval mode); ``dtype`` of the LLM (default float32) and its
    ``attn_implementation`` (default: transformers' choice); ``weights=False``: its skeleton on the
    meta device, no weight file read (FSDP2 ranks > 0, docs/method.md §6). A directory being
    written, or left half-written, by cmpt is refused (:func:`cmpt.io_atomic.check_loadable`)."""
    from cmpt.io_atomic import check_loadable

    check_loadable(path)
    if backbone_kind(path) == "cmpt":
        from cmpt.vlm.model import VisionLanguageModel

        llm_kwargs = {"attn_implementation": attn_implementation} if attn_implementation else None
        return VisionLanguageModel.from_pretrained(path, dtype=dtype, llm_kwargs=llm_kwargs, weights=weights)
    from cmpt.embed.qwen_vl import QwenVLBackbone

    return QwenVLBackbone.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, weights=weights
    )
