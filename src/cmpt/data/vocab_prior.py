"""Token counts for the alignment-loss prior (docs/method.md §2, ``cmpt data vocab-prior``).

The official CoMP prior ``π`` is built from the counts ``n ∈ N^V`` of every vocabulary token in
the caption texts of the training data: ``p = clamp(n, min=1) / Σ n``, ``π = softmax(p / T)``
(docs/method.md §2; see :func:`cmpt.losses.prior_from_counts`). This module
counts them, and stores them as a safetensors file with one int64 tensor ``counts`` and string
metadata (tokenizer name, number of texts, vocabulary size, a vocabulary fingerprint).

``cmpt data vocab-prior DATA`` reads every form ``data.path`` takes (JSON / JSONL, tar shards, a
Hugging Face dataset, ``PATH#SPLIT``, a mixture YAML: :func:`cmpt.data.open.open_source`,
``docs/data.md``), through the same readers as training: a record's caption text is its assistant
turns (captions of image–caption records included). Records that cannot be read are skipped and
counted, as training skips them; documents and contrastive pairs have no assistant turn.

Vocabulary-size rule on load (:func:`load_vocab_counts`): the model's tokenizer usually gains
tokens after counting (``<|image_pad|>`` & co. are *appended*, docs/method.md §2). When the expected size
is larger than the stored one, the stored ids are taken to be a prefix of the new vocabulary
and the counts are zero-padded; when a tokenizer is passed, that prefix property is verified
against the stored fingerprint. A smaller expected size, or a fingerprint mismatch, is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cmpt.hub import reading_safetensors, resolving
from cmpt.io_atomic import atomic_file

log = logging.getLogger("cmpt.data")

__all__ = [
    "ASSISTANT_ROLES",
    "caption_texts_from_llava",
    "count_tokens",
    "load_vocab_counts",
    "read_vocab_counts_meta",
    "save_vocab_counts",
    "vocab_fingerprint",
    "vocab_prior_main",
]

#: Speaker names of the answers that make up the caption text (LLaVA uses ``gpt``).
ASSISTANT_ROLES = ("gpt", "assistant")
_FORMAT = "cmpt.vocab_counts.v1"


def _tokenizer_size(tokenizer: Any) -> int:
    if hasattr(tokenizer, "get_vocab_size"):  # a raw `tokenizers.Tokenizer`
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):  # a raw `tokenizers.Tokenizer`
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def count_tokens(
    texts: Iterable[str], tokenizer: Any, vocab_size: int | None = None, batch_size: int = 1000
) -> torch.Tensor:
    """Count every token id of ``texts`` (tokenized without special tokens).

    ``tokenizer`` is a Hugging Face tokenizer or a raw ``tokenizers.Tokenizer``. Returns an int64
    tensor of shape ``(V,)``, ``V = vocab_size`` or ``len(tokenizer)`` by default; an id ``≥ V``
    is an error.
    """
    size = _tokenizer_size(tokenizer) if vocab_size is None else int(vocab_size)
    if size < 1 or batch_size < 1:
        raise ValueError(f"vocab_size and batch_size must be ≥ 1, got {size} and {batch_size}")
    counts = torch.zeros(size, dtype=torch.long)
    it = iter(texts)
    while batch := list(islice(it, batch_size)):
        ids = [i for seq in _encode_batch(tokenizer, batch) for i in seq]
        if not ids:
            continue
        flat = torch.tensor(ids, dtype=torch.long)
        if int(flat.max()) >= size or int(flat.min()) < 0:
            raise ValueError(f"token id {int(flat.max())} is outside the vocabulary of size {size}")
        counts += torch.bincount(flat, minlength=size)
    return counts


def vocab_fingerprint(tokenizer: Any, size: int) -> str:
    """SHA-256 of the token strings of ids ``0 .. size-1`` (used to verify the prefix rule)."""
    if hasattr(tokenizer, "id_to_token"):
        toks = [tokenizer.id_to_token(i) for i in range(size)]
    else:
        toks = tokenizer.convert_ids_to_tokens(list(range(size)))
    h = hashlib.sha256()
    for t in toks:
        h.update(("" if t is None else str(t)).encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()


def save_vocab_counts(counts: torch.Tensor, path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Write ``counts (V,)`` to a safetensors file (key ``counts``) with string metadata.

    ``meta`` should name the tokenizer (``tokenizer``) and the number of texts (``num_texts``);
    non-string values are stored as JSON. ``format`` and ``vocab_size`` are added.
    """
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D, got shape {tuple(counts.shape)}")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    metadata.update(format=_FORMAT, vocab_size=str(counts.numel()))
    with atomic_file(path) as tmp:
        save_file({"counts": counts.detach().to("cpu", torch.long).contiguous()}, str(tmp), metadata=metadata)


def read_vocab_counts_meta(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a counts file (truncated or corrupt: :class:`~cmpt.hub.CorruptFileError`)."""
    with reading_safetensors(path), safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_vocab_counts(
    path: str | os.PathLike, expected_vocab_size: int | None = None, tokenizer: Any = None
) -> torch.Tensor:
    """Load counts saved by :func:`save_vocab_counts` as an int64 ``(V,)`` tensor.

    With ``expected_vocab_size`` (the model's vocabulary, e.g. its LM-head rows): equal sizes
    load as is; a larger expected size zero-pads the counts (tokens appended after counting,
    see the module docstring); a smaller one raises ``ValueError`` naming the file and both
    sizes. If ``tokenizer`` is given and the file has a fingerprint, the first ``V_stored``
    tokens of ``tokenizer`` must match it (the stored ids are a prefix), else ``ValueError``. A
    truncated or corrupt file is a :class:`~cmpt.hub.CorruptFileError` naming it.
    """
    with reading_safetensors(path), safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        if "counts" not in names:
            raise ValueError(f"{path}: not a vocab-counts file (no 'counts' tensor)")
        counts = f.get_tensor("counts").to(torch.long)
        meta = f.metadata() or {}
    stored = counts.numel()
    if tokenizer is not None and "vocab_fingerprint" in meta:
        size = _tokenizer_size(tokenizer)
        if size < stored or vocab_fingerprint(tokenizer, stored) != meta["vocab_fingerprint"]:
            raise ValueError(
                f"{path}: the counts were made with tokenizer {meta.get('tokenizer', '?')!r} whose first "
                f"{stored} tokens differ from the given tokenizer's (size {size}); recount with "
                "`cmpt data vocab-prior`"
            )
    if expected_vocab_size is None or expected_vocab_size == stored:
        return counts
    if expected_vocab_size > stored:
        return torch.cat([counts, counts.new_zeros(expected_vocab_size - stored)])
    raise ValueError(
        f"{path}: vocab counts have {stored} entries but the model vocabulary has {expected_vocab_size}; "
        "a smaller vocabulary cannot be matched — recount with the model's tokenizer"
    )


def caption_texts_from_llava(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The caption text of each LLaVA record (docs/method.md §2): its assistant answers joined by spaces.

    A record is ``{"conversations": [{"from": "human"|"gpt", "value": str}, ...]}``; answers come
    from turns whose ``from`` is one of :data:`ASSISTANT_ROLES`. Records without an answer are
    skipped. The answers are kept in their order (the official training shuffles them; counts
    are insensitive to the order up to the joins).
    """
    for rec in records:
        if text := _answer_text(rec.get("conversations")):
            yield text


def _answer_text(turns: Any) -> str:
    """The assistant answers of LLaVA ``turns`` joined by spaces (``""`` when none, or not turns)."""
    if not isinstance(turns, list):
        return ""
    answers = [
        str(t.get("value", "")).strip()
        for t in turns
        if isinstance(t, Mapping) and t.get("from") in ASSISTANT_ROLES
    ]
    return " ".join(a for a in answers if a)


def _check_out(out: str | os.PathLike) -> None:
    """Refuse an ``--out`` that is a directory, or an existing file that is not a counts file (a
    user's file, the data itself): it would be replaced."""
    path = Path(out)
    if path.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory: pass the .safetensors file to write")
    if not path.exists():
        return
    try:
        ours = read_vocab_counts_meta(path).get("format") == _FORMAT
    except Exception:  # not a safetensors file at all
        ours = False
    if not ours:
        raise FileExistsError(
            f"--out {out} exists and is not a vocab-counts file; cmpt does not replace it: move or "
            "remove it, or choose another --out"
        )


def vocab_prior_main(data_json: str, tokenizer: Any, out: str, batch_size: int = 1000) -> dict[str, Any]:
    """``cmpt data vocab-prior DATA --tokenizer T --out F``: count caption tokens and save them.

    ``data_json``: any form ``data.path`` takes (the module docstring); a record that cannot be read
    is skipped, counted (``num_bad``) and the first one named in a warning. An existing ``out`` that
    is not a counts file is refused before anything is read. ``tokenizer`` is a name /
    local directory for ``AutoTokenizer.from_pretrained`` (no remote code) or a tokenizer object; a
    local path that does not exist, or a hub id missing offline, is one error naming it
    (:func:`cmpt.hub.resolving`). Returns a summary dict (out, tokenizer, vocab_size, num_records,
    num_bad, num_texts, num_tokens, num_distinct_tokens).
    """
    from cmpt.data.open import iter_records, open_source
    from cmpt.data.sources import BadSample

    _check_out(out)
    source = open_source(data_json, key="DATA")  # a missing path or an unknown form: one line
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tok_name = str(tokenizer)
        with resolving(tok_name, "tokenizer (--tokenizer)"):
            tok = AutoTokenizer.from_pretrained(tok_name)
    else:
        tok = tokenizer
        tok_name = str(getattr(tok, "name_or_path", "") or type(tok).__name__)
    n_records = n_texts = 0
    bad: list[BadSample] = []

    def texts() -> Iterator[str]:
        nonlocal n_records, n_texts
        for rec in iter_records(source):
            n_records += 1
            if isinstance(rec, BadSample):
                bad.append(rec)
            elif text := _answer_text(rec.conversations):
                n_texts += 1
                yield text

    counts = count_tokens(texts(), tok, batch_size=batch_size)
    if bad:
        log.warning(
            "vocab-prior: skipped %d record(s) that cannot be read (first: %s); `cmpt data check %s` "
            "lists them",
            len(bad), bad[0], data_json,
        )  # fmt: skip
    if int(counts.sum()) == 0:  # the prior divides by Σ n (docs/method.md §2): undefined for no tokens
        raise ValueError(
            f"{data_json}: no caption tokens counted ({n_records} records, {len(bad)} unreadable, {n_texts} "
            f"with an assistant answer from {sorted(ASSISTANT_ROLES)}); the prior needs conversation or "
            "caption records (documents and contrastive pairs have none)"
        )
    size = counts.numel()
    meta = {
        "tokenizer": tok_name,
        "num_texts": n_texts,
        "num_records": n_records,
        "num_bad": len(bad),
        "source": str(data_json),
        "vocab_fingerprint": vocab_fingerprint(tok, size),
    }
    save_vocab_counts(counts, out, meta)
    return {
        "out": str(out),
        "tokenizer": tok_name,
        "vocab_size": size,
        "num_records": n_records,
        "num_bad": len(bad),
        "num_texts": n_texts,
        "num_tokens": int(counts.sum()),
        "num_distinct_tokens": int((counts > 0).sum()),
    }
