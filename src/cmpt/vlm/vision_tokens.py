"""Vision tokens and image placeholders: the token strings, adding them to a tokenizer, and each
``<image>`` expanded to its span of vision tokens (docs/method.md §2).

A text (a rendered conversation, a MoCa document, an embedding input) marks each image with one
``<image>`` placeholder. Before tokenizing, each placeholder becomes the span
``<|vision_start|><|image_pad|><|vision_end|>`` with a *single* pad (:func:`single_pads`); after,
that pad is repeated ``N`` times, ``N = h·w/merge²`` the image's merged vision tokens
(:func:`expand_images`: 0.7 ms for a 3000-token image, where tokenizing 3000 pad strings costs
~10 ms). :func:`ensure_vision_tokens` / :func:`ensure_mask_token` add the special tokens a
tokenizer lacks (MoCa's ``<|mask|>``, docs/method.md §3).

:class:`ConversationError` is what rendering raises (:mod:`cmpt.vlm.chat`, here): a ``ValueError``
naming the sample and carrying its bad-sample ``reason`` (:data:`cmpt.data.sources.REASONS`,
docs/method.md §4), so callers never read the message.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PAD",
    "IMAGE_TOKEN",
    "MASK_TOKEN",
    "VISION_END",
    "VISION_START",
    "VISION_TOKENS",
    "ConversationError",
    "check_placeholders",
    "ensure_mask_token",
    "ensure_vision_tokens",
    "expand_images",
    "single_pads",
    "single_token_id",
    "vision_token_ids",
]

IMAGE_TOKEN = "<image>"
VISION_START = "<|vision_start|>"
IMAGE_PAD = "<|image_pad|>"
VISION_END = "<|vision_end|>"
IGNORE_INDEX = -100
VISION_TOKENS = (VISION_START, IMAGE_PAD, VISION_END)
MASK_TOKEN = "<|mask|>"  # MoCa's MLM corruption token (docs/method.md §3)


class ConversationError(ValueError):
    """A conversation (or text) that cannot be rendered; ``reason`` is its bad-sample reason, one of
    :data:`cmpt.data.sources.REASONS` (docs/method.md §4), so callers never read the message."""

    def __init__(self, message: str, reason: str = "invalid_conversation") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (ConversationError, (str(self), self.reason))


def single_token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` when the tokenizer encodes it as exactly one (known) id, else ``None``."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id):
        return None
    return ids[0]


def ensure_vision_tokens(tokenizer: Any) -> list[str]:
    """Add ``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>`` as special tokens where missing.

    Returns the tokens added (empty when all were there: idempotent). The caller resizes the
    LLM's embeddings, e.g. ``model.resize_token_embeddings(len(tokenizer))`` (docs/method.md §2).
    """
    missing = [t for t in VISION_TOKENS if single_token_id(tokenizer, t) is None]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def ensure_mask_token(tokenizer: Any, token: str = MASK_TOKEN) -> int:
    """Add ``token`` (default ``<|mask|>``) as a special token when absent; return its id.

    Idempotent. The caller resizes the LLM's embeddings only when the id falls outside the table
    (docs/method.md §3, MLM).
    """
    tid = single_token_id(tokenizer, token)
    if tid is None:
        tokenizer.add_tokens([token], special_tokens=True)
        tid = single_token_id(tokenizer, token)
        if tid is None:
            raise ValueError(f"the tokenizer still splits {token!r} after adding it as a special token")
    return tid


def vision_token_ids(tokenizer: Any) -> tuple[int, int, int]:
    """The ids of ``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``; ``ConversationError``
    when the tokenizer lacks them."""
    ids = tuple(single_token_id(tokenizer, t) for t in VISION_TOKENS)
    if any(i is None for i in ids):
        raise ConversationError(
            "the tokenizer lacks the vision tokens "
            f"{VISION_TOKENS}; call cmpt.vlm.vision_tokens.ensure_vision_tokens(tokenizer) and then "
            "model.resize_token_embeddings(len(tokenizer))"
        )
    return ids  # type: ignore[return-value]


def check_placeholders(n_placeholders: int, num_image_tokens: list[int], sample_id: str) -> None:
    """``ConversationError`` unless there is one ``<image>`` per image and every image has >= 1 token."""
    if n_placeholders != len(num_image_tokens):
        raise ConversationError(
            f"sample {sample_id}: {n_placeholders} {IMAGE_TOKEN} placeholder(s) in the conversation "
            f"but {len(num_image_tokens)} image(s); put exactly one {IMAGE_TOKEN} per image in the "
            "user turns (in image order), or fix the sample's image list",
            "placeholder_mismatch",
        )
    if any(int(n) < 1 for n in num_image_tokens):
        raise ConversationError(f"sample {sample_id}: every image needs >= 1 token, got {num_image_tokens}")


def single_pads(text: str) -> str:
    """``text`` with each ``<image>`` as one ``<|vision_start|><|image_pad|><|vision_end|>`` span."""
    return text.replace(IMAGE_TOKEN, VISION_START + IMAGE_PAD + VISION_END)


def expand_images(
    ids: torch.Tensor, labels: torch.Tensor, num_image_tokens: list[int], tokenizer: Any, sample_id: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each (single) ``<|image_pad|>`` id of ``ids`` ``num_image_tokens[i]`` times (labels
    ``IGNORE_INDEX`` there); ``ConversationError`` when the spans are not as :func:`single_pads`
    wrote them."""
    if not num_image_tokens:
        return ids, labels
    start_id, pad_id, end_id = vision_token_ids(tokenizer)
    pos = (ids == pad_id).nonzero().flatten()
    if len(pos) != len(num_image_tokens):
        raise ConversationError(
            f"sample {sample_id}: the rendered text has {len(pos)} {IMAGE_PAD} tokens for "
            f"{len(num_image_tokens)} images (does the chat template alter message contents?)"
        )
    if (
        (pos == 0).any()
        or (pos == len(ids) - 1).any()
        or (ids[pos - 1] != start_id).any()
        or (ids[pos + 1] != end_id).any()
    ):
        raise ConversationError(
            f"sample {sample_id}: an image span is not {VISION_START}{IMAGE_PAD}{VISION_END}"
        )
    # Concatenate slices and constant blocks: no parallel kernel involved, so this stays in the
    # microseconds even on a busy CPU (repeat_interleave can stall for milliseconds there).
    id_parts: list[torch.Tensor] = []
    label_parts: list[torch.Tensor] = []
    prev = 0
    for p, n in zip(pos.tolist(), num_image_tokens):
        id_parts += [ids[prev:p], ids.new_full((int(n),), pad_id)]
        label_parts += [labels[prev:p], labels.new_full((int(n),), IGNORE_INDEX)]
        prev = p + 1
    id_parts.append(ids[prev:])
    label_parts.append(labels[prev:])
    return torch.cat(id_parts), torch.cat(label_parts)
