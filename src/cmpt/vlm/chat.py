"""Conversation rendering for the VLM: image placeholders, chat template, labels (docs/method.md §2).

A LLaVA conversation (``[{"from": "human"|"gpt"|"system", "value": ...}]``, or the
``{"role", "content"}`` style) is rendered with the tokenizer's chat template. Each ``<image>`` in a
user turn becomes ``<|vision_start|> + N×<|image_pad|> + <|vision_end|>`` with N the image's number
of merged vision tokens (h·w/4). Labels are the assistant tokens only, everything else −100.

How it is done, and the decisions taken:

* **Speed.** The template is rendered with *one* ``<|image_pad|>`` per image; the ids are expanded to
  N copies afterwards (:func:`cmpt.vlm.vision_tokens.expand_images`).
* **Labels.** The conversation is rendered once as a string, and for every assistant turn the
  rendering up to it (with the generation prompt) and through it; both must be string prefixes of
  the whole rendering, otherwise the template is not prefix-stable and a ``ValueError`` says so.
  The pieces between these boundaries are tokenized separately, so the prompt part of a training
  sample has exactly the tokens :func:`render_prompt` produces at inference. Supervised: the
  assistant content and its end-of-turn token (``<|im_end|>``, else the eos token); the role header
  and the newline after ``<|im_end|>`` are not.
* **Roles.** ``human``/``user`` → user, ``gpt``/``assistant`` → assistant, ``system`` (first turn
  only). Consecutive turns of the same role are **merged** (joined with a newline). The conversation's
  own system turn wins over the ``system`` argument, which is a default. With neither, the template
  decides (the tiny tokenizer mirrors Qwen2.5 and inserts "You are a helpful assistant.").
* **Errors** (:class:`ConversationError`, a ``ValueError`` naming the sample and carrying its
  bad-sample ``reason`` of :data:`cmpt.data.sources.REASONS`, docs/method.md §4): empty
  conversation, no assistant turn, ``<image>`` outside user turns, a number of ``<image>``
  placeholders different from the number of images (also when a sample has images but no
  placeholder: the data checker reports it, nothing is guessed), literal vision tokens in the text,
  vision tokens missing from the tokenizer.
* **Truncation.** ``max_length`` drops tokens from the end, but a sample always keeps *all* its
  images: if the cut would fall inside or before an image's span, ``ValueError`` (raise the text
  length or lower ``max_pixels``). A truncated sample may end up with no supervised token.

Plain documents (MoCa, docs/method.md §3) skip the template: :func:`encode_text_with_images`
tokenizes the text as is, with the same image expansion.

The vision tokens, their expansion and :class:`ConversationError` are in
:mod:`cmpt.vlm.vision_tokens` (``ensure_vision_tokens``, ``ensure_mask_token``, the token strings);
they are importable from here too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cmpt.vlm.vision_tokens import (
    IGNORE_INDEX,
    IMAGE_PAD,
    IMAGE_TOKEN,
    MASK_TOKEN,
    VISION_END,
    VISION_START,
    VISION_TOKENS,
    ConversationError,
    check_placeholders,
    ensure_mask_token,
    ensure_vision_tokens,
    expand_images,
    single_pads,
    single_token_id,
    vision_token_ids,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Turn roles as written (LLaVA ``from`` or ``role``) → chat-template roles.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class RenderedSample:
    """One tokenized training sample (docs/method.md §2)."""

    input_ids: torch.LongTensor  # (T,)
    labels: torch.LongTensor  # (T,), IGNORE_INDEX outside assistant tokens
    num_image_tokens: list[int]  # N per image, in placeholder order
    caption: str  # assistant answers joined by spaces (text of the alignment loss)
    truncated: bool


def _normalize(conversations: list[dict], system: str | None, sample_id: str) -> list[dict]:
    """LLaVA or role/content turns → merged ``{"role", "content"}`` messages; validates roles."""
    if not conversations:
        raise ConversationError(f"sample {sample_id}: empty conversation", "empty_conversation")
    msgs: list[dict] = []
    for k, turn in enumerate(conversations):
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in ROLES or not isinstance(content, str):
            raise ConversationError(
                f"sample {sample_id}: turn {k} must have a role in {sorted(ROLES)} and a string "
                f"content, got role={role!r}, content type {type(content).__name__}",
                "bad_value",
            )
        role = ROLES[role]
        if role == "system" and msgs:
            raise ConversationError(f"sample {sample_id}: a system turn is only allowed first (turn {k})")
        for tok in VISION_TOKENS:
            if tok in content:
                raise ConversationError(
                    f"sample {sample_id}: turn {k} contains the literal token {tok}", "bad_value"
                )
        if role != "user" and IMAGE_TOKEN in content:
            raise ConversationError(
                f"sample {sample_id}: {IMAGE_TOKEN} in turn {k} ({role}); "
                "image placeholders belong in user turns",
                "placeholder_mismatch",
            )
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] += "\n" + content
        else:
            msgs.append({"role": role, "content": content})
    if system is not None and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in msgs):
        raise ConversationError(
            f"sample {sample_id}: no assistant turn, nothing to supervise", "no_assistant_turn"
        )
    return msgs


def _with_single_pads(messages: list[dict]) -> list[dict]:
    return [{**m, "content": single_pads(m["content"])} for m in messages]


def _apply_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool
) -> str:
    """The tokenizer's chat template, or plain ChatML when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    out = {i for i in (single_token_id(tokenizer, "<|im_end|>"), tokenizer.eos_token_id) if i is not None}
    return out


def render_conversation(
    conversations: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    num_image_tokens: list[int],
    *,
    system: str | None = None,
    max_length: int | None = None,
    sample_id: str = "?",
    caption_rng: random.Random | None = None,
) -> RenderedSample:
    """Render a LLaVA conversation to ``input_ids``/``labels`` with expanded images (docs/method.md §2).

    ``num_image_tokens[i]`` is the number of merged vision tokens of the i-th image (the i-th
    ``<image>`` of the user turns). ``caption`` is the assistant answers joined by single spaces,
    their order shuffled with ``caption_rng`` when given (the official CoMP behaviour). See the
    module docstring for labels, merging of consecutive roles, truncation and errors.
    """
    msgs = _normalize(conversations, system, sample_id)
    answers = [
        t.get("value", t.get("content", ""))
        for t in conversations
        if ROLES.get(t.get("from", t.get("role"))) == "assistant"
    ]
    check_placeholders(sum(m["content"].count(IMAGE_TOKEN) for m in msgs), num_image_tokens, sample_id)
    msgs = _with_single_pads(msgs)

    # Char boundaries: [prompt | answer_1 | prompt | answer_2 | ... | tail]
    full = _apply_template(tokenizer, msgs, add_generation_prompt=False)
    cuts: list[tuple[int, int]] = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, msgs[:i], add_generation_prompt=True)
        through = _apply_template(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        last = cuts[-1][1] if cuts else 0
        if not (full.startswith(before) and full.startswith(through) and last <= len(before) <= len(through)):
            raise ConversationError(
                f"sample {sample_id}: the chat template is not prefix-stable at turn {i} (rendering the "
                "conversation up to an assistant turn is not a prefix of rendering all of it); cmpt "
                "needs templates that do not rewrite earlier turns"
            )
        cuts.append((len(before), len(through)))
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for a, b in cuts:
        pieces += [(full[pos:a], False), (full[a:b], True)]
        pos = b
    pieces.append((full[pos:], False))
    pieces = [(text, sup) for text, sup in pieces if text]
    encoded = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
    eot = _end_of_turn_ids(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for (_, supervised), piece in zip(pieces, encoded):
        n_sup = 0
        if supervised:
            ends = [j for j, t in enumerate(piece) if t in eot]
            n_sup = ends[-1] + 1 if ends else len(piece)
        ids += piece
        labels += piece[:n_sup] + [IGNORE_INDEX] * (len(piece) - n_sup)
    input_ids, label_ids = expand_images(
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
        num_image_tokens,
        tokenizer,
        sample_id,
    )

    truncated = False
    if max_length is not None and len(input_ids) > max_length:
        if num_image_tokens:
            last_end = int((input_ids == vision_token_ids(tokenizer)[2]).nonzero().max()) + 1
            if last_end > max_length:
                raise ConversationError(
                    f"sample {sample_id}: {len(input_ids)} tokens, and its images end at token "
                    f"{last_end} > max_length={max_length}; images are never cut: raise max_length "
                    "or lower the image resolution (max_pixels)",
                    "too_long",
                )
        input_ids, label_ids, truncated = input_ids[:max_length], label_ids[:max_length], True

    answers = [a.strip() for a in answers]
    if caption_rng is not None:
        caption_rng.shuffle(answers)
    n_tokens = [int(n) for n in num_image_tokens]
    return RenderedSample(input_ids, label_ids, n_tokens, " ".join(answers), truncated)


def render_prompt(
    prompt: str, tokenizer: PreTrainedTokenizerBase, num_image_tokens: list[int], system: str | None = None
) -> torch.LongTensor:
    """Token ids of a generation prompt: one user turn + the assistant header (docs/method.md §2).

    When ``prompt`` has fewer ``<image>`` placeholders than images, the missing ones are put at the
    start of the user turn (``"<image>\\n"`` each, the LLaVA layout); more placeholders than images
    is a ``ValueError``. Images are expanded exactly as in :func:`render_conversation`.
    """
    missing = len(num_image_tokens) - prompt.count(IMAGE_TOKEN)
    if missing < 0:
        raise ValueError(
            f"prompt has {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders but only "
            f"{len(num_image_tokens)} images"
        )
    check_placeholders(len(num_image_tokens), num_image_tokens, "prompt")
    msgs = [{"role": "user", "content": (IMAGE_TOKEN + "\n") * missing + prompt}]
    if system is not None:
        msgs.insert(0, {"role": "system", "content": system})
    text = _apply_template(tokenizer, _with_single_pads(msgs), add_generation_prompt=True)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return expand_images(ids, ids.clone(), num_image_tokens, tokenizer, "prompt")[0]


def encode_text_with_images(
    text: str, tokenizer: PreTrainedTokenizerBase, num_image_tokens: list[int], *, sample_id: str = "?"
) -> torch.LongTensor:
    """Token ids of plain ``text`` (no chat template, no special tokens added) with its ``<image>``
    placeholders expanded as in :func:`render_conversation` (docs/method.md §3, MoCa documents).

    The i-th ``<image>`` becomes ``<|vision_start|> + num_image_tokens[i] × <|image_pad|> +
    <|vision_end|>``. ``ValueError`` (naming the sample) for a placeholder count different from the
    number of images or literal vision tokens in the text.
    """
    for tok in VISION_TOKENS:
        if tok in text:
            raise ConversationError(
                f"sample {sample_id}: the text contains the literal token {tok}", "bad_value"
            )
    check_placeholders(text.count(IMAGE_TOKEN), num_image_tokens, sample_id)
    ids = torch.tensor(tokenizer(single_pads(text), add_special_tokens=False)["input_ids"], dtype=torch.long)
    return expand_images(ids, ids.clone(), num_image_tokens, tokenizer, sample_id)[0]


def plain_input(text: str | None, num_images: int, instruction: str | None = None) -> str:
    """The plain text of an embedding input (docs/method.md §3 ``cmpt.Embedder``): ``instruction``,
    a newline, one ``<image>`` line per image, then ``text`` — or, when ``text`` carries its own
    ``<image>`` placeholders (an interleaved input), the text as written after the instruction."""
    body = text or ""
    if IMAGE_TOKEN not in body:
        body = "\n".join([IMAGE_TOKEN] * num_images + ([body] if body else []))
    return f"{instruction}\n{body}" if instruction else body


def caption_ids(caption: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> torch.LongTensor:
    """The caption tokenized alone — no chat template, no special tokens — for ``L_align`` (method.md §2).

    At most ``max_length`` tokens; empty for an empty caption (callers skip such samples).
    """
    ids = tokenizer(caption, add_special_tokens=False)["input_ids"][:max_length]
    return torch.tensor(ids, dtype=torch.long)


def collate_rendered(samples: list[RenderedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` (pad_id), ``labels`` (−100), ``attention_mask`` (1/0), all (B, T)."""
    if not samples:
        raise ValueError("collate_rendered needs at least one sample")
    t = max(len(s.input_ids) for s in samples)
    b = len(samples)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n], labels[i, :n], mask[i, :n] = s.input_ids, s.labels, 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PAD",
    "IMAGE_TOKEN",
    "MASK_TOKEN",
    "ROLES",
    "VISION_END",
    "VISION_START",
    "VISION_TOKENS",
    "ConversationError",
    "RenderedSample",
    "caption_ids",
    "collate_rendered",
    "encode_text_with_images",
    "ensure_mask_token",
    "ensure_vision_tokens",
    "plain_input",
    "render_conversation",
    "render_prompt",
    "single_token_id",
]
