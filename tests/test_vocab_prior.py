"""Tests of the vocabulary-count prior files (docs/method.md §2, `cmpt data vocab-prior`)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cmpt.data.vocab_prior import (
    caption_texts_from_llava,
    count_tokens,
    load_vocab_counts,
    read_vocab_counts_meta,
    save_vocab_counts,
    vocab_prior_main,
)

TEXTS = ["a red bar chart", "the bar is red", "a cat on a mat", "", "chart chart chart"]
RECORDS = [
    {
        "image": "x.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "a red bar chart"},
            {"from": "human", "value": "Color?"},
            {"from": "gpt", "value": "the bar is red"},
        ],
    },
    {"conversations": [{"from": "human", "value": "hi"}]},  # no answer: skipped
    {"conversations": [{"from": "gpt", "value": " a cat on a mat "}]},
]


def _wordlevel() -> Tokenizer:
    words = sorted({w for t in TEXTS for w in t.split()})
    tok = Tokenizer(
        models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS * 3, trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")


def test_count_tokens_wordlevel_matches_manual_count() -> None:
    tok = _wordlevel()
    vocab = tok.get_vocab()
    manual = Counter(vocab.get(w, 0) for t in [*TEXTS, "a dog"] for w in t.split())
    for tk in (tok, PreTrainedTokenizerFast(tokenizer_object=tok)):
        counts = count_tokens([*TEXTS, "a dog"], tk, batch_size=2)
        assert counts.dtype == torch.long and counts.shape == (len(vocab),)
        assert {i: int(c) for i, c in enumerate(counts) if c} == dict(manual)


def test_count_tokens_bpe_no_special_tokens_and_vocab_size() -> None:
    tok = _bpe()
    counts = count_tokens(TEXTS, tok, batch_size=3)
    manual = Counter(i for t in TEXTS for i in tok.encode(t, add_special_tokens=False))
    assert counts.shape == (len(tok),) and counts[tok.bos_token_id] == 0
    assert {i: int(c) for i, c in enumerate(counts) if c} == dict(manual)
    assert count_tokens(TEXTS, tok, vocab_size=len(tok) + 5).shape == (len(tok) + 5,)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        count_tokens(TEXTS, tok, vocab_size=2)


def test_save_load_round_trip_and_size_rule(tmp_path) -> None:
    counts = torch.tensor([3, 0, 7, 1])
    path = tmp_path / "sub" / "counts.safetensors"
    save_vocab_counts(counts, path, {"tokenizer": "tiny", "num_texts": 12})
    assert torch.equal(load_vocab_counts(path), counts)
    assert torch.equal(load_vocab_counts(path, expected_vocab_size=4), counts)
    meta = read_vocab_counts_meta(path)
    assert meta["tokenizer"] == "tiny" and json.loads(meta["num_texts"]) == 12 and meta["vocab_size"] == "4"
    # Tokens appended to the tokenizer after counting: zero-padded.
    assert torch.equal(load_vocab_counts(path, expected_vocab_size=6), torch.tensor([3, 0, 7, 1, 0, 0]))
    with pytest.raises(ValueError, match=r"counts\.safetensors.*4 entries.*vocabulary has 3"):
        load_vocab_counts(path, expected_vocab_size=3)


def test_main_json_and_jsonl_with_prefix_check(tmp_path) -> None:
    tok = _bpe()
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    js = tmp_path / "data.json"
    js.write_text(json.dumps(RECORDS))
    jl = tmp_path / "data.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    texts = list(caption_texts_from_llava(RECORDS))
    assert texts == ["a red bar chart the bar is red", "a cat on a mat"]
    expected = count_tokens(texts, tok)
    out_a, out_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    summary = vocab_prior_main(str(js), str(tok_dir), str(out_a))
    vocab_prior_main(str(jl), tok, str(out_b))
    assert summary["num_records"] == 3 and summary["num_texts"] == 2
    assert summary["vocab_size"] == len(tok) and summary["num_tokens"] == int(expected.sum())
    for out in (out_a, out_b):
        assert torch.equal(load_vocab_counts(out, tokenizer=tok), expected)
    assert read_vocab_counts_meta(out_a)["tokenizer"] == str(tok_dir)
    # The model's tokenizer gained special tokens (appended): padded, prefix verified.
    tok.add_special_tokens({"additional_special_tokens": ["<|image_pad|>", "<|vision_start|>"]})
    grown = load_vocab_counts(out_a, expected_vocab_size=len(tok), tokenizer=tok)
    assert grown.shape == (len(tok),) and torch.equal(grown[: expected.numel()], expected)
    # A different tokenizer is caught by the fingerprint check.
    other = PreTrainedTokenizerFast(tokenizer_object=_wordlevel())
    with pytest.raises(ValueError, match="differ"):
        load_vocab_counts(out_a, tokenizer=other)


def test_bad_jsonl_line_is_skipped_counted_and_named(tmp_path, caplog) -> None:
    # as training skips it (docs/method.md §4): the prior counts what the loader reads
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    tok = _bpe()
    summary = vocab_prior_main(str(jl), tok, str(tmp_path / "o.safetensors"))
    assert summary["num_records"] == 2 and summary["num_bad"] == 1 and summary["num_texts"] == 1
    expected = count_tokens(caption_texts_from_llava(RECORDS[:1]), tok)
    assert torch.equal(load_vocab_counts(tmp_path / "o.safetensors"), expected)
    assert "skipped 1 record(s)" in caplog.text and "bad.jsonl:2" in caplog.text


def test_main_refuses_data_without_caption_tokens(tmp_path) -> None:
    jl = tmp_path / "empty.jsonl"
    jl.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="no caption tokens"):
        vocab_prior_main(str(jl), _bpe(), str(tmp_path / "o.safetensors"))
    assert not (tmp_path / "o.safetensors").exists()
