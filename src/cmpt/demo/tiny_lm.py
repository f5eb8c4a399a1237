"""Tiny, locally built language models for offline use and tests.

docs/method.md §2 assembles a VLM from *any* Hugging Face causal LM; the paper uses Qwen2.5-0.5B-Instruct.
Nothing here downloads anything: a byte-level BPE tokenizer with Qwen2.5's ChatML conventions is
trained in seconds on a synthetic corpus, and a randomly initialised Qwen2 or Llama model of a few
hundred thousand parameters is built from a local config. Both are saved as ordinary Hugging Face
directories (``tokenizer.json`` + ``config.json`` + ``model.safetensors``), so every code path that
loads a real checkpoint with ``AutoTokenizer`` / ``AutoModelForCausalLM`` can be exercised offline.

The vision tokens (``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``) are deliberately *not*
part of the trained tokenizer: :func:`cmpt.vlm.chat.ensure_vision_tokens` adds them, as it must for
any text-only LLM (docs/method.md §2, "tokens absent from a tokenizer are added").
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# A ChatML template in the style of Qwen2.5-Instruct (tool calls left out). Like Qwen2/Qwen2.5 it
# inserts a default system turn when the conversation has none, so that what a tiny model sees in
# tests has the same shape as what Qwen2.5 sees; the default text is Qwen2's generic one.
CHATML_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- set rest = messages -%}"
    "{%- endif -%}"
    "{%- for message in rest -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_SUBJECTS = [
    "the chart",
    "the bar plot",
    "the document",
    "the table",
    "the diagram",
    "the page",
    "the figure",
    "the invoice",
    "the map",
    "the scatter plot",
    "the pie chart",
    "the form",
]
_SHAPES = ["circle", "square", "triangle", "rectangle", "star", "hexagon", "line", "arrow", "dot"]
_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "grey", "pink"]
_VERBS = ["shows", "contains", "displays", "lists", "compares", "highlights", "summarises"]
_NOUNS = ["sales", "prices", "scores", "counts", "totals", "values", "labels", "dates", "names"]
_QUESTIONS = [
    "What is the largest bar?",
    "How many shapes are there?",
    "What colour is the {s}?",
    "What does {t} show?",
    "Which value is the highest?",
    "What is written in the title?",
    "Describe the image.",
    "Where is the {c} {s}?",
    "What is the total?",
]


def default_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Synthetic English-like sentences about charts, documents, shapes, numbers and colours.

    Deterministic for a given ``(n, seed)``; enough to train a small BPE without any data.
    """
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(n):
        t, s, c = rng.choice(_SUBJECTS), rng.choice(_SHAPES), rng.choice(_COLOURS)
        num, num2 = rng.randint(0, 1000), round(rng.uniform(0, 100), rng.choice([0, 1, 2]))
        kind = i % 5
        if kind == 0:
            text = f"{t.capitalize()} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)} for {2000 + num % 25}."
        elif kind == 1:
            text = f"There are {num % 12} {c} {s}s and one {rng.choice(_COLOURS)} {rng.choice(_SHAPES)}."
        elif kind == 2:
            text = rng.choice(_QUESTIONS).format(s=s, t=t, c=c)
        elif kind == 3:
            text = f"The largest bar is {c} with a value of {num2}, about {num}% more than the smallest."
        else:
            text = f"In {t}, the {c} {s} is at the {rng.choice(['top', 'bottom', 'left', 'right'])}."
        out.append(text)
    return out


def train_tokenizer(
    texts: Iterable[str] | None = None,
    vocab_size: int = 1024,
    out_dir: str | Path | None = None,
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer that behaves like a Qwen2.5(-Instruct) tokenizer.

    ChatML special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) are appended
    after the BPE vocabulary, like in Qwen2.5; no BOS token is used, and ``chat_template`` is
    :data:`CHATML_TEMPLATE`. The vision tokens are *not* included (see the module docstring).
    ``texts`` defaults to :func:`default_corpus`. When ``out_dir`` is given the tokenizer is saved
    there with ``save_pretrained`` (loadable with ``AutoTokenizer.from_pretrained``).
    """
    if texts is None:
        texts = default_corpus()
    specials = [END_OF_TEXT, IM_START, IM_END]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(specials), len(alphabet)),
        initial_alphabet=alphabet,
        show_progress=False,
        special_tokens=[],
    )
    # The ChatML role words and the default system prompt appear in every rendered conversation;
    # seeing them in training makes them a few tokens each, as in a real tokenizer.
    chat_words = ["system", "user", "assistant", DEFAULT_SYSTEM_PROMPT] * 20
    bpe.train_from_iterator(itertools.chain(texts, chat_words), trainer=trainer)
    bpe.add_special_tokens(specials)  # appended after the BPE vocabulary, in Qwen's order
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        unk_token=None,
        bos_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_TEMPLATE
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    return tok


def build_tiny_causal_lm(
    tokenizer: transformers.PreTrainedTokenizerBase,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    max_position_embeddings: int = 8192,
) -> transformers.PreTrainedModel:
    """A randomly initialised ``Qwen2ForCausalLM`` or ``LlamaForCausalLM`` sized for ``tokenizer``.

    The vocabulary is ``len(tokenizer)`` (so added tokens are covered); pad/eos come from the
    tokenizer, and bos is the tokenizer's bos or, when it has none (Qwen style), its pad token.
    Initialisation is deterministic given ``seed``.
    """
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
    )
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(f"unknown tiny LM arch {arch!r}; choose 'qwen2' or 'llama'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.eval()
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = pad_id, eos_id, bos_id
    return model


def save_tiny_lm(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    out_dir: str | Path,
) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to ``out_dir`` as a Hugging Face directory.

    The result loads with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "END_OF_TEXT",
    "IM_END",
    "IM_START",
    "build_tiny_causal_lm",
    "default_corpus",
    "save_tiny_lm",
    "train_tokenizer",
]
