"""A cmpt :class:`~cmpt.embed.embedder.Embedder` as an ``mteb`` encoder (docs/method.md §3 "Evaluation").

``mteb`` (optional: ``pip install 'cmpt[mteb]'``, see the README of that extra) evaluates
image/text embedding models through its encoder protocol: ``encode(inputs: DataLoader of batched
dicts, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> (N, D) array``, the
similarity chosen by ``ModelMeta.similarity_fn_name``. :class:`CmptMtebEncoder` implements it on
``mteb.models.AbsEncoder``::

    import mteb
    from cmpt.embed.mteb_model import CmptMtebEncoder

    model = CmptMtebEncoder("runs/moca/final")  # or CmptMtebEncoder(embedder)
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["VidoreArxivQARetrieval"]), cache=None)

**Prompts are explicit** (mteb's own MoCa wrapper shows that image prompts move ViDoRe by about 10
nDCG points). A batch item with

* only an image becomes ``image_prompt`` (default :data:`DOCUMENT_PROMPT`, the page prompt of
  ``cmpt eval embed``) with the image at its ``<image>`` placeholder;
* an image and a text becomes ``image_text_template.format(text=...)`` (default
  :data:`IMAGE_TEXT_TEMPLATE`, MoCa's prompt for an image with a question);
* only a text stays the raw text (as ViDoRe queries are embedded), unless ``task_instructions``
  is set: then queries get mteb's task instruction (``AbsEncoder.get_task_instruction``) as the
  Embedder's instruction line.

Several images in one item get one ``<image>`` line each. Embeddings are L2-normalized float32;
the similarity is cosine (``ScoringFunction.COSINE``), modalities image and text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "cmpt.embed.mteb_model needs the optional `mteb` package: pip install 'cmpt[mteb]'"
    ) from e

from cmpt.embed.embedder import Embedder
from cmpt.vlm.chat import IMAGE_TOKEN

__all__ = ["DOCUMENT_PROMPT", "IMAGE_TEXT_TEMPLATE", "CmptMtebEncoder", "cmpt_model_meta"]

DOCUMENT_PROMPT = "<image>\nRepresent the given document image."
IMAGE_TEXT_TEMPLATE = "<image>\nRepresent the given image with the following question: {text}"
CHUNK = 256  # inputs per Embedder.encode call (the Embedder packs them by its token budget)


def cmpt_model_meta(
    embedder: Embedder, name: str = "cmpt/embedder", path: str | os.PathLike | None = None, **overrides: Any
) -> ModelMeta:
    """mteb ``ModelMeta`` of an Embedder: cosine similarity, image + text, dense, PyTorch.

    ``name`` must read ``organization/model``; with ``path``, ``meta.load_model()`` reloads the
    directory through :class:`CmptMtebEncoder` (mteb then asks for its ``image`` extra).
    """
    bb = embedder.backbone
    fields: dict[str, Any] = dict(
        loader=CmptMtebEncoder,
        loader_kwargs={"path": str(path)} if path is not None else {},
        name=name,
        revision=None,
        release_date=None,
        languages=None,
        n_parameters=sum(p.numel() for p in bb.parameters()),
        memory_usage_mb=None,
        max_tokens=embedder.config.max_length,
        embed_dim=int(bb.lm_head.weight.shape[1]),
        license=None,
        open_weights=None,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch"],
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=False,
        training_datasets=None,
        modalities=["image", "text"],
        model_type=["dense"],
    )
    return ModelMeta(**{**fields, **overrides})


class CmptMtebEncoder(AbsEncoder):
    """mteb encoder over a cmpt Embedder (see the module docstring; docs/method.md §3).

    ``model_name``: an Embedder, or a directory or hub id :meth:`Embedder.from_pretrained` loads
    (an Embedder, a cmpt VLM or a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint); ``path`` overrides it
    (how ``ModelMeta.load_model`` passes the directory). ``batch_tokens``: tokens per forward
    (default: the Embedder's). ``load_kwargs`` go to ``from_pretrained`` (``dtype``, ...).
    """

    def __init__(
        self,
        model_name: str | os.PathLike | Embedder,
        revision: str | None = None,
        *,
        device: str | None = None,
        path: str | os.PathLike | None = None,
        image_prompt: str = DOCUMENT_PROMPT,
        image_text_template: str = IMAGE_TEXT_TEMPLATE,
        task_instructions: bool = False,
        batch_tokens: int | None = None,
        name: str | None = None,
        **load_kwargs: Any,
    ) -> None:
        if isinstance(model_name, Embedder):
            self.model, source = model_name, None
        else:
            source = os.fspath(path if path is not None else model_name)  # a hub id stays a str
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model = Embedder.from_pretrained(source, device=device, **load_kwargs)
        for what, prompt in (("image_prompt", image_prompt), ("image_text_template", image_text_template)):
            if prompt.count(IMAGE_TOKEN) != 1:
                raise ValueError(f"{what} must hold exactly one {IMAGE_TOKEN} placeholder: {prompt!r}")
        self.image_prompt, self.image_text_template = image_prompt, image_text_template
        self.task_instructions, self.batch_tokens = task_instructions, batch_tokens
        label = name or f"cmpt/{Path(source).name if source is not None else 'embedder'}"
        self.mteb_model_meta = cmpt_model_meta(
            self.model, label, source, use_instructions=task_instructions, revision=revision
        )

    @property
    def embedder(self) -> Embedder:
        return self.model

    def render(self, text: str | None, n_images: int) -> str | None:
        """The Embedder text of one item: the explicit prompts of the module docstring."""
        if n_images == 0:
            return text
        prompt = self.image_text_template.format(text=text) if text else self.image_prompt
        return prompt.replace(IMAGE_TOKEN, "\n".join([IMAGE_TOKEN] * n_images), 1)

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """``(N, D)`` float32 embeddings of every item of ``inputs`` (a DataLoader of batched
        dicts with ``text`` and/or ``image`` columns), in order."""
        instruction = None
        if self.task_instructions and prompt_type == PromptType.query:
            instruction = self.get_task_instruction(task_metadata, prompt_type) or None
        out: list[torch.Tensor] = []
        texts: list[str | None] = []
        images: list[list[Any]] = []

        def flush() -> None:
            if texts:
                out.append(
                    self.model.encode(
                        texts,
                        images,
                        instructions=instruction,
                        batch_tokens=self.batch_tokens,
                        progress=False,
                    )
                )
                texts.clear()
                images.clear()

        for batch in inputs:
            n = len(next(iter(batch.values())))
            for i in range(n):
                text = batch["text"][i] if "text" in batch else None
                image = batch["image"][i] if "image" in batch else None
                item_images = (
                    [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
                )
                texts.append(self.render(text or None, len(item_images)))
                images.append(item_images)
                if len(texts) >= CHUNK:
                    flush()
        flush()
        dim = int(self.mteb_model_meta.embed_dim)
        return torch.cat(out).numpy() if out else np.zeros((0, dim), dtype=np.float32)
