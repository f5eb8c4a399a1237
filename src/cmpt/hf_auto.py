"""cmpt's directories behind transformers' Auto classes (docs/method.md §1, §2 "Assembly", §3 "Backbones").

After ``import cmpt`` (which calls :func:`register_auto_classes`), ``AutoConfig.from_pretrained``
and ``AutoModel.from_pretrained`` read a NativeViT directory (``model_type: cmpt_native_vit``), a
VLM directory (``cmpt_vlm``) and an Embedder directory over a cmpt VLM (``cmpt_embedder``): each
carries a ``config.json`` with its ``model_type`` (:func:`auto_config_fields`), besides cmpt's own
files. The model classes are thin :class:`~transformers.PreTrainedModel` wrappers: their
``from_pretrained`` is cmpt's own loader (so the outputs are the same, bit for bit), ``forward``
calls the wrapped module, ``save_pretrained`` writes the cmpt directory again (locally: upload it
with ``hf upload``, docs/architecture.md "Sharing models"). Hub ids resolve through
:func:`cmpt.hub.local_model_dir`.

``from_pretrained`` arguments (:mod:`cmpt.hf_auto_load`): a config field (``rope=True``,
``normalize=False``) or a changed ``config=`` reaches cmpt's loader as an override where the loader
takes it, else is one error naming it; ``dtype`` is a torch dtype, its name or ``"auto"`` (the
saved dtype); ``device_map`` is one device; ``attn_implementation`` goes to a VLM's or Embedder's
language model (a NativeViT takes its ``attn`` field). Nothing transformers hands over is dropped
silently.

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
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PretrainedConfig, PreTrainedModel

from cmpt.hf_auto_load import AUTO_KEYS, fitting, prepare, saved_dtype
from cmpt.vision.vit import NativeViT, NativeViTConfig

__all__ = ["AUTO_KEYS", "CmptEmbedderModel", "CmptNativeViTModel", "CmptVLMModel", "auto_config_fields"]
__all__ += ["register_auto_classes", "write_auto_config"]

VIT_TYPE, VLM_TYPE, EMBEDDER_TYPE = "cmpt_native_vit", "cmpt_vlm", "cmpt_embedder"
#: keys of a ``config.json`` that are transformers' (cmpt's own config readers skip them)
_ARCH = {VIT_TYPE: "CmptNativeViTModel", VLM_TYPE: "CmptVLMModel", EMBEDDER_TYPE: "CmptEmbedderModel"}
_UPLOAD = "cmpt writes a local directory: save it, then upload it with `hf upload REPO DIR`"


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


def _with_attention(config: PretrainedConfig, backbone: Any) -> PretrainedConfig:
    """``config`` recording the attention implementation the backbone's language model runs."""
    from cmpt.vlm.text_attention import attn_implementation

    config._attn_implementation = attn_implementation(backbone.attention_owner)
    return config


def _not_from_config(what: str, how: str) -> ValueError:
    return ValueError(
        f"a cmpt {what} cannot be built from its config.json alone (it records where its parts came "
        f"from, not their architectures): load a directory with AutoModel.from_pretrained(DIR), or {how}"
    )


class _CmptWrapper(PreTrainedModel):
    """Shared parts: no transformers weight initialisation (the wrapped module has its weights),
    transformers' attention names (the wrapped language model runs them: docs/method.md §7), and
    ``save_pretrained`` writing cmpt's own directory (docs/architecture.md "Sharing models")."""

    # the implementations the wrapped language model takes; transformers checks the one recorded on
    # the wrapper's config against these flags
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    #: what the model is, in messages and for :func:`cmpt.hub.local_model_dir`
    what: ClassVar[str]
    #: the attribute holding the wrapped cmpt module, which saves the directory
    cmpt_part: ClassVar[str]

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the wrapped cmpt module, never from transformers' initialisation."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        push_to_hub: bool = False,
        safe_serialization: bool = True,
        **hf_options: Any,
    ) -> None:
        """The wrapped module's directory (safetensors); transformers' other saving options (sharding,
        ``state_dict``, ...) do not apply to cmpt's layout and are refused, as is ``push_to_hub``."""
        if push_to_hub:
            raise ValueError(f"save_pretrained(push_to_hub=True): {_UPLOAD}")
        if not safe_serialization:
            raise ValueError("save_pretrained(safe_serialization=False): cmpt writes safetensors only")
        if hf_options:
            raise TypeError(
                f"save_pretrained of a {self.what} takes save_directory only (cmpt writes its own "
                f"directory layout); got {sorted(hf_options)}"
            )
        getattr(self, self.cmpt_part).save_pretrained(save_directory)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Refused: cmpt writes a local directory, which ``hf upload`` publishes."""
        raise NotImplementedError(f"{type(self).__name__}.push_to_hub: {_UPLOAD}")


class CmptNativeViTModel(_CmptWrapper):
    """:class:`~cmpt.vision.vit.NativeViT` behind ``AutoModel``: ``forward(patches, grid_hw)``."""

    config_class = CmptNativeViTConfig
    base_model_prefix = "vit"
    main_input_name = "patches"
    what = "NativeViT"
    cmpt_part = "vit"

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
        """``NativeViT.from_pretrained`` (docs/method.md §1) with ``dtype`` (a torch dtype, its name,
        or ``"auto"``: the saved one), ``device_map`` (one device) and NativeViT config fields as
        overrides (``rope=True``, ``attn="flex"``, ...: :func:`prepare`). The attention backend is
        the ``attn`` field; ``attn_implementation`` (a language model's) is refused."""
        from cmpt.vision.attention import BACKENDS

        names = [f.name for f in fields(NativeViTConfig)]
        load = prepare(cls, pretrained_model_name_or_path, args, config, kwargs, names)
        if load.attn_implementation is not None:
            raise ValueError(
                f"attn_implementation={load.attn_implementation!r}: a NativeViT takes its attention "
                f"backend as attn=, one of {BACKENDS}"
            )
        with fitting(load):
            vit = NativeViT.from_pretrained(load.directory, load.device, **load.overrides)
        dtype = saved_dtype(load.directory) if load.dtype == "auto" else load.dtype
        if dtype is not None:
            vit.to(dtype)
        return cls(load.config, vit)


class CmptVLMModel(_CmptWrapper):
    """:class:`~cmpt.vlm.model.VisionLanguageModel` behind ``AutoModel``: ``forward`` is the VLM's
    (``input_ids, cu_seqlens, patches=, grid_hw=, images_per_sample=, attention=`` → ``VLMOutput``)."""

    config_class = CmptVLMConfig
    base_model_prefix = "vlm"
    main_input_name = "input_ids"
    what = "cmpt VLM"
    cmpt_part = "vlm"

    def __init__(self, config: CmptVLMConfig, vlm: torch.nn.Module | None = None) -> None:
        if vlm is None:  # AutoModel.from_config
            raise _not_from_config("VLM", "build one with cmpt.VisionLanguageModel.build(VIT, LLM)")
        super().__init__(config)
        self.vlm = vlm

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped :meth:`VisionLanguageModel.forward`."""
        return self.vlm(*args, **kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, config: Any = None, **kwargs: Any
    ) -> CmptVLMModel:
        """``VisionLanguageModel.from_pretrained`` (docs/method.md §2 "Assembly") with ``dtype`` of
        the LLM (a torch dtype, its name or ``"auto"``), ``device_map`` (one device), the LLM's
        ``attn_implementation``, the ViT's ``rope`` and VLMConfig fields as overrides (:func:`prepare`)."""
        from cmpt.vlm.io import VLMConfig
        from cmpt.vlm.model import VisionLanguageModel

        names = [f.name for f in fields(VLMConfig)]
        load = prepare(cls, pretrained_model_name_or_path, args, config, kwargs, names, extra=("rope",))
        llm_kwargs = {"attn_implementation": load.attn_implementation} if load.attn_implementation else None
        with fitting(load):
            vlm = VisionLanguageModel.from_pretrained(
                load.directory,
                load.device,
                dtype=load.dtype,
                llm_kwargs=llm_kwargs,
                **load.extra,
                **load.overrides,
            )
        return cls(_with_attention(load.config, vlm), vlm)


class CmptEmbedderModel(_CmptWrapper):
    """:class:`cmpt.Embedder` behind ``AutoModel``: ``forward(texts, images, instructions)`` →
    :meth:`Embedder.encode`; the backbone is ``backbone``, the embedder ``embedder``."""

    config_class = CmptEmbedderConfig
    base_model_prefix = "backbone"
    what = "cmpt Embedder"
    cmpt_part = "embedder"

    def __init__(self, config: CmptEmbedderConfig, embedder: Any = None) -> None:
        if embedder is None:  # AutoModel.from_config
            raise _not_from_config(
                "Embedder", "wrap a VLM: cmpt.Embedder(cmpt.VisionLanguageModel.build(VIT, LLM))"
            )
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
        """``Embedder.from_pretrained`` (docs/method.md §3) with ``dtype`` (a torch dtype, its name or
        ``"auto"``), ``device_map`` (one device), the LLM's ``attn_implementation`` and EmbedderConfig
        fields as overrides (``normalize=False``, ``max_length=``, ...: :func:`prepare`)."""
        from cmpt.embed.embedder import Embedder, EmbedderConfig

        hint = (
            "; a field of the backbone VLM takes cmpt.VisionLanguageModel.from_pretrained(DIR, FIELD=...) "
            "wrapped in cmpt.Embedder"
        )
        names = [f.name for f in fields(EmbedderConfig)]
        load = prepare(cls, pretrained_model_name_or_path, args, config, kwargs, names, hint)
        emb = Embedder.from_pretrained(
            load.directory, device=load.device, dtype=load.dtype, attn_implementation=load.attn_implementation
        )
        emb.config = replace(emb.config, **load.overrides)
        return cls(_with_attention(load.config, emb.backbone), emb)


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
