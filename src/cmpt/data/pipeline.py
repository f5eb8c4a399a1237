"""From records to training micro-batches: sample building, collation, length index (docs/method.md §2, §4).

``SampleBuilder.build(record, epoch)`` decodes and packs the images (``ImageProcessor.preprocess``,
resized exactly once), renders the conversation with each ``<image>`` expanded to its merged token
count (``h·w/merge²``) and tokenizes the caption of the alignment loss. Everything random (the
caption's answer order) is seeded by a hash of ``(seed, epoch, id)``: a sample is the same whatever
process builds it and whenever, so resuming is exact. Any problem raises :class:`BadSample`.

``collate`` makes the batch dict the VLM consumes; ``LengthIndex`` gives the cheap per-record
``(vision_tokens, text_tokens)`` estimates the token-budget batcher needs, without decoding images.
MoCa's documents are built by :class:`cmpt.data.documents.DocumentBuilder` into the same
:class:`ProcessedSample` (plus ``window_mask``), collated and estimated here too (docs/method.md §3).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from cmpt.data.chat_layout import DEFAULT_CAPTION_PROMPT, caption_conversation
from cmpt.data.sources import BadSample, Record
from cmpt.data.validate import conversation_problems
from cmpt.vision.image_io import ImageLoadError
from cmpt.vision.processor import ImageProcessor
from cmpt.vlm.chat import caption_ids, render_conversation
from cmpt.vlm.vision_tokens import IGNORE_INDEX, IMAGE_TOKEN, VISION_TOKENS, ConversationError

__all__ = [
    "BadSample",
    "LengthIndex",  # noqa: F822 - from cmpt.data.length_index, through __getattr__
    "ProcessedSample",
    "SampleBuilder",
    "collate",
    "decode_image",
    "estimate_lengths",
    "length_overhead",
    "sample_seed",
    "template_overhead",
    "vision_tokens",
]

log = logging.getLogger("cmpt.data")


def sample_seed(seed: int, epoch: int, sample_id: str) -> int:
    """A 64-bit seed from ``(seed, epoch, id)``, the same in every process (unlike ``hash()``)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{int(epoch)}\x00{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass
class ProcessedSample:
    """One built sample: packed image patches (merge-window order) and tokenized text (docs/method.md §2)."""

    id: str
    patches: torch.Tensor  # (n_i, 3·p·p) float32, all images of the sample concatenated
    grids: list[tuple[int, int]]  # (h, w) in patches, per image
    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long, IGNORE_INDEX outside assistant tokens; not shifted
    caption_ids: torch.Tensor  # (Tc,) long; empty when the sample has no image or no caption
    num_image_tokens: list[int] = field(default_factory=list)  # merged tokens per image
    truncated: bool = False
    # MoCa documents only (docs/method.md §3): (Σ num_image_tokens,) bool, one MAE draw per merged
    # window in <|image_pad|> order; None for CoMP samples
    window_mask: torch.Tensor | None = None


def decode_image(processor: ImageProcessor, record: Record, i: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patches (merge-window order) and ``(h, w)`` grid of image ``i`` of ``record``; any problem
    raises :class:`BadSample` (``missing_image``, ``unreadable_image``, ``zero_size_image``,
    ``extreme_aspect_ratio``, ``path_escape``, ``bad_value``) (docs/method.md §4)."""
    src = record.image_source(i)  # bytes (tar / HF sources) or a resolved path
    label = record.image_label(i)
    if isinstance(src, str) and not os.path.isfile(src):
        raise BadSample(record.id, "missing_image", f"{label}: no such file ({src})")
    try:
        return processor.preprocess(src, name=None if isinstance(src, str) else label)
    except ImageLoadError as e:
        raise BadSample(record.id, e.reason, str(e)) from None
    except ValueError as e:  # smart_resize: aspect ratio above 200
        raise BadSample(record.id, "extreme_aspect_ratio", str(e)) from None
    except OSError as e:
        raise BadSample(record.id, "unreadable_image", f"{label}: {e}") from None


class SampleBuilder:
    """Record → :class:`ProcessedSample` (docs/method.md §2, §4); deterministic per ``(seed, epoch, id)``.

    ``max_text_tokens``: longer conversations are truncated (never inside an image span: such a
    sample is bad, ``too_long``). ``caption_max_tokens``: the caption (the answers joined by spaces,
    shuffled when ``shuffle_caption``, as the official CoMP) is cut to this length; text-only samples
    get an empty caption, so they take no part in the alignment loss. ``caption_prompt``: the user
    turn of image–caption records (``data.caption_prompt``; the record is rendered as user
    ``"<image>\n" + caption_prompt``, assistant = its caption, docs/method.md §2.1).
    """

    def __init__(
        self,
        processor: ImageProcessor,
        tokenizer: Any,
        *,
        max_text_tokens: int = 2048,
        caption_max_tokens: int = 256,
        merge_size: int | None = None,
        shuffle_caption: bool = True,
        seed: int = 0,
        caption_prompt: str = DEFAULT_CAPTION_PROMPT,
    ) -> None:
        self.merge_size = processor.merge_size if merge_size is None else int(merge_size)
        if self.merge_size != processor.merge_size:
            raise ValueError(f"merge_size={merge_size} differs from the processor's {processor.merge_size}")
        missing = [t for t in VISION_TOKENS if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
        if missing:
            raise ValueError(
                f"the tokenizer lacks {missing}: call cmpt.vlm.vision_tokens.ensure_vision_tokens(tokenizer) "
                "and resize the LLM's embeddings before building samples"
            )
        self.processor, self.tokenizer = processor, tokenizer
        self.max_text_tokens, self.caption_max_tokens = int(max_text_tokens), int(caption_max_tokens)
        self.shuffle_caption, self.seed = bool(shuffle_caption), int(seed)
        self.caption_prompt = caption_prompt

    def _image(self, record: Record, i: int) -> tuple[torch.Tensor, tuple[int, int]]:
        return decode_image(self.processor, record, i)

    def build(self, record: Record, epoch: int = 0) -> ProcessedSample:
        """Build one sample; raises :class:`BadSample` (with a reason of ``REASONS``) on any problem."""
        problems = conversation_problems(record)  # cheap: before decoding any image
        if problems:
            raise BadSample(record.id, *problems[0])
        patches, grids = [], []
        for i in range(len(record.images)):
            p, hw = self._image(record, i)
            patches.append(p)
            grids.append((int(hw[0]), int(hw[1])))
        m2 = self.merge_size**2
        n_tokens = [h * w // m2 for h, w in grids]
        rng = random.Random(sample_seed(self.seed, epoch, record.id)) if self.shuffle_caption else None
        convs = record.conversations
        if record.is_caption:  # an image–caption record: the configured prompt (docs/method.md §2.1)
            convs = caption_conversation(record.caption, self.caption_prompt)
        try:
            r = render_conversation(
                convs,
                self.tokenizer,
                n_tokens,
                max_length=self.max_text_tokens,
                sample_id=record.id,
                caption_rng=rng,
            )
        except ConversationError as e:
            raise BadSample(record.id, e.reason, str(e)) from None
        if grids and self.caption_max_tokens > 0:
            cap = caption_ids(r.caption, self.tokenizer, self.caption_max_tokens)
        else:
            cap = torch.zeros(0, dtype=torch.long)
        if patches:
            all_patches = torch.cat(patches) if len(patches) > 1 else patches[0]
        else:
            all_patches = torch.zeros((0, self.processor.patch_dim), dtype=torch.float32)
        return ProcessedSample(
            record.id, all_patches, grids, r.input_ids, r.labels, cap, n_tokens, r.truncated
        )


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)


def collate(samples: list[ProcessedSample], *, num_bad: int = 0) -> dict[str, Any]:
    """Concatenate built samples into the VLM's padding-free batch dict (docs/method.md §4, §7).

    Text is packed: ``input_ids`` / ``labels`` ``(N,)`` hold the samples back to back, cut by
    ``cu_seqlens`` ``(B + 1,)``; ``labels`` are not shifted (the objective shifts them inside each
    sequence) and ``num_loss_tokens`` counts the supervised positions after that shift. Captions
    likewise: ``caption_ids`` cut by ``caption_cu_seqlens`` (empty for samples without a caption,
    e.g. text-only ones; ``num_align`` counts the others). Images: ``patches`` / ``grid_hw`` of all
    samples and ``images_per_sample``. ``num_bad``: bad samples dropped from this micro-batch (and
    from skipped all-bad ones before it). The model decides whether the text then runs packed or
    padded (``data.packing``).

    MoCa documents (samples with a ``window_mask``, docs/method.md §3) add ``mae_mask`` (bool, the
    samples' window masks back to back: entry ``j`` is the ``j``-th ``<|image_pad|>`` of
    ``input_ids`` and patch rows ``[j·m², (j+1)·m²)`` of ``patches``), ``num_mlm_tokens`` (labels
    ``!= -100``; MLM labels are not shifted) and ``num_mae_windows`` (``mae_mask.sum()``).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    lengths = [len(s.input_ids) for s in samples]
    labels = torch.cat([s.labels for s in samples])
    supervised = sum(int((s.labels[1:] != IGNORE_INDEX).sum()) for s in samples)
    grids = [g for s in samples for g in s.grids]
    patches = torch.cat([s.patches for s in samples]).to(torch.float32)
    if patches.shape[0] != sum(h * w for h, w in grids):
        raise ValueError(f"{patches.shape[0]} patch rows for grids {grids}")
    out = {
        "input_ids": torch.cat([s.input_ids for s in samples]).long(),
        "cu_seqlens": _cu(lengths),
        "labels": labels.long(),
        "patches": patches,
        "grid_hw": torch.tensor(grids, dtype=torch.long).view(-1, 2),
        "images_per_sample": torch.tensor([len(s.grids) for s in samples], dtype=torch.long),
        "caption_ids": torch.cat([s.caption_ids for s in samples]).long(),
        "caption_cu_seqlens": _cu([len(s.caption_ids) for s in samples]),
        "num_loss_tokens": supervised,
        "num_align": sum(1 for s in samples if s.grids and len(s.caption_ids) > 0),
        "num_tokens": sum(lengths),
        "num_vision_tokens": sum(sum(s.num_image_tokens) for s in samples),
        "num_samples": len(samples),
        "num_bad": int(num_bad),
        "sample_ids": [s.id for s in samples],
    }
    if any(s.window_mask is not None for s in samples):
        masks = [
            s.window_mask
            if s.window_mask is not None
            else torch.zeros(sum(s.num_image_tokens), dtype=torch.bool)
            for s in samples
        ]
        mae = torch.cat(masks).bool()
        if mae.numel() != out["num_vision_tokens"]:
            raise ValueError(
                f"{mae.numel()} window-mask entries for {out['num_vision_tokens']} vision tokens"
            )
        out["mae_mask"] = mae
        out["num_mlm_tokens"] = int((labels != IGNORE_INDEX).sum())
        out["num_mae_windows"] = int(mae.sum())
    return out


def template_overhead(tokenizer: Any) -> tuple[int, int]:
    """``(base, per_turn)`` tokens the chat template adds around the turn contents (measured once)."""
    try:
        c = len(tokenizer("a", add_special_tokens=False)["input_ids"]) + len(
            tokenizer("b", add_special_tokens=False)["input_ids"]
        )
        one = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
        n1 = len(render_conversation(one, tokenizer, []).input_ids)
        n2 = len(render_conversation(one + one, tokenizer, []).input_ids)
        per_turn = max(0, (n2 - n1 - c) // 2)
        return max(0, n1 - c - 2 * per_turn), per_turn
    except Exception:  # an unusual template: a generous guess
        return 16, 8


def length_overhead(builder: Any) -> tuple[int, int]:
    """The ``(base, per_turn)`` text overhead of a builder's rendering of conversation records: its
    ``length_overhead`` attribute when it has one (a plain-text builder such as MoCa's), else the
    chat template's (:func:`template_overhead`)."""
    own = getattr(builder, "length_overhead", None)
    return tuple(own) if own is not None else template_overhead(builder.tokenizer)  # type: ignore[return-value]


def vision_tokens(record: Record, processor: ImageProcessor) -> int | None:
    """Merged vision tokens of ``record`` from its image headers only (paths or bytes), through the
    processor's resize policy; ``None`` when a header cannot be read (the build will fail)."""
    total = 0
    for i in range(len(record.images)):
        try:
            src = record.image_source(i)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
                    width, height = im.size
            h, w = processor.target_size(height, width)
        except Exception:  # escape, missing, not an image, bomb, aspect ratio: fails at build
            return None
        total += (h // processor.factor) * (w // processor.factor)
    return total


def usable_structure(record: Record | None) -> bool:
    """Whether ``record`` has a list of dict turns or is a document with a string text (else its
    length cannot be estimated)."""
    if record is None:
        return False
    if record.is_document:
        return isinstance(record.text, str)
    return isinstance(record.conversations, list) and all(isinstance(t, dict) for t in record.conversations)


def turn_texts(record: Record) -> list[str]:
    """The turn contents of ``record`` (a document: its text) without the ``<image>`` placeholders."""
    if record.is_document:
        return [record.text.replace(IMAGE_TOKEN, "")]
    return [str(t.get("value", t.get("content", ""))).replace(IMAGE_TOKEN, "") for t in record.conversations]


def text_estimate(record: Record, content_tokens: int, vision: int, overhead: tuple[int, int]) -> int:
    """Estimated text tokens: contents + template overhead + ``N + 2`` per image (docs/method.md §4);
    documents are plain text, without overhead (docs/method.md §3)."""
    extra = vision + 2 * len(record.images)
    if record.is_document:
        return content_tokens + extra
    base, per_turn = overhead
    return content_tokens + base + per_turn * len(record.conversations) + extra


def estimate_lengths(
    record: Record | None, processor: ImageProcessor, tokenizer: Any, overhead: tuple[int, int]
) -> tuple[int, int]:
    """``(vision_tokens, text_tokens)`` of one record, as :class:`LengthIndex` (``(0, 0)`` if unusable)."""
    if not usable_structure(record):
        return 0, 0
    v = vision_tokens(record, processor)
    if v is None:
        return 0, 0
    texts = turn_texts(record)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return v, text_estimate(record, sum(len(x) for x in ids), v, overhead)


def __getattr__(name: str) -> Any:
    """``LengthIndex`` lives in :mod:`cmpt.data.length_index` (it builds on this module's estimates)."""
    if name == "LengthIndex":
        from cmpt.data.length_index import LengthIndex

        return LengthIndex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
