"""Record layouts users already have, read into cmpt's conversation form (docs/method.md §4).

Everything downstream (checker, sample builder, length index) sees LLaVA-form turns
``{"role"|"from", "content"|"value": str}`` with one ``<image>`` placeholder per image, so the
layouts below are normalized when a record is read (``docs/data.md`` lists every accepted form).

**Hugging Face / TRL chat layout** (JSON, JSONL, Hugging Face datasets, the ``.json`` member of tar
shards)::

    {"messages": [{"role": "user", "content": [{"type": "image"},
                                               {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
     "images": ["coco/1.jpg"]}

* ``content`` is a string (kept as written, ``<image>`` placeholders included) or a list of typed
  parts, concatenated in order without separator (as Hugging Face chat templates do): a
  ``{"type": "text", "text": str}`` part is its text, a ``{"type": "image"}`` part becomes an
  ``<image>`` placeholder at its position. Parts whose fields are null (Arrow structs carry every
  field of the schema) are read as if the fields were absent. A message may say ``from`` /
  ``value`` instead of ``role`` / ``content``; ``messages`` may be a JSON string (a dataset column).
* The i-th image part is the i-th entry of the record's ``images`` (or ``image``) column: paths,
  bytes or ``datasets.Image`` values, as for LLaVA records. An image part may carry its image
  inline instead (``{"type": "image", "image": "a.jpg"}``, or ``"path"``): those are collected in
  order and become the record's images; a record with both inline images and an ``images`` list
  is ``bad_value``.
* A record with ``conversations`` is read as LLaVA (its ``messages`` are ignored).
* Bad records (:class:`~cmpt.data.sources.BadSample`, counted like any other): ``messages`` not a
  list of objects, a part that is not an object, a part type other than ``text`` / ``image``
  (``"image_url"``, ``"video"``, ...), a text part without a string ``text``, an image part with a
  ``url`` (nothing is downloaded) — all ``bad_value``. Roles, an image part in an assistant or
  system turn (``placeholder_mismatch``) and the placeholder count are then checked as for any
  conversation (:func:`cmpt.data.validate.conversation_problems`).

**Image–caption records** (the CoMP stage-I form, docs/method.md §2.1): a caption becomes the
one-turn conversation user ``"<image>\\n" + prompt``, assistant = the caption
(:func:`caption_conversation`; the prompt is ``data.caption_prompt``, default
:data:`DEFAULT_CAPTION_PROMPT`). Every reader turns a record whose only content is a caption — a
tar sample's ``.txt`` member, the ``caption`` of its metadata ``.json``, a ``caption`` key of a
JSON record or a dataset row — into the same fields (:func:`caption_views`).
"""

from __future__ import annotations

import json
from typing import Any

from cmpt.vlm.vision_tokens import IMAGE_TOKEN

__all__ = ["DEFAULT_CAPTION_PROMPT", "caption_conversation", "caption_views", "messages_to_conversations"]

#: The user turn of a caption record after its ``<image>`` line: one of LLaVA-Pretrain's brief
#: description instructions (the data of CoMP's stage I, docs/method.md §2.1).
DEFAULT_CAPTION_PROMPT = "Describe the image concisely."

_INLINE_KEYS = ("image", "path")


def caption_conversation(caption: str, prompt: str = DEFAULT_CAPTION_PROMPT) -> list[dict[str, str]]:
    """The one-turn caption conversation: user ``"<image>\\n" + prompt``, assistant ``caption``."""
    return [{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}, {"from": "gpt", "value": caption}]


def caption_views(caption: Any, num_images: int, rid: str) -> tuple[str, str | None, list | None]:
    """``(text, caption, conversations)`` of a record whose only content is ``caption``.

    With one image and no ``<image>`` in the caption: an image–caption record — the document
    ``"<image>\\n" + caption`` MoCa reads, the caption stripped, and its one-turn conversation with
    the default prompt (docs/method.md §2.1, §3). Otherwise a document: the caption is its text (a
    text-only passage without images), no caption, no conversation. A caption that is not a string
    is ``bad_value`` (:class:`~cmpt.data.sources.BadSample`).
    """
    if not isinstance(caption, str):
        raise _bad(rid, f"'caption' must be a string, got {type(caption).__name__}")
    if num_images == 1 and IMAGE_TOKEN not in caption:
        return f"{IMAGE_TOKEN}\n{caption}", caption.strip(), caption_conversation(caption.strip())
    return caption, None, None


def _bad(rid: str, detail: str) -> Exception:
    from cmpt.data.sources import BadSample  # sources imports this module

    return BadSample(rid, "bad_value", detail)


def _part_text(part: Any, k: int, j: int, rid: str, inline: list[Any]) -> str:
    """The text a typed part contributes to its turn (an image part: ``<image>``)."""
    if not isinstance(part, dict):
        raise _bad(rid, f"messages[{k}].content[{j}] is a {type(part).__name__}, not an object")
    part = {key: v for key, v in part.items() if v is not None}
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _bad(rid, f"messages[{k}].content[{j}]: a text part needs a string 'text'")
        return part["text"]
    if kind == "image":
        if "url" in part:
            raise _bad(rid, f"messages[{k}].content[{j}]: an image 'url' is not downloaded; save the "
                       "image and give its path in 'images' (or the part's 'image')")  # fmt: skip
        value = next((part[key] for key in _INLINE_KEYS if key in part), None)
        if value is not None:
            inline.append(value)
        return IMAGE_TOKEN
    raise _bad(
        rid,
        f"messages[{k}].content[{j}]: unsupported part type {kind!r} (cmpt reads 'text' and 'image' parts)",
    )


def messages_to_conversations(
    messages: Any, images: list[Any], rid: str
) -> tuple[list[dict[str, Any]], list[Any]]:
    """``(conversations, images)`` of a chat-layout record (see the module docstring).

    ``images``: the record's own image list; returned unchanged unless image parts carry their images
    inline, which are then the images. Raises ``BadSample`` (``bad_value``) for what cannot be read.
    """
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise _bad(rid, f"'messages' is a string but not valid JSON ({e})") from None
    if not isinstance(messages, list):
        raise _bad(rid, f"'messages' must be a list of messages, got {type(messages).__name__}")
    turns: list[dict[str, Any]] = []
    inline: list[Any] = []
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad(rid, f"messages[{k}] is a {type(msg).__name__}, not an object")
        msg = {key: v for key, v in msg.items() if v is not None}
        content = msg.get("content", msg.get("value"))
        if isinstance(content, list):
            content = "".join(_part_text(p, k, j, rid, inline) for j, p in enumerate(content))
        turns.append({"role": msg.get("role", msg.get("from")), "content": content})
    if inline and images:
        raise _bad(rid, f"{len(inline)} inline image part(s) and an 'images' list of {len(images)}; use one")
    return turns, inline or images
