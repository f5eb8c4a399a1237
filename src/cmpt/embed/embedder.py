"""``cmpt.Embedder``: a VLM used as a bidirectional multimodal embedding model (docs/method.md §3).

An input is an optional instruction, optional images and optional text. It is rendered as plain
text — no chat template — ``instruction \\n <image> … \\n text`` (or the text's own ``<image>``
placeholders, for interleaved inputs), each image expanded to its merged vision tokens. The backbone
runs with **bidirectional** attention; the embedding is the mean of the last hidden states (after
the final norm) over the input's tokens, L2-normalized (``attention="causal"`` in the config gives
the same pooling over the VLM as it was: the baseline of the MoCa tables). Inputs are packed into
micro-batches by a token budget (padding-free, so an embedding never depends on the other inputs
of its batch).

An Embedder directory is the backbone's own directory (a cmpt VLM, or a Hugging Face Qwen2-VL /
Qwen2.5-VL checkpoint that transformers still loads) plus ``embedder_config.json`` and the model
card ``README.md`` (:mod:`cmpt.model_card`). Over a cmpt VLM, its ``config.json`` says
``model_type: cmpt_embedder`` (transformers' Auto classes, :mod:`cmpt.hf_auto`); over a Qwen-VL
checkpoint, ``config.json`` stays transformers' own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cmpt.embed.backbones import BACKBONE_KWARGS, load_backbone
from cmpt.encode import budget_batches
from cmpt.host_tensor import to_device_async
from cmpt.hub import read_json
from cmpt.pooling import segment_mean
from cmpt.prefetch import check_workers, ordered_map
from cmpt.vision.image_io import ImageSource
from cmpt.vlm.chat import IMAGE_TOKEN, encode_text_with_images, plain_input

__all__ = ["EMBEDDER_CONFIG", "POOLINGS", "Embedder", "EmbedderConfig"]

EMBEDDER_CONFIG = "embedder_config.json"
#: The implemented ``EmbedderConfig.pooling`` values (docs/method.md §3): the mean over the input's tokens.
POOLINGS = ("mean",)
#: inputs rendered, sorted and packed together by :meth:`Embedder.encode`; their images are
#: preprocessed up to one window ahead of the forward
RENDER_WINDOW = 64


@dataclass
class EmbedderConfig:
    """How inputs become embeddings (stored as ``embedder_config.json``). ``pooling`` must be one of
    :data:`POOLINGS`: another value would be saved but not applied."""

    max_length: int = 1280  # tokens per input (text is cut after its last image; images never are)
    batch_tokens: int = 8192  # tokens per forward
    pooling: str = "mean"
    normalize: bool = True
    attention: str = "bidirectional"  # "causal": the VLM as it was (a baseline; MoCa is bidirectional)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not implemented; accepted: {list(POOLINGS)}")

    @classmethod
    def from_file(cls, path: Path) -> EmbedderConfig:
        """The config stored in ``path`` (an ``embedder_config.json``); a ``ValueError`` names the file."""
        data = read_json(path)
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:  # an unknown key, or a value the config refuses
            raise ValueError(f"{path}: {e}") from e


def _one(x: Any, name: str) -> bool:
    """Whether ``x`` is one entry of ``name``, not a sequence of entries: a string, or for
    ``images`` one image (path, bytes or PIL image: :data:`cmpt.vision.image_io.ImageSource`)."""
    return x is None or isinstance(x, str) or (name == "images" and isinstance(x, ImageSource))


def _as_list(x: Any, n: int, name: str) -> list[Any]:
    """``x`` for each of ``n`` inputs: one entry (:func:`_one`) repeated, or ``n`` entries."""
    if _one(x, name):
        return [x] * n
    x = list(x)
    if len(x) != n:
        raise ValueError(f"{name} has {len(x)} entries for {n} inputs")
    return x


def _count(texts: Any, images: Any) -> int:
    """The number of inputs: the length of ``texts`` or ``images`` given as sequences, else one
    input when either holds a single entry (a string, one image), else none."""
    for x, name in ((texts, "texts"), (images, "images")):
        if not _one(x, name):
            return len(x)
    return int(texts is not None or images is not None)


def _check_entries(entries: list[Any], name: str) -> None:
    """Each entry of ``texts`` / ``instructions`` is a string or None; each of ``images`` None, one
    image (:data:`~cmpt.vision.image_io.ImageSource`) or a list/tuple of images. A ``TypeError``
    names the input's index."""
    for i, x in enumerate(entries):
        if name == "images":
            bad = [
                im for im in (x if isinstance(x, (list, tuple)) else [x]) if not isinstance(im, ImageSource)
            ]
            ok = x is None or not bad
            want = "None, one image (PIL image, path, bytes, numpy array or torch tensor) or a list of images"
        else:
            ok, bad, want = x is None or isinstance(x, str), [x], "a string or None"
        if not ok:
            raise TypeError(
                f"encode: {name}[{i}] must be {want}, got {type(bad[0]).__name__}"
                f"{f' ({bad[0]!r})' if isinstance(bad[0], (int, float)) else ''}"
            )


class Embedder:
    """``Embedder(backbone)`` or :meth:`from_pretrained`; :meth:`encode` gives ``(B, D)`` embeddings."""

    def __init__(self, backbone: nn.Module, config: EmbedderConfig | None = None, **overrides: Any) -> None:
        self.backbone = backbone
        self.config = EmbedderConfig(**{**asdict(config or EmbedderConfig()), **overrides})
        self.loaded_from: Path | None = getattr(backbone, "loaded_from", None)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device | None = None, **kwargs: Any
    ) -> Embedder:
        """An Embedder directory, a cmpt VLM directory or a Hugging Face Qwen2-VL / Qwen2.5-VL
        checkpoint, local or by hub id (:func:`cmpt.hub.local_model_dir`) (docs/method.md §3).
        ``kwargs``: :class:`EmbedderConfig` fields override the saved config, as in
        ``Embedder(backbone, **overrides)`` (``normalize=False``, ``max_length=``, ...); the rest go
        to :func:`cmpt.embed.backbones.load_backbone` (``dtype``, ``attn_implementation``,
        ``weights``: False builds the backbone on the meta device); anything else is a ``TypeError``
        naming it, before any weight is read. ``loaded_from`` is the directory."""
        from cmpt.hub import local_model_dir

        names = {f.name for f in fields(EmbedderConfig)}
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        unknown = sorted(set(kwargs) - set(BACKBONE_KWARGS))
        if unknown:
            raise TypeError(
                f"Embedder.from_pretrained got unsupported arguments {unknown}; it takes device, "
                f"{', '.join(BACKBONE_KWARGS)} (the backbone) and the EmbedderConfig fields {sorted(names)}"
            )
        d = local_model_dir(path, "Embedder", must_exist=True)
        cfg_file = d / EMBEDDER_CONFIG
        saved = EmbedderConfig.from_file(cfg_file) if cfg_file.is_file() else EmbedderConfig()
        config = EmbedderConfig(**{**asdict(saved), **overrides})  # refused before loading weights
        backbone = load_backbone(d, **kwargs)
        if device is not None:
            backbone.to(device)
        emb = cls(backbone, config)
        emb.loaded_from = d
        return emb

    def save_pretrained(self, directory: str | Path) -> Path:
        """The backbone's directory plus ``embedder_config.json`` and the model card; over a cmpt VLM
        also ``config.json`` with ``model_type: cmpt_embedder``; atomically (:mod:`cmpt.io_atomic`)."""
        from cmpt.hf_auto import EMBEDDER_TYPE, write_auto_config
        from cmpt.io_atomic import atomic_directory
        from cmpt.model_card import write_model_card
        from cmpt.vlm.io import VLM_CONFIG_NAME

        with atomic_directory(directory, writer="Embedder.save_pretrained") as out:
            self.backbone.save_pretrained(out)
            (out / EMBEDDER_CONFIG).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
            if (out / VLM_CONFIG_NAME).is_file():  # a cmpt VLM; a Qwen-VL keeps transformers' config.json
                write_auto_config(out, EMBEDDER_TYPE, **asdict(self.backbone.config), **asdict(self.config))
            write_model_card(out, sources=[self.loaded_from])
        return Path(directory)

    # ------------------------------------------------------------------ rendering
    def _images(self, images: list[Any]) -> Any:
        """The preprocessed images of one input (``PackedImages``), or None: run ahead in threads."""
        return self.backbone.processor(images) if images else None

    @staticmethod
    def _text(text: str | None, n_images: int, instruction: str | None, i: int) -> str:
        """The plain text of input ``i`` (:func:`cmpt.vlm.chat.plain_input`); an empty input or a
        placeholder count that is not its image count is a ``ValueError`` naming ``i``."""
        placeholders = (text or "").count(IMAGE_TOKEN)
        if placeholders and placeholders != n_images:
            raise ValueError(
                f"encode: input {i}: its text has {placeholders} {IMAGE_TOKEN} placeholder(s) but "
                f"{n_images} image(s) were passed with it; pass one image per {IMAGE_TOKEN} in "
                f"images[{i}] (a list for several), or drop the placeholders"
            )
        full = plain_input(text, n_images, instruction)
        if not full:
            raise ValueError(f"input {i} is empty: give a text, an image or an instruction")
        return full

    def _render(self, full: str, packed: Any, i: int) -> tuple:
        """``(ids, packed images)`` of input ``i``: its text (:meth:`_text`) tokenized with each
        image's merged tokens, its images preprocessed (:meth:`_images`)."""
        bb = self.backbone
        m2 = bb.config.merge_size**2
        n_tokens = [] if packed is None else [int(h) * int(w) // m2 for h, w in packed.grid_hw.tolist()]
        ids = encode_text_with_images(full, bb.tokenizer, n_tokens, sample_id=str(i))
        if len(ids) > self.config.max_length:
            ends = (ids == bb.config.vision_end_id).nonzero()
            keep = max(self.config.max_length, int(ends[-1]) + 1 if len(ends) else 0)
            ids = ids[:keep]
        return ids, packed

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str | None] | str | None = None,
        images: Sequence[Any] | None = None,
        instructions: Sequence[str | None] | str | None = None,
        *,
        batch_tokens: int | None = None,
        progress: bool | None = None,
        workers: int | None = None,
    ) -> torch.Tensor:
        """Embeddings ``(B, D)`` (float32, CPU, L2-normalized) of B inputs.

        ``texts``: B strings (or None entries), or one string; ``images``: B entries, each None,
        one image (PIL, path, bytes, numpy array or torch tensor: :func:`cmpt.vision.image_io.load_image`)
        or a list of images, or one image (an input of its own, or
        the image of every text); ``instructions``: one string for all inputs or B entries.
        ``progress``: a progress bar (default: for more than 256 inputs). A text with ``<image>``
        placeholders (interleaved) needs as many images in its entry. A wrong entry is a
        ``TypeError`` / ``ValueError`` naming its index (docs/method.md §3 ``cmpt.Embedder``).
        ``workers``: threads that load and preprocess images ahead of the forward (default
        :func:`cmpt.prefetch.default_workers`; 0: in this thread); at most about two windows of
        :data:`RENDER_WINDOW` inputs are held preprocessed at once, whatever the number of inputs.
        """
        if batch_tokens is not None and batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1 (tokens per forward), got {batch_tokens}")
        check_workers(workers)
        n = _count(texts, images)
        if n == 0:
            raise ValueError("encode needs texts or images")
        texts_l = _as_list(texts, n, "texts")
        images_raw = _as_list(images, n, "images")
        instr_l = _as_list(instructions, n, "instructions")
        for entries, name in ((texts_l, "texts"), (images_raw, "images"), (instr_l, "instructions")):
            _check_entries(entries, name)
        images_l = [
            [] if x is None else (list(x) if isinstance(x, (list, tuple)) else [x]) for x in images_raw
        ]
        full = [self._text(texts_l[i], len(images_l[i]), instr_l[i], i) for i in range(n)]  # checked first
        budget = batch_tokens or self.config.batch_tokens
        # images preprocessed by `workers` threads up to a window ahead; a window's inputs are
        # rendered, sorted longest first and packed by the token budget (docs/method.md §7)
        if not any(images_l):  # text only: nothing to prepare, no threads
            workers = 0
        prepared = ordered_map(self._images, images_l, workers=workers, ahead=RENDER_WINDOW)
        was_training = self.backbone.training
        self.backbone.eval()
        out = torch.empty(n, self.backbone.lm_head.weight.shape[1])
        show = progress if progress is not None else n > 256
        try:
            with tqdm(total=n, desc="embedding", unit="input", disable=not show) as bar:
                for start in range(0, n, RENDER_WINDOW):
                    window = range(start, min(n, start + RENDER_WINDOW))
                    rendered = {i: self._render(full[i], next(prepared), i) for i in window}
                    order = sorted(window, key=lambda i: -len(rendered[i][0]))
                    # one read-back per window, not per forward: the device runs on while forwards are queued
                    queued = [
                        self._forward([rendered[order[j]] for j in group])
                        for group in budget_batches([len(rendered[i][0]) for i in order], budget)
                    ]
                    out[order] = torch.cat(queued).float().cpu()
                    bar.update(len(window))
        finally:
            prepared.close()
            self.backbone.train(was_training)
        return out

    def _forward(self, items: list[tuple]) -> torch.Tensor:
        bb = self.backbone
        ids = torch.cat([x[0] for x in items])
        lengths = [len(x[0]) for x in items]
        cu = torch.tensor([0, *lengths]).cumsum(0)
        imgs = [x[1] for x in items if x[1] is not None]
        kwargs: dict[str, Any] = {}
        if imgs:
            kwargs = dict(
                patches=bb.prepare_patches(to_device_async(torch.cat([p.patches for p in imgs]), bb.device)),
                grid_hw=torch.cat([p.grid_hw for p in imgs]),
                images_per_sample=torch.tensor([0 if x[1] is None else len(x[1].grid_hw) for x in items]),
            )
        hidden = bb(ids, cu, attention=self.config.attention, **kwargs).hidden
        pooled = segment_mean(hidden, lengths)
        return F.normalize(pooled, dim=-1) if self.config.normalize else pooled
