"""Data checker: find the samples training would skip, and say why (docs/method.md §4, ``cmpt data check``).

Every record is checked for the bad-sample reasons of :data:`cmpt.data.sources.REASONS`: structure
(missing ``conversations``, wrong types, empty conversation, no assistant turn), ``<image>``
placeholders in user turns vs. the number of images, image paths escaping the image root, missing
files, images that do not fully decode (truncated, not an image, decompression bombs), zero-size
images, aspect ratios above 200 (``smart_resize`` rejects them, docs/method.md §1.4), and — with a tokenizer
and ``max_text_tokens`` — conversations longer than the text limit. CMYK, 16-bit, palette and alpha
images are valid: ``load_image`` converts them.

Every record layout of ``docs/data.md`` is checked in the form it is read into: the Hugging Face /
TRL chat layout as its LLaVA turns (:mod:`cmpt.data.chat_layout`), image–caption records (tar
``jpg`` + ``txt`` or a metadata ``caption``, ``{"image", "caption"}`` records) as their CoMP
conversation with the default caption prompt, plus ``empty_text`` for a blank caption.

Document records (``text`` without ``conversations``, docs/method.md §3) are checked by
:func:`document_problems` instead: a non-string (``bad_value``) or blank (``empty_text``) text,
literal vision or mask tokens (``bad_value``), ``<image>`` count ≠ image count
(``placeholder_mismatch``); their images as above. With ``max_text_tokens`` a longer document is
reported ``too_long`` (the MoCa builder drops its trailing images and text instead).

Contrastive pair records (docs/method.md §3, :mod:`cmpt.data.pairs`) are checked by
:func:`cmpt.data.pairs.pair_problems` (``missing_key``, ``bad_value``, ``placeholder_mismatch``,
``empty_query``, ``empty_positive``, ``negative_is_positive``), then the images of their query,
positive and negatives as above; their length is not checked (the builder cuts each input as the
Embedder does).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

from cmpt.data.llava_source import LlavaSource
from cmpt.data.sources import BadSample, Record
from cmpt.vision.image_io import ImageLoadError, load_image
from cmpt.vision.processor import ImageProcessor, smart_resize
from cmpt.vlm.chat import ROLES, encode_text_with_images, render_conversation
from cmpt.vlm.vision_tokens import (
    IMAGE_TOKEN,
    MASK_TOKEN,
    VISION_TOKENS,
    ConversationError,
)

__all__ = [
    "Problem",
    "check_record",
    "conversation_problems",
    "document_problems",
    "document_text",
    "record_problems",
]


@dataclass
class Problem:
    """One reason why sample ``id`` (record ``index``) is bad; ``reason`` is one of ``REASONS``."""

    id: str
    reason: str
    detail: str = ""
    index: int = -1


def conversation_problems(rec: Record) -> list[tuple[str, str]]:
    """``(reason, detail)`` of the structure and placeholder problems of a record (no I/O)."""
    convs = rec.conversations
    if convs is None:
        if rec.is_document:
            return [("missing_key", "a document record (no 'conversations'): build it with DocumentBuilder")]
        return [("missing_key", "no 'conversations' key")]
    if not isinstance(convs, list):
        return [("bad_value", f"'conversations' must be a list, got {type(convs).__name__}")]
    if not convs:
        return [("empty_conversation", "'conversations' is empty")]
    out: list[tuple[str, str]] = []
    roles: list[str] = []
    n_placeholders = 0
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict):
            out.append(("bad_value", f"turn {k} is a {type(turn).__name__}, not an object"))
            continue
        role, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if role is None or value is None:
            out.append(("missing_key", f"turn {k} needs 'from' and 'value'"))
            continue
        if role not in ROLES or not isinstance(value, str):
            out.append(("bad_value", f"turn {k}: role {role!r} / value of type {type(value).__name__}"))
            continue
        roles.append(ROLES[role])
        if any(tok in value for tok in VISION_TOKENS):
            out.append(("bad_value", f"turn {k} contains a literal vision token"))
        if ROLES[role] == "user":
            n_placeholders += value.count(IMAGE_TOKEN)
        elif IMAGE_TOKEN in value:
            out.append(("placeholder_mismatch", f"{IMAGE_TOKEN} in turn {k} ({role}), not a user turn"))
    if not out and "assistant" not in roles:
        out.append(("no_assistant_turn", "nothing to supervise"))
    if rec.is_caption and not rec.caption.strip():
        out.append(("empty_text", "the caption is empty or blank"))
    if n_placeholders != len(rec.images):
        out.append(
            (
                "placeholder_mismatch",
                f"{n_placeholders} {IMAGE_TOKEN} in user turns, {len(rec.images)} image(s)",
            )
        )
    return out


def _turn_values(convs: list) -> list[str] | None:
    """The string contents of every turn, or ``None`` when a turn is not ``{..., value: str}``."""
    values = [t.get("value", t.get("content")) if isinstance(t, dict) else None for t in convs]
    return values if all(isinstance(v, str) for v in values) else None


def document_text(rec: Record) -> str:
    """The plain text MoCa trains on (docs/method.md §3): a document's (or an image–caption
    record's) ``text``, or a conversation record's turn contents joined by newlines (placeholders
    kept). Assumes :func:`document_problems` found nothing."""
    if rec.is_document or rec.is_caption:
        return rec.text
    return "\n".join(_turn_values(rec.conversations) or [])


def document_problems(rec: Record, forbidden: tuple[str, ...] = (MASK_TOKEN,)) -> list[tuple[str, str]]:
    """``(reason, detail)`` of the problems of ``rec`` read as a MoCa document (no I/O).

    A document record needs a non-blank string ``text``; a conversation record a non-empty list of
    turns with string contents (no assistant turn needed). Either way the text must not hold literal
    vision tokens or any of ``forbidden`` (the mask token), and its ``<image>`` count must equal the
    number of images (docs/method.md §3, §4).
    """
    if rec.is_document or rec.is_caption:
        if not isinstance(rec.text, str):
            return [("bad_value", f"'text' must be a string, got {type(rec.text).__name__}")]
        text = rec.text
    elif rec.conversations is None:
        return [("missing_key", "no 'text' (document) or 'conversations' key")]
    elif not isinstance(rec.conversations, list):
        return [("bad_value", f"'conversations' must be a list, got {type(rec.conversations).__name__}")]
    elif not rec.conversations:
        return [("empty_conversation", "'conversations' is empty")]
    else:
        values = _turn_values(rec.conversations)
        if values is None:
            return [("bad_value", "every turn must be an object with a string 'value' / 'content'")]
        text = "\n".join(values)
    if not text.strip():
        return [("empty_text", "the text is empty or blank")]
    out: list[tuple[str, str]] = []
    literal = [tok for tok in (*VISION_TOKENS, *forbidden) if tok in text]
    if literal:
        out.append(("bad_value", f"the text contains the literal token(s) {literal}"))
    n = text.count(IMAGE_TOKEN)
    if n != len(rec.images):
        out.append(("placeholder_mismatch", f"{n} {IMAGE_TOKEN} in the text, {len(rec.images)} image(s)"))
    return out


def record_problems(rec: Record) -> list[tuple[str, str]]:
    """:func:`document_problems` for a document record, :func:`cmpt.data.pairs.pair_problems` for a
    contrastive pair, else :func:`conversation_problems`."""
    if rec.is_pair:
        from cmpt.data.pairs import pair_problems  # pairs imports the pipeline, which imports this

        return pair_problems(rec)
    return document_problems(rec) if rec.is_document else conversation_problems(rec)


def _image_problems(
    rec: Record, processor: ImageProcessor | None, factor: int, min_pixels: int, max_pixels: int, decode: bool
) -> tuple[list[tuple[str, str]], list[int]]:
    """Problems of the record's images, and the merged token count of each usable image."""
    out: list[tuple[str, str]] = []
    tokens: list[int] = []
    for i in range(len(rec.images)):
        try:
            path = rec.image_source(i)  # bytes (tar / HF sources) or a resolved path
        except BadSample as e:
            out.append((e.reason, e.detail))
            continue
        label = path if isinstance(path, str) else rec.image_label(i)
        if isinstance(path, str) and not os.path.isfile(path):
            out.append(("missing_image", f"{rec.images[i]!r}: no such file ({path})"))
            continue
        try:
            if decode:
                width, height = load_image(path, None if isinstance(path, str) else label).size
            else:
                from PIL import Image

                with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
                    width, height = im.size
        except ImageLoadError as e:
            out.append((e.reason, str(e)))
            continue
        except Exception as e:  # header-only mode: whatever PIL raises
            out.append(("unreadable_image", f"{label}: {type(e).__name__}: {e}"))
            continue
        if width <= 0 or height <= 0:
            out.append(("zero_size_image", f"{label}: {width}x{height}"))
            continue
        try:
            if processor is not None:
                h, w = processor.target_size(height, width)
            else:
                h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
        except ValueError as e:
            out.append(("extreme_aspect_ratio", f"{label}: {e}"))
            continue
        tokens.append((h // factor) * (w // factor))
    return out, tokens


def _rendered_length(
    record: Record, tokenizer: Any, tokens: list[int], found: list[tuple[str, str]]
) -> int | None:
    """Rendered text length of a record without structure problems (``None``, and the problem
    appended to ``found``, when rendering fails)."""
    if record.is_document:  # structure already checked: a failure here is unexpected
        try:
            return len(encode_text_with_images(record.text, tokenizer, tokens, sample_id=record.id))
        except ValueError as e:
            found.append(("invalid_conversation", str(e)))
            return None
    try:
        return len(
            render_conversation(record.conversations, tokenizer, tokens, sample_id=record.id).input_ids
        )
    except ConversationError as e:
        found.append((e.reason, str(e)))
        return None


def check_record(
    record: Record,
    source: LlavaSource | None = None,
    *,
    processor_factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 3000,
    processor: ImageProcessor | None = None,
    max_text_tokens: int | None = None,
    tokenizer: Any = None,
    decode: bool = True,
) -> list[Problem]:
    """All problems of one record (empty list = usable) (docs/method.md §4).

    Images are resized by ``smart_resize(factor=processor_factor, min_pixels, max_pixels)``, or by
    ``processor.target_size`` when a processor is given (needed for the ``fixed`` policy, which
    accepts any aspect ratio). ``decode=False`` reads image headers only (fast, misses truncation).
    The length check runs only with both ``tokenizer`` (with the vision tokens) and ``max_text_tokens``.
    """
    if not record.image_root and source is not None:
        record.image_root = getattr(source, "image_root", "")
    factor = processor.factor if processor is not None else processor_factor
    found = record_problems(record)
    images = record
    if record.is_pair:  # its images are those of the query, positive and negatives; no length check
        from cmpt.data.pairs import pair_fields, pair_image_record

        images = pair_image_record(record, pair_fields(record)) if not found else None
    if images is not None:
        img_found, tokens = _image_problems(images, processor, factor, min_pixels, max_pixels, decode)
        found += img_found
    if not found and not record.is_pair and tokenizer is not None and max_text_tokens is not None:
        n = _rendered_length(record, tokenizer, tokens, found)
        if n is not None and n > max_text_tokens:
            found.append(("too_long", f"{n} tokens > max_text_tokens={max_text_tokens}"))
    return [Problem(record.id, reason, detail, record.index) for reason, detail in found]
