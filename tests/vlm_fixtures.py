"""Tiny VisionLanguageModels and micro-batches for the VLM, objective and packing tests.

Batches go through the real :func:`cmpt.data.pipeline.collate` (rendered conversations, captions,
random patches), so every test exercises the production batch contract.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cmpt.data.pipeline import ProcessedSample, collate
from cmpt.demo.tiny_lm import build_tiny_causal_lm, default_corpus, save_tiny_lm, train_tokenizer
from cmpt.vision.processor import ImageProcessor
from cmpt.vision.vit import NativeViT, NativeViTConfig
from cmpt.vlm.chat import caption_ids, render_conversation
from cmpt.vlm.model import VisionLanguageModel

P = 14
PATCH_DIM = 3 * P * P

TWO = [
    {"id": "a", "grids": [(2, 2), (4, 2)], "question": "What does the chart show?", "answer": "The sales."},
    {"id": "b", "grids": [], "question": "How many shapes are there?", "answer": "There are 3 red dots."},
]
THREE = [
    {"id": "x", "grids": [(4, 4)], "question": "Describe the image.", "answer": "A blue square."},
    {"id": "y", "grids": [], "question": "What is the total?", "answer": "The total is 12."},
    {"id": "z", "grids": [(2, 4), (2, 2)], "question": "What colour?", "answer": "Green and red."},
]
# very different lengths: a short text-only turn, a long multi-image sample, a long text-only one
UNEVEN = [
    {"id": "s", "grids": [], "question": "Hi?", "answer": "Yes."},
    {
        "id": "m",
        "grids": [(4, 4), (2, 2), (4, 2)],
        "question": "Compare the three charts and describe every bar in detail, one by one.",
        "answer": "The first chart shows sales rising; the second is flat; the third falls. " * 3,
    },
    {"id": "t", "grids": [], "question": "Tell a long story. " * 6, "answer": "Once upon a time. " * 8},
    {"id": "u", "grids": [(2, 2)], "question": "Colour?", "answer": "Red."},
]


def build_dirs(root: Path) -> Path:
    """``root/{qwen2, llama, vit}``: tiny random LMs (tied / untied head) and a tiny NativeViT."""
    tok = train_tokenizer(default_corpus(300), vocab_size=400)
    save_tiny_lm(build_tiny_causal_lm(tok, "qwen2"), tok, root / "qwen2")
    save_tiny_lm(build_tiny_causal_lm(tok, "llama", tie_word_embeddings=False, seed=1), tok, root / "llama")
    torch.manual_seed(0)
    cfg = NativeViTConfig(
        hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, pos_grid=4, patch_size=P
    )
    NativeViT(cfg).save_pretrained(root / "vit")
    return root


def build_vlm(dirs: Path, arch: str = "qwen2", **kw) -> VisionLanguageModel:
    processor = ImageProcessor(P, 2, min_pixels=28 * 28, max_pixels=56 * 56)
    return VisionLanguageModel.build(dirs / "vit", dirs / arch, processor=processor, **kw)


def make_batch(vlm: VisionLanguageModel, samples: list[dict], seed: int = 0) -> dict:
    """Collate ``samples`` (``{"id", "grids": [(h, w), ...], "question", "answer"}``; ``tokens``
    overrides the placeholders rendered per image, to provoke mismatches) with random patches."""
    gen = torch.Generator().manual_seed(seed)
    built = []
    for s in samples:
        n_tok = s.get("tokens", [h * w // 4 for h, w in s["grids"]])
        conv = [
            {"from": "human", "value": "<image>\n" * len(s["grids"]) + s["question"]},
            {"from": "gpt", "value": s["answer"]},
        ]
        r = render_conversation(conv, vlm.tokenizer, n_tok, sample_id=s["id"])
        patches = [torch.randn(h * w, PATCH_DIM, generator=gen) for h, w in s["grids"]]
        cap = caption_ids(r.caption, vlm.tokenizer, 32) if s["grids"] else torch.zeros(0, dtype=torch.long)
        built.append(
            ProcessedSample(
                s["id"],
                torch.cat(patches) if patches else torch.zeros(0, PATCH_DIM),
                list(s["grids"]),
                r.input_ids,
                r.labels,
                cap,
                [h * w // 4 for h, w in s["grids"]],
            )
        )
    return collate(built)


def zero_grads(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.grad = None
