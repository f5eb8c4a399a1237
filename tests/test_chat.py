"""Conversation rendering: placeholders, labels, truncation, captions (docs/method.md §2)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from cmpt.demo.tiny_lm import train_tokenizer
from cmpt.vlm import chat, vision_tokens
from cmpt.vlm.chat import caption_ids, collate_rendered, render_conversation, render_prompt
from cmpt.vlm.vision_tokens import IGNORE_INDEX, IMAGE_PAD, VISION_END, VISION_START, ensure_vision_tokens


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(vocab_size=512, out_dir=out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    t = AutoTokenizer.from_pretrained(tok_dir)
    ensure_vision_tokens(t)
    return t


def _ids(tok, token: str) -> int:
    return tok.convert_tokens_to_ids(token)


def _supervised_text(tok, sample) -> str:
    return tok.decode(sample.labels[sample.labels != IGNORE_INDEX])


def _supervised_runs(sample) -> list[torch.Tensor]:
    """Contiguous runs of supervised ids."""
    sup = [*(sample.labels != IGNORE_INDEX).tolist(), False]
    runs, start = [], None
    for i, s in enumerate(sup):
        if s and start is None:
            start = i
        elif not s and start is not None:
            runs.append(sample.labels[start:i])
            start = None
    return runs


CONV = [
    {"from": "human", "value": "<image>\nWhat is the largest bar?"},
    {"from": "gpt", "value": "The red bar."},
    {"from": "human", "value": "How many bars are there?"},
    {"from": "gpt", "value": "There are 4 bars."},
]


def test_ensure_vision_tokens_idempotent(tok_dir):
    t = AutoTokenizer.from_pretrained(tok_dir)
    assert all(len(t.encode(x, add_special_tokens=False)) > 1 for x in (VISION_START, IMAGE_PAD))
    n = len(t)
    assert ensure_vision_tokens(t) == [VISION_START, IMAGE_PAD, VISION_END]
    assert len(t) == n + 3
    assert ensure_vision_tokens(t) == []
    assert len(t) == n + 3
    for x in (VISION_START, IMAGE_PAD, VISION_END):
        assert t.encode(x, add_special_tokens=False) == [t.convert_tokens_to_ids(x)]
    assert t.encode("a" + IMAGE_PAD * 3 + "b", add_special_tokens=False).count(_ids(t, IMAGE_PAD)) == 3


def test_only_assistant_tokens_supervised(tok):
    s = render_conversation(CONV, tok, [4], sample_id="s1")
    assert s.input_ids.shape == s.labels.shape and s.input_ids.dtype == torch.long
    runs = [tok.decode(r) for r in _supervised_runs(s)]
    assert runs == ["The red bar.<|im_end|>", "There are 4 bars.<|im_end|>"]
    sup = s.labels != IGNORE_INDEX
    assert torch.equal(s.labels[sup], s.input_ids[sup])
    text = tok.decode(s.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")  # Qwen default
    assert "<|im_start|>assistant\nThe red bar.<|im_end|>\n<|im_start|>user" in text
    assert not s.truncated and s.num_image_tokens == [4]


def test_system_message_and_role_content_style(tok):
    conv = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Describe the image. <image>"},
        {"role": "assistant", "content": "A blue circle."},
    ]
    s = render_conversation(conv, tok, [2], system="ignored default")
    text = tok.decode(s.input_ids)
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>") and "ignored" not in text
    assert _supervised_text(tok, s) == "A blue circle.<|im_end|>"
    s2 = render_conversation(conv[1:], tok, [2], system="Be terse.")
    assert tok.decode(s2.input_ids).startswith("<|im_start|>system\nBe terse.<|im_end|>")


def test_text_only_sample(tok):
    conv = [{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "5"}]
    s = render_conversation(conv, tok, [])
    assert _ids(tok, IMAGE_PAD) not in s.input_ids.tolist()
    assert _supervised_text(tok, s) == "5<|im_end|>"


def test_consecutive_roles_are_merged(tok):
    conv = [
        {"from": "human", "value": "<image>"},
        {"from": "human", "value": "What shape?"},
        {"from": "gpt", "value": "A star."},
        {"from": "gpt", "value": "It is red."},
    ]
    s = render_conversation(conv, tok, [1])
    assert "user\n" + VISION_START + IMAGE_PAD + VISION_END + "\nWhat shape?" in tok.decode(s.input_ids)
    assert [tok.decode(r) for r in _supervised_runs(s)] == ["A star.\nIt is red.<|im_end|>"]
    assert s.caption == "A star. It is red."


def _spans(tok, ids: torch.Tensor) -> list[int]:
    """Checks the image span structure and returns the pad count of every span, in order."""
    start, pad, end = (_ids(tok, x) for x in (VISION_START, IMAGE_PAD, VISION_END))
    out, i, ids = [], 0, ids.tolist()
    while i < len(ids):
        if ids[i] == start:
            j = i + 1
            while ids[j] == pad:
                j += 1
            assert ids[j] == end
            out.append(j - i - 1)
            i = j
        else:
            assert ids[i] not in (pad, end)
        i += 1
    return out


def test_placeholder_expansion_multiple_images(tok):
    conv = [
        {"from": "human", "value": "<image><image>\nCompare these."},
        {"from": "gpt", "value": "The first is larger."},
        {"from": "human", "value": "And this one? <image> Is it blue?"},
        {"from": "gpt", "value": "Yes."},
    ]
    n = [5, 1, 7]
    s = render_conversation(conv, tok, n, sample_id="multi")
    assert (s.input_ids == _ids(tok, IMAGE_PAD)).sum() == sum(n)
    assert _spans(tok, s.input_ids) == n
    assert (s.labels[s.input_ids == _ids(tok, IMAGE_PAD)] == IGNORE_INDEX).all()
    runs = [tok.decode(r) for r in _supervised_runs(s)]
    assert runs == ["The first is larger.<|im_end|>", "Yes.<|im_end|>"]


@pytest.mark.parametrize(
    ("conv", "n"),
    [
        (CONV, [3, 3]),  # fewer placeholders than images
        (CONV, []),  # placeholder without image
        ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], [3]),  # images, no <image>
    ],
)
def test_placeholder_mismatch_raises(tok, conv, n):
    with pytest.raises(ValueError, match=r"sample abc-17: \d+ <image> placeholder.*\d+ image") as e:
        render_conversation(conv, tok, n, sample_id="abc-17")
    assert "one <image> per image" in str(e.value)


@pytest.mark.parametrize(
    ("conv", "match"),
    [
        ([], "empty conversation"),
        ([{"from": "human", "value": "Hi"}], "no assistant turn"),
        ([{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image> y"}], "belong in user turns"),
        ([{"from": "human", "value": "<|image_pad|>"}, {"from": "gpt", "value": "y"}], "literal token"),
        ([{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}], "role"),
        (
            [
                {"from": "human", "value": "x"},
                {"from": "system", "value": "s"},
                {"from": "gpt", "value": "y"},
            ],
            "system turn",
        ),
    ],
)
def test_malformed_conversations_raise(tok, conv, match):
    with pytest.raises(ValueError, match=f"sample bad-1.*{match}"):
        render_conversation(conv, tok, [], sample_id="bad-1")


def test_missing_vision_tokens_raise(tok_dir):
    t = AutoTokenizer.from_pretrained(tok_dir)
    with pytest.raises(ValueError, match="ensure_vision_tokens"):
        render_conversation(CONV[:2], t, [4])
    assert render_conversation(CONV[2:], t, []).input_ids.numel() > 0  # text-only needs no vision tokens


def test_truncation(tok):
    full = render_conversation(CONV, tok, [6])
    cut = render_conversation(CONV, tok, [6], max_length=len(full.input_ids) - 5)
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids) - 5
    assert torch.equal(cut.input_ids, full.input_ids[: len(cut.input_ids)])
    assert torch.equal(cut.labels, full.labels[: len(cut.labels)])
    same = render_conversation(CONV, tok, [6], max_length=len(full.input_ids))
    assert not same.truncated and torch.equal(same.input_ids, full.input_ids)
    end_of_image = int((full.input_ids == _ids(tok, VISION_END)).nonzero()[0]) + 1
    ok = render_conversation(CONV, tok, [6], max_length=end_of_image)
    assert _spans(tok, ok.input_ids) == [6]
    for bad in (end_of_image - 1, end_of_image - 4, 3):
        with pytest.raises(ValueError, match=r"sample t1.*images are never cut"):
            render_conversation(CONV, tok, [6], max_length=bad, sample_id="t1")


def test_caption_join_and_shuffle(tok):
    conv = [
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": " A chart. "},
        {"from": "human", "value": "More?"},
        {"from": "gpt", "value": "Red bars."},
        {"from": "human", "value": "More?"},
        {"from": "gpt", "value": "Four of them."},
    ]
    assert render_conversation(conv, tok, [1]).caption == "A chart. Red bars. Four of them."
    caps = [render_conversation(conv, tok, [1], caption_rng=random.Random(s)).caption for s in range(8)]
    again = [render_conversation(conv, tok, [1], caption_rng=random.Random(s)).caption for s in range(8)]
    assert caps == again and len(set(caps)) > 1
    parts = sorted(["A chart.", "Red bars.", "Four of them."])
    assert all(sorted(p.strip() + "." for p in c.split(".") if p.strip()) == parts for c in caps)
    ids = caption_ids("A chart. Red bars.", tok, max_length=64)
    assert tok.decode(ids) == "A chart. Red bars." and ids.dtype == torch.long
    assert len(caption_ids("A chart. Red bars.", tok, max_length=2)) == 2
    assert not set(ids.tolist()) & set(tok.all_special_ids)


def test_render_prompt(tok):
    p = render_prompt("What is the largest bar?", tok, [3, 2])
    text = tok.decode(p)
    assert text.endswith("What is the largest bar?<|im_end|>\n<|im_start|>assistant\n")
    assert _spans(tok, p) == [3, 2]
    assert "user\n" + VISION_START in text
    # The prompt equals the training-time prefix of the same turn.
    conv = [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}]
    s = render_conversation(conv, tok, [4], system="S")
    p2 = render_prompt("<image>\nHi", tok, [4], system="S")
    assert torch.equal(s.input_ids[: len(p2)], p2)
    assert (s.labels[: len(p2)] == IGNORE_INDEX).all() and s.labels[len(p2)] != IGNORE_INDEX
    with pytest.raises(ValueError):
        render_prompt("<image><image>", tok, [3])


def test_collate(tok):
    a = render_conversation(CONV, tok, [3])
    b = render_conversation(CONV[:2], tok, [1])
    batch = collate_rendered([a, b], pad_id=tok.pad_token_id)
    shape = (2, len(a.input_ids))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == shape
    n = len(b.input_ids)
    assert torch.equal(batch["input_ids"][1, :n], b.input_ids)
    assert (batch["input_ids"][1, n:] == tok.pad_token_id).all()
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][1].sum() == n and batch["attention_mask"][0].all()


LLAMA3_STYLE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{{- m['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)


def test_other_templates(tok_dir):
    t = AutoTokenizer.from_pretrained(tok_dir)
    llama_specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    t.add_tokens(llama_specials, special_tokens=True)
    t.bos_token, t.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    ensure_vision_tokens(t)
    t.chat_template = LLAMA3_STYLE
    s = render_conversation(CONV, t, [2])
    assert s.input_ids[0] == t.bos_token_id and _spans(t, s.input_ids) == [2]
    runs = [t.decode(r) for r in _supervised_runs(s)]
    assert runs == ["The red bar.<|eot_id|>", "There are 4 bars.<|eot_id|>"]
    # No chat template at all: ChatML fallback, without a default system prompt.
    t2 = AutoTokenizer.from_pretrained(tok_dir)
    ensure_vision_tokens(t2)
    t2.chat_template = None
    s2 = render_conversation(CONV, t2, [2])
    assert t2.decode(s2.input_ids).startswith("<|im_start|>user\n" + VISION_START)
    assert t2.decode(_supervised_runs(s2)[0]) == "The red bar.<|im_end|>"
    # A template that rewrites earlier assistant turns is rejected.
    t2.chat_template = (
        "{%- for m in messages -%}{%- if m['role'] == 'assistant' and not loop.last -%}"
        "{{- '<|im_start|>a\\n' -}}"
        "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    with pytest.raises(ValueError, match=r"sample p9.*prefix-stable"):
        render_conversation(CONV, t2, [2], sample_id="p9")


def test_large_image_span_is_expanded(tok):
    """A 3000-token image renders to exactly one span of 3000 pads (timing lives in benchmarks, not tests)."""
    conv = [{"from": "human", "value": "<image>\nDescribe the chart."}, {"from": "gpt", "value": "Bars."}]
    s = render_conversation(conv, tok, [3000])
    assert _spans(tok, s.input_ids) == [3000]


def test_vision_token_names_are_still_importable_from_chat():
    for name in vision_tokens.__all__:
        if name in chat.__all__:
            assert getattr(chat, name) is getattr(vision_tokens, name)
    kept = {"IMAGE_TOKEN", "ConversationError", "ensure_vision_tokens", "ensure_mask_token"}
    assert kept <= set(chat.__all__)
