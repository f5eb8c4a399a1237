"""Contrastive pairs for MoCa stage 2: records, rendering and collation (docs/method.md §3, §4).

**Records** (MMEB-train / MoCa-CL-Pairs layout), from JSON/JSONL, tar shards, Hugging Face
datasets and mixtures alike (:attr:`cmpt.data.sources.Record.is_pair`)::

    {"id"?, "task": "caption2image",
     "qry": "<instruction + text>", "qry_image_path": "img/a.png" | null,
     "pos_text": "...", "pos_image_path": ... | null,
     "neg_text": [..] | "..." | null, "neg_image_path": [..] | "..." | null}

* Instructions are part of the stored strings: no chat template. An input is rendered as the
  Embedder renders it (:func:`cmpt.vlm.chat.plain_input`): an image without ``<image>`` in its text
  gets one ``<image>`` line before the text; a text holding its own ``<image>`` (interleaved) is
  kept as written. MMEB's ``<|image_1|>`` placeholder is read as ``<image>``.
* Image references: a path relative to the image root (JSON, Hugging Face path columns), the name
  of a member of the same tar sample (``"qry.png"`` or ``"<key>.qry.png"``), or the image itself
  (``bytes``, a ``datasets.Image`` value ``{"bytes", "path"}``).
* Negatives: ``neg_text`` / ``neg_image_path`` are lists of the same length (a string is a list of
  one; a missing or empty side is all ``None``); entries with neither text nor image are ignored
  (MMEB-train writes ``""`` for "no negative").
* ``task``: the subset the pair belongs to (one task per global batch,
  :mod:`cmpt.data.task_sampler`); absent → the loader uses the source's name.

**Bad pairs** raise :class:`~cmpt.data.sources.BadSample`: ``missing_key`` (no query or positive
key), ``bad_value`` (wrong types, literal vision tokens, negative lists of different lengths),
``placeholder_mismatch`` (more ``<image>`` than images), ``empty_query`` / ``empty_positive`` (no
text and no image), ``negative_is_positive`` (a negative with the positive's text and image), and
the image reasons of :func:`cmpt.data.pipeline.decode_image` (``missing_image``,
``unreadable_image``, ``path_escape``, ...).

**Rendering** (:class:`PairBuilder`): each input → token ids of
``encode_text_with_images(plain_input(text, n_images))`` and the processor's ``(P, 3·p·p)`` patch
rows; longer than ``max_text_tokens`` → cut as the Embedder cuts, at ``max_text_tokens`` but never
before the end of the last image. ``k`` hard negatives per pair: the first ``k``; when fewer, the
last one repeated; when none, ``k`` one-token placeholder slots flagged invalid (``neg_mask``).

**Collation** (:func:`collate_pairs`): the ``S = B + B + B·k`` sequences of ``B`` pairs packed in one
text row, ``[q_0..q_{B-1}, p_0..p_{B-1}, n_{0,0..k-1}, n_{1,0..k-1}, ...]``.

The loader (:class:`cmpt.data.pair_loader.PairLoader`, :func:`cmpt.data.pair_loader.build_pair_loader`;
both importable from here too) serves them in task-homogeneous batches (:mod:`cmpt.data.task_sampler`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from cmpt.data.pipeline import ProcessedSample, collate, decode_image
from cmpt.data.sources import BadSample, Record, resolve_image_path
from cmpt.vision.processor import ImageProcessor
from cmpt.vlm.chat import encode_text_with_images, plain_input
from cmpt.vlm.vision_tokens import IGNORE_INDEX, IMAGE_TOKEN, VISION_END, VISION_TOKENS, single_token_id

__all__ = [
    "PairBuilder",
    "PairFields",
    "PairInput",
    "PairSample",
    "collate_pairs",
    "pair_fields",
    "pair_image_record",
    "pair_problems",
]

MMEB_IMAGE_TOKEN = "<|image_1|>"  # MMEB-train's (Phi-3-V) placeholder, read as <image>


@dataclass(frozen=True)
class PairInput:
    """One side of a pair: its text (``""`` when none) and image (``None``, an absolute path or bytes)."""

    text: str
    image: str | bytes | None
    label: str  # "query", "positive", "negative 0", ... (messages)

    @property
    def empty(self) -> bool:
        return not self.text.strip() and self.image is None


@dataclass
class PairFields:
    """The validated fields of a pair record (:func:`pair_fields`): every usable negative, in order."""

    id: str
    task: str | None
    query: PairInput
    positive: PairInput
    negatives: list[PairInput]


def _text(rec: Record, key: str, value: Any, label: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadSample(rec.id, "bad_value", f"{label}: '{key}' must be a string, got {type(value).__name__}")
    literal = [t for t in VISION_TOKENS if t in value]
    if literal:
        raise BadSample(rec.id, "bad_value", f"{label}: '{key}' contains the literal token(s) {literal}")
    return value.replace(MMEB_IMAGE_TOKEN, IMAGE_TOKEN)


def _image(rec: Record, key: str, value: Any, label: str) -> str | bytes | None:
    """An image reference resolved to an absolute path or bytes (``None``: no image)."""
    if isinstance(value, dict):  # datasets.Image: bytes first, else its path
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str):
        raise BadSample(rec.id, "bad_value", f"{label}: '{key}' must be a path, got {type(value).__name__}")
    if rec.members is not None:  # a tar sample: the image is one of its members
        if value not in rec.members:
            raise BadSample(
                rec.id,
                "missing_image",
                f"{label}: no member {value!r} in {rec.origin} (has {sorted(rec.members)})",
            )
        return rec.members[value]
    return resolve_image_path(rec.image_root, value, rec.id)


def _input(rec: Record, text_key: str, image_key: str, text: Any, image: Any, label: str) -> PairInput:
    out = PairInput(_text(rec, text_key, text, label), _image(rec, image_key, image, label), label)
    n = out.text.count(IMAGE_TOKEN)
    if n > (out.image is not None):
        raise BadSample(
            rec.id, "placeholder_mismatch", f"{label}: {n} {IMAGE_TOKEN} in '{text_key}' for "
            f"{int(out.image is not None)} image(s)"
        )  # fmt: skip
    return out


def _as_list(value: Any) -> list[Any]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def pair_fields(rec: Record) -> PairFields:
    """The fields of pair record ``rec``, checked without decoding any image; raises
    :class:`~cmpt.data.sources.BadSample` (see the module docstring for the reasons)."""
    m = rec.meta
    if "qry" not in m and "qry_image_path" not in m:
        raise BadSample(rec.id, "missing_key", "a pair record needs 'qry' and/or 'qry_image_path'")
    if "pos_text" not in m and "pos_image_path" not in m:
        raise BadSample(rec.id, "missing_key", "a pair record needs 'pos_text' and/or 'pos_image_path'")
    task = m.get("task")
    if task is not None and (not isinstance(task, str) or not task.strip()):
        raise BadSample(rec.id, "bad_value", f"'task' must be a non-empty string, got {task!r}")
    query = _input(rec, "qry", "qry_image_path", m.get("qry"), m.get("qry_image_path"), "query")
    pos = _input(rec, "pos_text", "pos_image_path", m.get("pos_text"), m.get("pos_image_path"), "positive")
    texts, images = _as_list(m.get("neg_text")), _as_list(m.get("neg_image_path"))
    if texts and images and len(texts) != len(images):
        raise BadSample(
            rec.id, "bad_value", f"{len(texts)} 'neg_text' but {len(images)} 'neg_image_path' entries"
        )
    n = max(len(texts), len(images))
    texts, images = texts or [None] * n, images or [None] * n
    negs = [
        _input(rec, "neg_text", "neg_image_path", t, im, f"negative {j}")
        for j, (t, im) in enumerate(zip(texts, images))
    ]
    negs = [x for x in negs if not x.empty]
    if query.empty:
        raise BadSample(rec.id, "empty_query", "the query has no text and no image")
    if pos.empty:
        raise BadSample(rec.id, "empty_positive", "the positive has no text and no image")
    for x in negs:
        if x.text == pos.text and x.image == pos.image:
            raise BadSample(rec.id, "negative_is_positive", f"{x.label} has the positive's text and image")
    return PairFields(rec.id, task, query, pos, negs)


def pair_image_record(rec: Record, fields: PairFields) -> Record:
    """A record whose ``images`` are the distinct images of the pair (paths or bytes), in order of
    first use (query, positive, negatives): what the builder decodes and the checker inspects."""
    images: list[str | bytes] = []
    for x in (fields.query, fields.positive, *fields.negatives):
        if x.image is not None and x.image not in images:
            images.append(x.image)
    return Record(rec.id, images, None, {}, rec.index, rec.image_root, rec.origin or rec.id)


def pair_problems(rec: Record) -> list[tuple[str, str]]:
    """``(reason, detail)`` of the structure problems of pair record ``rec`` (no image decoded)."""
    try:
        pair_fields(rec)
    except BadSample as e:
        return [(e.reason, e.detail)]
    return []


@dataclass
class PairSample:
    """One built pair: rendered query, positive and exactly ``k`` negatives (docs/method.md §3).

    ``neg_valid[j]`` is False for a placeholder slot (the pair had no negative)."""

    id: str
    task: str | None
    query: ProcessedSample
    positive: ProcessedSample
    negatives: list[ProcessedSample] = field(default_factory=list)
    neg_valid: list[bool] = field(default_factory=list)

    @property
    def sequences(self) -> list[ProcessedSample]:
        return [self.query, self.positive, *self.negatives]


def _key(image: str | bytes) -> str:
    return image if isinstance(image, str) else "sha256:" + hashlib.sha256(image).hexdigest()


class PairBuilder:
    """Pair record → :class:`PairSample` (docs/method.md §3); see the module docstring.

    ``tokenizer`` must hold the vision tokens (:func:`cmpt.vlm.vision_tokens.ensure_vision_tokens`).
    ``max_text_tokens``: per input, cut like the Embedder's ``max_length`` (1280, the release's).
    ``num_hard_negatives``: ``k`` (2, the release's). Deterministic (nothing random).
    """

    def __init__(
        self,
        processor: ImageProcessor,
        tokenizer: Any,
        *,
        max_text_tokens: int = 1280,
        num_hard_negatives: int = 2,
    ) -> None:
        missing = [t for t in VISION_TOKENS if single_token_id(tokenizer, t) is None]
        if missing:
            raise ValueError(
                f"the tokenizer lacks {missing}: call cmpt.vlm.vision_tokens.ensure_vision_tokens(tokenizer) "
                "and resize the LLM's embeddings before building pairs"
            )
        if int(max_text_tokens) < 1 or int(num_hard_negatives) < 0:
            raise ValueError(
                f"need max_text_tokens >= 1 and num_hard_negatives >= 0, got {max_text_tokens}, "
                f"{num_hard_negatives}"
            )
        self.processor, self.tokenizer = processor, tokenizer
        self.max_text_tokens, self.num_hard_negatives = int(max_text_tokens), int(num_hard_negatives)
        self.merge_size = processor.merge_size
        self.seed = 0  # nothing is random; kept for the loaders' interface
        self._end_id = single_token_id(tokenizer, VISION_END)
        pad = next((getattr(tokenizer, a, None) for a in ("pad_token_id", "eos_token_id")
                    if isinstance(getattr(tokenizer, a, None), int)), 0)  # fmt: skip
        self.placeholder_id = int(pad)

    def _render(
        self, rec: Record, x: PairInput, decoded: dict[str, tuple[torch.Tensor, tuple[int, int]]], sid: str
    ) -> ProcessedSample:
        grids, patches = [], torch.zeros((0, self.processor.patch_dim), dtype=torch.float32)
        if x.image is not None:
            patches, hw = decoded[_key(x.image)]
            grids = [(int(hw[0]), int(hw[1]))]
        n_tokens = [h * w // self.merge_size**2 for h, w in grids]
        text = plain_input(x.text or None, len(grids))
        try:
            ids = encode_text_with_images(text, self.tokenizer, n_tokens, sample_id=sid)
        except ValueError as e:  # the structure was checked by pair_fields: anything left is unexpected
            raise BadSample(rec.id, "invalid_conversation", f"{x.label}: {e}") from None
        full = len(ids)
        if full > self.max_text_tokens:  # as the Embedder: never before the end of the last image
            ends = (ids == self._end_id).nonzero()
            ids = ids[: max(self.max_text_tokens, int(ends[-1]) + 1 if len(ends) else 0)]
        return ProcessedSample(
            id=sid,
            patches=patches,
            grids=grids,
            input_ids=ids,
            labels=torch.full_like(ids, IGNORE_INDEX),
            caption_ids=torch.zeros(0, dtype=torch.long),
            num_image_tokens=n_tokens,
            truncated=len(ids) < full,
        )

    def placeholder(self, sid: str) -> ProcessedSample:
        """The one-token sequence of an invalid negative slot (no image)."""
        ids = torch.tensor([self.placeholder_id], dtype=torch.long)
        return ProcessedSample(
            sid, torch.zeros((0, self.processor.patch_dim), dtype=torch.float32), [], ids,
            torch.full_like(ids, IGNORE_INDEX), torch.zeros(0, dtype=torch.long), [],
        )  # fmt: skip

    def build(self, record: Record, epoch: int = 0) -> PairSample:
        """Build one pair; raises :class:`~cmpt.data.sources.BadSample` (a reason of ``REASONS``).
        ``epoch`` is accepted for the loaders' interface (pairs are the same in every epoch)."""
        if not record.is_pair:
            raise BadSample(record.id, "missing_key", "not a pair record (no 'qry' / 'pos_text' keys)")
        f = pair_fields(record)
        k = self.num_hard_negatives
        negs = f.negatives[:k]
        if negs:
            negs = negs + [negs[-1]] * (k - len(negs))
        used = [f.query, f.positive, *negs]
        img_rec = pair_image_record(record, PairFields(f.id, f.task, f.query, f.positive, negs))
        decoded = {
            _key(img): decode_image(self.processor, img_rec, i) for i, img in enumerate(img_rec.images)
        }
        rid = record.id
        q = self._render(record, used[0], decoded, f"{rid}/qry")
        p = self._render(record, used[1], decoded, f"{rid}/pos")
        built: dict[int, ProcessedSample] = {}
        negatives, valid = [], []
        for j in range(k):
            if not negs:
                negatives.append(self.placeholder(f"{rid}/neg{j}"))
                valid.append(False)
                continue
            x = negs[j]
            if id(x) not in built:  # a repeated negative is rendered once
                built[id(x)] = self._render(record, x, decoded, f"{rid}/neg{j}")
            negatives.append(built[id(x)])
            valid.append(True)
        return PairSample(rid, f.task, q, p, negatives, valid)


def collate_pairs(
    samples: list[PairSample], *, num_bad: int = 0, pad_to: int | None = None
) -> dict[str, Any]:
    """``B`` built pairs → one packed batch (docs/method.md §3, §7); ``num_bad``: bad pairs skipped.

    Keys: ``input_ids`` ``(N,)``, ``cu_seqlens`` ``(S+1,)`` int32, ``labels`` ``(N,)`` all ``-100``,
    ``patches`` / ``grid_hw`` of every image in sequence order, ``images_per_sample`` ``(S,)``, with
    the ``S = B + B + B·k`` sequences ordered ``[q_0..q_{B-1}, p_0..p_{B-1}, n_{0,0..k-1}, ...]``;
    ``num_pairs`` (B), ``num_hard_negatives`` (k), ``neg_mask`` ``(B, k)`` bool (False = placeholder
    slot), ``task`` (one per batch), ``sample_ids`` (the B pair ids), ``num_samples`` (B),
    ``num_bad``, ``num_tokens``, ``num_vision_tokens``, ``pair_mask`` ``(B,)`` bool.

    ``pad_to``: when fewer pairs are given, they are repeated cyclically up to ``pad_to`` pairs (a
    loader that lost bad pairs keeps the batch shape every rank must share); the copies have
    ``pair_mask`` False, ``num_samples`` counts only the real pairs.
    """
    if not samples:
        raise ValueError("collate_pairs needs at least one pair")
    ks = {len(s.negatives) for s in samples}
    tasks = {s.task for s in samples}
    if len(ks) != 1:
        raise ValueError(f"pairs with different numbers of negatives {sorted(ks)} in one batch")
    if len(tasks) != 1:
        raise ValueError(f"pairs of several tasks {sorted(map(str, tasks))} in one batch: one task per batch")
    k, real = ks.pop(), len(samples)
    if pad_to is not None and pad_to > real:
        samples = [samples[i % real] for i in range(pad_to)]
    b = len(samples)
    seqs = [s.query for s in samples] + [s.positive for s in samples]
    seqs += [n for s in samples for n in s.negatives]
    out = collate(seqs)
    for key in ("caption_ids", "caption_cu_seqlens", "num_loss_tokens", "num_align"):
        out.pop(key, None)
    out.update(
        num_pairs=b,
        num_hard_negatives=k,
        neg_mask=torch.tensor([s.neg_valid for s in samples], dtype=torch.bool).view(b, k),
        task=tasks.pop(),
        sample_ids=[s.id for s in samples],
        num_samples=real,
        num_bad=int(num_bad),
        pair_mask=torch.arange(b) < real,
    )
    return out


def __getattr__(name: str) -> Any:  # the loader lives in cmpt.data.pair_loader (it imports this module)
    if name in ("PairLoader", "build_pair_loader"):
        from cmpt.data import pair_loader

        return getattr(pair_loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
