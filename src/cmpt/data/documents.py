"""MoCa documents: plain-text rendering with images and the MLM / MAE corruption (docs/method.md §3).

:class:`DocumentBuilder` turns any record into the :class:`~cmpt.data.pipeline.ProcessedSample` of
MoCa's continual pre-training:

* **Text.** A document record's ``text``; a conversation (or image–caption) record's turn contents
  joined by newlines (:func:`~cmpt.data.validate.document_text`). Plain text: no chat template and
  no special tokens added. Each ``<image>`` becomes ``<|vision_start|> + N × <|image_pad|> +
  <|vision_end|>`` (``N = h·w/merge²`` of that image, :func:`cmpt.vlm.chat.encode_text_with_images`).
* **Images** are decoded exactly as for CoMP (:func:`cmpt.data.pipeline.decode_image`), with the
  same bad-sample reasons.
* **Truncation** to ``max_text_tokens`` never cuts an image span: when the cut would fall inside a
  span, the text is cut before that span's ``<|vision_start|>`` and that image and every later one
  are dropped (their patches too). A document is therefore kept as its longest prefix that fits
  (``truncated=True``); only when nothing is left (the first token is a span that does not fit) is
  the sample bad (``too_long``).
* **Masking** (``masking=True``), drawn from one ``torch.Generator`` seeded by
  :func:`~cmpt.data.pipeline.sample_seed` ``(seed, epoch, id)`` — so resume and any rank split give
  the same masks: MLM first (:func:`~cmpt.data.masking.mlm_mask` over the kept tokens, protected:
  every special or added-special token, the vision tokens, pad/eos/bos/unk and the mask token),
  then MAE (:func:`~cmpt.data.masking.window_mask`, one draw per merged window of the kept images, in
  ``<|image_pad|>`` order). ``input_ids`` hold the corrupted ids, ``labels`` the original ids at the
  masked positions and ``-100`` elsewhere (not shifted). ``masking=False`` (embedding, evaluation):
  ids unchanged, labels all ``-100``, ``window_mask`` all False.

``caption_ids`` is empty (documents take no part in CoMP's alignment loss).

**Data kind.** :func:`record_kind` tells a record MoCa's stage ``cpt`` reads (a document, an
image–caption or a conversation record) from a contrastive pair of stage ``cl``
(:attr:`~cmpt.data.sources.Record.is_pair`) by its structure; :func:`check_data_kind` looks at a
source's first records (no image decoded) and refuses, in one line, data that is wholly of the
other stage's kind (docs/method.md §3 "Data", "Pair data"). Mixed or odd records are left to the
bad-sample path.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Literal

import torch

from cmpt.data.masking import apply_mlm, mlm_mask, window_mask
from cmpt.data.open import iter_records
from cmpt.data.pipeline import ProcessedSample, decode_image, sample_seed
from cmpt.data.sources import BadSample, Record
from cmpt.data.validate import document_problems, document_text
from cmpt.vision.processor import ImageProcessor
from cmpt.vlm.chat import encode_text_with_images
from cmpt.vlm.vision_tokens import (
    IGNORE_INDEX,
    MASK_TOKEN,
    VISION_END,
    VISION_START,
    VISION_TOKENS,
    single_token_id,
)

__all__ = ["DATA_KINDS", "DocumentBuilder", "check_data_kind", "probe_kind", "protected_token_ids"]
__all__ += ["record_kind"]

Kind = Literal["documents", "pairs"]

#: Per kind: what it holds, the MoCa stage that trains on it and the command that makes tiny data of it.
DATA_KINDS: dict[str, tuple[str, str, str]] = {
    "documents": (
        "MoCa documents (text / image–caption / interleaved)",
        "cpt",
        "cmpt data synth --kind moca",
    ),
    "pairs": ("contrastive pairs (qry/pos_text…)", "cl", "cmpt data synth --kind retrieval"),
}


def record_kind(rec: Record) -> Kind | None:
    """``"pairs"`` for a contrastive pair (:attr:`~cmpt.data.sources.Record.is_pair`),
    ``"documents"`` for what :class:`DocumentBuilder` reads (a document, an image–caption or a
    conversation record), else ``None`` (docs/method.md §3). Structure only: nothing is decoded."""
    if rec.is_pair:
        return "pairs"
    if rec.is_document or rec.is_caption or rec.conversations is not None:
        return "documents"
    return None


def probe_kind(source: Any, n: int = 16) -> Kind | None:
    """The kind shared by every readable record among the first ``n`` of ``source`` (an opened
    source, :func:`cmpt.data.open.iter_records`); ``None`` when they are mixed, of neither kind or
    none is readable. Cheap: structure only, no image decoded (docs/method.md §3)."""
    first = itertools.islice(iter_records(source), n)
    kinds = {record_kind(r) for r in first if not isinstance(r, BadSample)}
    return kinds.pop() if len(kinds) == 1 else None


def check_data_kind(source: Any, want: Kind, path: Any, key: str = "data.path") -> None:
    """Refuse in one ``ValueError`` a source whose first records are all of the other MoCa kind
    than ``want`` (pairs for stage ``cpt``, documents for stage ``cl``; docs/method.md §3), naming
    ``key`` = ``path`` and the fix. Mixed or odd data pass: their bad records go the bad-sample way."""
    found = probe_kind(source)
    if found is None or found == want:
        return
    held, wanted = DATA_KINDS[found], DATA_KINDS[want]
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    raise ValueError(
        f"{key}={name} holds {held[0]}, but stage {wanted[1]} trains on {wanted[0]}: point {key} at "
        f"{want} (`{wanted[2]}`) or use stage {held[1]}"
    )


def protected_token_ids(tokenizer: Any, extra: tuple[str, ...] = ()) -> list[int]:
    """Ids MLM never masks (docs/method.md §3): ``all_special_ids``, every added token flagged
    special (chat markup such as ``<|im_start|>``, the vision tokens), pad/eos/bos/unk, the vision
    tokens and ``extra`` (e.g. the mask token), each when the tokenizer has it."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}
    for name in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            ids.add(tid)
    ids |= {tid for t in (*VISION_TOKENS, *extra) if (tid := single_token_id(tokenizer, t)) is not None}
    return sorted(ids)


class DocumentBuilder:
    """Record → MoCa :class:`~cmpt.data.pipeline.ProcessedSample` (docs/method.md §3); see the module
    docstring. Deterministic per ``(seed, epoch, id)``.

    ``tokenizer`` must hold the vision tokens (:func:`cmpt.vlm.vision_tokens.ensure_vision_tokens`) and, with
    ``masking=True``, ``mask_token`` (:func:`cmpt.vlm.vision_tokens.ensure_mask_token`).
    """

    #: Text overhead ``(base, per_turn)`` of a conversation record for the length estimates
    #: (:func:`cmpt.data.pipeline.length_overhead`): one newline between turns, no template.
    length_overhead = (0, 1)

    def __init__(
        self,
        processor: ImageProcessor,
        tokenizer: Any,
        *,
        max_text_tokens: int,
        mlm_prob: float = 0.4,
        mae_prob: float = 0.5,
        mask_token: str = MASK_TOKEN,
        seed: int = 0,
        masking: bool = True,
    ) -> None:
        missing = [t for t in VISION_TOKENS if single_token_id(tokenizer, t) is None]
        if missing:
            raise ValueError(
                f"the tokenizer lacks {missing}: call cmpt.vlm.vision_tokens.ensure_vision_tokens(tokenizer) "
                "and resize the LLM's embeddings before building samples"
            )
        if int(max_text_tokens) < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {max_text_tokens}")
        for name, p in (("mlm_prob", mlm_prob), ("mae_prob", mae_prob)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.mask_id = single_token_id(tokenizer, mask_token)
        if masking and self.mask_id is None:
            raise ValueError(
                f"the tokenizer lacks the mask token {mask_token!r}: call cmpt.vlm.vision_tokens."
                "ensure_mask_token(tokenizer) and resize the LLM's embeddings if needed"
            )
        self.processor, self.tokenizer, self.merge_size = processor, tokenizer, processor.merge_size
        self.max_text_tokens, self.seed, self.masking = int(max_text_tokens), int(seed), bool(masking)
        self.mlm_prob, self.mae_prob, self.mask_token = float(mlm_prob), float(mae_prob), mask_token
        self.protected = torch.tensor(protected_token_ids(tokenizer, (mask_token,)), dtype=torch.long)
        self._start_id = single_token_id(tokenizer, VISION_START)
        self._end_id = single_token_id(tokenizer, VISION_END)

    def _truncate(self, ids: torch.Tensor, n_images: int, record_id: str) -> tuple[torch.Tensor, int]:
        """``ids`` cut to ``max_text_tokens`` outside image spans, and the number of images kept."""
        limit = self.max_text_tokens
        if len(ids) <= limit:
            return ids, n_images
        starts = (ids == self._start_id).nonzero().flatten().tolist()
        ends = (ids == self._end_id).nonzero().flatten().tolist()
        cut = limit
        for s, e in zip(starts, ends):
            if s < limit <= e:  # the limit falls inside this span (its end token included)
                cut = s
                break
        if cut == 0:
            raise BadSample(
                record_id, "too_long", f"its first image alone exceeds max_text_tokens={limit}; raise "
                "max_text_tokens or lower the image resolution (max_pixels)"
            )  # fmt: skip
        kept = sum(1 for e in ends if e < cut)
        return ids[:cut], kept

    def build(self, record: Record, epoch: int = 0) -> ProcessedSample:
        """Build one sample; raises :class:`~cmpt.data.sources.BadSample` (a reason of ``REASONS``)."""
        problems = document_problems(record, (self.mask_token,))  # cheap: before decoding any image
        if problems:
            raise BadSample(record.id, *problems[0])
        decoded = [decode_image(self.processor, record, i) for i in range(len(record.images))]
        grids = [(int(hw[0]), int(hw[1])) for _, hw in decoded]
        m2 = self.merge_size**2
        n_tokens = [h * w // m2 for h, w in grids]
        try:
            ids = encode_text_with_images(
                document_text(record), self.tokenizer, n_tokens, sample_id=record.id
            )
        except ValueError as e:  # structure was checked above: anything left is unexpected
            raise BadSample(record.id, "invalid_conversation", str(e)) from None
        full_length = len(ids)
        ids, kept = self._truncate(ids, len(grids), record.id)
        grids, n_tokens, decoded = grids[:kept], n_tokens[:kept], decoded[:kept]
        if decoded:
            patches = torch.cat([p for p, _ in decoded]) if len(decoded) > 1 else decoded[0][0]
        else:
            patches = torch.zeros((0, self.processor.patch_dim), dtype=torch.float32)
        labels = torch.full_like(ids, IGNORE_INDEX)
        windows = torch.zeros(sum(n_tokens), dtype=torch.bool)
        if self.masking:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, record.id))
            ids, labels = apply_mlm(ids, mlm_mask(ids, self.protected, self.mlm_prob, gen), self.mask_id)
            windows = window_mask(sum(n_tokens), self.mae_prob, gen)
        return ProcessedSample(
            id=record.id,
            patches=patches,
            grids=grids,
            input_ids=ids,
            labels=labels,
            caption_ids=torch.zeros(0, dtype=torch.long),
            num_image_tokens=n_tokens,
            truncated=len(ids) < full_length,
            window_mask=windows,
        )
