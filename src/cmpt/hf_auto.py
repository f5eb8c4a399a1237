"""cmpt's directories behind transformers' Auto classes (docs/method.md §1, §2 "Assembly", §3 "Backbones").

After ``import cmpt`` (which calls :func:`register_auto_classes`), ``AutoConfig.from_pretrained``
and ``AutoModel.from_pretrained`` read a NativeViT directory (``model_type: cmpt_native_vit``), a
VLM directory (``cmpt_vlm``) and an Embedder directory over a cmpt VLM (``cmpt_embedder``): each
carries a ``config.json`` with its ``model_type`` (:func:`auto_config_fields`), besides cmpt's own
files. The model classes are thin :class:`~transformers.PreTrainedModel` wrappers: their
``from_pretrained`` is cmpt's own loader (so the outputs are the same, bit for bit), ``forward``
calls the wrapped module, ``save_pretrained`` writes the cmpt directory again. Hub ids resolve
through :func:`cmpt.hub.local_model_dir`.

An Embedder over a Hugging Face Qwen2-VL / Qwen2.5-VL keeps that checkpoint's own ``config.json``
(the directory stays a plain transformers checkpoint): the Auto classes give transformers'
Qwen2-VL model, :meth:`cmpt.Embedder.from_pretrained` the embedder.

Registration is idempotent (``exist_ok=True``); a transformers 5.x whose Auto API refuses it only
costs the Auto classes (one warning), never ``import cmpt``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from cmpt.vision.vit import NativeViT, NativeViTConfig

__all__ = ["AUTO_KEYS", "CmptEmbedderModel", "CmptNativeViTModel", "CmptVLMModel", "auto_config_fields"]
__all__ += ["register_auto_classes", "write_auto_config"]

VIT_TYPE, VLM_TYPE, EMBEDDER_TYPE = "cmpt_native_vit", "cmpt_vlm", "cmpt_embedder"
#: keys of a ``config.json`` that are transformers' (cmpt's own config readers skip them)
AUTO_KEYS = ("model_type", "architectures")
_ARCH = {VIT_TYPE: "CmptNativeViTModel", VLM_TYPE: "CmptVLMModel", EMBEDDER_TYPE: "CmptEmbedderModel"}
_HUB_KWARGS = ("revision", "cache_dir", "token")
# what AutoModel.from_pretrained hands every model class; nothing a cmpt loader takes
_AUTO_INTERNAL = ("trust_remote_code", "adapter_kwargs", "_from_auto", "_commit_hash", "code_revision")


def auto_config_fields(model_type: str) -> dict[str, Any]:
    """``model_type`` and ``architectures`` for a cmpt directory's ``config.json``."""
    return {"model_type": model_type, "architectures": [_ARCH[model_type]]}


def write_auto_config(directory: str | os.PathLike, model_type: str, **facts: Any) -> Path:
    """``directory/config.json`` for transformers' Auto classes: the model type and ``facts``."""
    path = Path(directory) / "config.json"
    path.write_text(json.dumps({**auto_config_fields(model_type), **facts}, indent=2) + "\n")
    return path


class CmptNativeViTConfig(PretrainedConfig):
    """A NativeViT directory's ``config.json`` (the :class:`~cmpt.vision.vit.NativeViTConfig` fields)."""

    model_type = VIT_TYPE

    def native(self) -> NativeViTConfig:
        """The :class:`NativeViTConfig` these fields describe."""
        names = [f.name for f in fields(NativeViTConfig) if hasattr(self, f.name)]
        return NativeViTConfig.from_dict({k: getattr(self, k) for k in names})


class CmptVLMConfig(PretrainedConfig):
    """A VLM directory's ``config.json`` (its :class:`~cmpt.vlm.io.VLMConfig` fields); the
    directory's ``vlm_config.json`` stays what cmpt loads."""

    model_type = VLM_TYPE


class CmptEmbedderConfig(PretrainedConfig):
    """An Embedder directory's ``config.json`` (its ``EmbedderConfig`` and ``VLMConfig`` fields)."""

    model_type = EMBEDDER_TYPE


def _load_kwargs(kwargs: dict[str, Any], allowed: tuple[str, ...]) -> tuple[dict, dict]:
    """Split ``from_pretrained`` kwargs into hub arguments and cmpt loader arguments."""
    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    for k in _AUTO_INTERNAL:
        kwargs.pop(k, None)
    if "torch_dtype" in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise TypeError(
            f"from_pretrained of a cmpt directory got unsupported arguments {bad}; it takes {allowed}"
        )
    return hub, kwargs


def _local(path: str | os.PathLike, what: str, hub: dict[str, Any]) -> Path:
    from cmpt.hub import local_model_dir

    return local_model_dir(path, what, **hub)


def _config(cls: type, config: Any, directory: Path) -> PretrainedConfig:
    """The config AutoModel already read, else the directory's."""
    return config if isinstance(config, cls.config_class) else cls.config_class.from_pretrained(directory)


class _CmptWrapper(PreTrainedModel):
    """Shared parts: no transformers weight initialisation (the wrapped module has its weights)."""

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the wrapped cmpt module, never from transformers' initialisation."""


class CmptNativeViTModel(_CmptWrapper):
    """:class:`~cmpt.vision.vit.NativeViT` behind ``AutoModel``: ``forward(patches, grid_hw)``."""

    config_class = CmptNativeViTConfig
    base_model_prefix = "vit"
    main_input_name = "patches"

    def __init__(self, config: CmptNativeViTConfig, vit: NativeViT | None = None) -> None:
        super().__init__(config)
        self.vit = vit if vit is not None else NativeViT(config.native())

    def forward(self, patches: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """Packed patches (N, 3·p·p) in merge-window order + grids (n, 2) → patch features (N, D)."""
        return self.vit(patches, grid_hw)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, config: Any = None, **kwargs: Any
    ) -> CmptNativeViTModel:
        """``NativeViT.from_pretrained`` (``dtype``, ``device_map``: one device, ``rope``, ``attn``, ...)."""
        hub, kw = _load_kwargs(kwargs, ("dtype", "device_map", *(f.name for f in fields(NativeViTConfig))))
        dtype, device = kw.pop("dtype", None), kw.pop("device_map", None)
        d = _local(pretrained_model_name_or_path, "NativeViT", hub)
        vit = NativeViT.from_pretrained(d, device=device, **kw)
        if dtype is not None and dtype != "auto":
            vit.to(dtype)
        return cls(
            config if isinstance(config, CmptNativeViTConfig) else cls.config_class.from_pretrained(d), vit
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **_hf_options: Any) -> None:
        """The NativeViT directory (transformers' sharding / serialization options do not apply)."""
        self.vit.save_pretrained(save_directory)


class CmptVLMModel(_CmptWrapper):
    """:class:`~cmpt.vlm.model.VisionLanguageModel` behind ``AutoModel``: ``forward`` is the VLM's
    (``input_ids, cu_seqlens, patches=, grid_hw=, images_per_sample=, attention=`` → ``VLMOutput``)."""

    config_class = CmptVLMConfig
    base_model_prefix = "vlm"
    main_input_name = "input_ids"

    def __init__(self, config: CmptVLMConfig, vlm: torch.nn.Module) -> None:
        super().__init__(config)
        self.vlm = vlm

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped :meth:`VisionLanguageModel.forward`."""
        return self.vlm(*args, **kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, config: Any = None, **kwargs: Any
    ) -> CmptVLMModel:
        """``VisionLanguageModel.from_pretrained`` (``dtype`` of the LLM, ``device_map``: one device,
        ``attn_implementation``, ``rope``)."""
        from cmpt.vlm.model import VisionLanguageModel

        hub, kw = _load_kwargs(kwargs, ("dtype", "device_map", "attn_implementation", "rope"))
        attn = kw.pop("attn_implementation", None)
        llm_kwargs = {"attn_implementation": attn} if attn else None
        d = _local(pretrained_model_name_or_path, "cmpt VLM", hub)
        vlm = VisionLanguageModel.from_pretrained(d, kw.pop("device_map", None), llm_kwargs=llm_kwargs, **kw)
        return cls(_config(cls, config, d), vlm)

    def save_pretrained(self, save_directory: str | os.PathLike, **_hf_options: Any) -> None:
        """The VLM directory (transformers' sharding / serialization options do not apply)."""
        self.vlm.save_pretrained(save_directory)


class CmptEmbedderModel(_CmptWrapper):
    """:class:`cmpt.Embedder` behind ``AutoModel``: ``forward(texts, images, instructions)`` →
    :meth:`Embedder.encode`; the backbone is ``backbone``, the embedder ``embedder``."""

    config_class = CmptEmbedderConfig
    base_model_prefix = "backbone"

    def __init__(self, config: CmptEmbedderConfig, embedder: Any) -> None:
        super().__init__(config)
        self.backbone = embedder.backbone
        self.embedder = embedder

    def forward(
        self, texts: Any = None, images: Any = None, instructions: Any = None, **kw: Any
    ) -> torch.Tensor:
        """Embeddings ``(B, D)``: :meth:`cmpt.Embedder.encode`."""
        return self.embedder.encode(texts, images, instructions, **kw)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, config: Any = None, **kwargs: Any
    ) -> CmptEmbedderModel:
        """``Embedder.from_pretrained`` (``dtype``, ``device_map``: one device, ``attn_implementation``)."""
        from cmpt.embed.embedder import Embedder

        hub, kw = _load_kwargs(kwargs, ("dtype", "device_map", "attn_implementation"))
        d = _local(pretrained_model_name_or_path, "cmpt Embedder", hub)
        emb = Embedder.from_pretrained(d, device=kw.pop("device_map", None), **kw)
        return cls(_config(cls, config, d), emb)

    def save_pretrained(self, save_directory: str | os.PathLike, **_hf_options: Any) -> None:
        """The Embedder directory (transformers' sharding / serialization options do not apply)."""
        self.embedder.save_pretrained(save_directory)


def register_auto_classes() -> bool:
    """Register the three config and model classes with ``AutoConfig`` / ``AutoModel``; idempotent.
    Returns False (with one warning) when this transformers refuses the registration."""
    from transformers import AutoConfig, AutoModel

    pairs = (
        (CmptNativeViTConfig, CmptNativeViTModel),
        (CmptVLMConfig, CmptVLMModel),
        (CmptEmbedderConfig, CmptEmbedderModel),
    )
    try:
        for cfg_cls, model_cls in pairs:
            AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
            AutoModel.register(cfg_cls, model_cls, exist_ok=True)
    except (TypeError, ValueError, AttributeError) as e:
        import transformers

        warnings.warn(
            f"cmpt: transformers {transformers.__version__} refused cmpt's Auto-class registration "
            f"({type(e).__name__}: {e}); load cmpt directories with cmpt's own from_pretrained",
            stacklevel=2,
        )
        return False
    return True
