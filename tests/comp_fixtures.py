"""Offline starting points for CoMP recipe tests: a tiny HF ViT, a tiny LM, synthetic chart data."""

from __future__ import annotations

import json
from pathlib import Path

import hf_tiny


def make_tiny_setup(root: Path, n: int = 16) -> dict[str, Path]:
    """``root/{vit-hf, lm, data/train.json}``: what ``configs/tiny/*`` expect under ``{cache}/tiny``."""
    from cmpt.demo.synthetic import generate
    from cmpt.demo.tiny_lm import build_tiny_causal_lm, default_corpus, save_tiny_lm, train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    vit = hf_tiny.save("dinov2", root / "hf", image_size=56)
    data = generate("charts", n, root / "data", seed=0, split="train")
    texts = default_corpus(300) + [
        t["value"] for r in json.loads(data.read_text()) for t in r["conversations"]
    ]
    tok = train_tokenizer(texts, vocab_size=512)
    lm = save_tiny_lm(
        build_tiny_causal_lm(tok, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2), tok, root / "lm"
    )
    return {"vision": vit, "llm": lm, "data": data}


def overrides(setup: dict[str, Path], run_dir: Path, steps: int, **extra) -> list[str]:
    """`--set` overrides pointing a packaged tiny recipe at ``setup`` (fast, quiet)."""
    items = {
        "run.dir": run_dir,
        "model.vision": setup["vision"],
        "model.llm": setup["llm"],
        "data.path": setup["data"],
        "data.vision_budget": 128,
        "data.text_budget": 1024,
        "stage.resolution.max_pixels": 112 * 112,
        "train.steps": steps,
        "train.log_every": 5,
        "train.progress": False,
        "train.tensorboard": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]
