"""Tiny offline tokenizer and causal LMs (docs/method.md §2 assembly needs any HF causal LM)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cmpt.demo.tiny_lm import (
    DEFAULT_SYSTEM_PROMPT,
    build_tiny_causal_lm,
    default_corpus,
    save_tiny_lm,
    train_tokenizer,
)
from cmpt.vlm.chat import IMAGE_PAD, VISION_START, ensure_vision_tokens, render_conversation, render_prompt


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_tok")
    train_tokenizer(default_corpus(500), vocab_size=512, out_dir=out)
    return out


def test_default_corpus_deterministic():
    a, b = default_corpus(50, seed=1), default_corpus(50, seed=1)
    assert a == b and len(a) == 50 and a != default_corpus(50, seed=2)
    assert all(isinstance(x, str) and x for x in a)


def test_tokenizer_is_qwen_like(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    for t in ("<|vision_start|>", IMAGE_PAD, "<|vision_end|>"):
        assert len(tok.encode(t, add_special_tokens=False)) > 1  # vision tokens are not built in
    assert len(tok) <= 512
    text = "The red bar is 42% larger. ünïcödé → ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text  # byte level: lossless on anything
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    msgs = [{"role": "system", "content": "S"}, *msgs, {"role": "assistant", "content": "Yo"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    )


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_build_save_reload_generate(tok_dir, tmp_path, arch):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = build_tiny_causal_lm(tok, arch=arch, hidden_size=32, intermediate_size=64)
    assert type(model).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    same = build_tiny_causal_lm(tok, arch=arch, hidden_size=32, intermediate_size=64)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), same.state_dict().values()))

    out = save_tiny_lm(model, tok, tmp_path / arch)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model2 = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the total?"}], tokenize=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    assert tok2.encode(text, add_special_tokens=False) == ids[0].tolist()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model2(input_ids=ids).logits
    assert a.shape == (1, ids.shape[1], len(tok))
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    gen = model2.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[0] == 1 and ids.shape[1] < gen.shape[1] <= ids.shape[1] + 3


def test_untied_and_unknown_arch(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    m = build_tiny_causal_lm(tok, hidden_size=32, intermediate_size=64, tie_word_embeddings=False)
    assert m.get_input_embeddings().weight.data_ptr() != m.get_output_embeddings().weight.data_ptr()
    with pytest.raises(ValueError, match="arch"):
        build_tiny_causal_lm(tok, arch="gpt9")


def test_vision_tokens_resize_forward(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = build_tiny_causal_lm(tok, hidden_size=32, intermediate_size=64)
    n = len(tok)
    assert ensure_vision_tokens(tok) == [VISION_START, IMAGE_PAD, "<|vision_end|>"]
    model.resize_token_embeddings(len(tok))
    assert model.get_input_embeddings().weight.shape[0] >= n + 3
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A circle."}]
    s = render_conversation(conv, tok, [6])
    assert int(s.input_ids.max()) >= n  # the vision ids are the new rows
    with torch.no_grad():
        out = model(input_ids=s.input_ids[None], labels=s.labels[None])
    assert torch.isfinite(out.loss)
    prompt = render_prompt("What is it?", tok, [6])
    gen = model.generate(prompt[None], max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > prompt.shape[0]
