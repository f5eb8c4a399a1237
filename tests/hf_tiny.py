"""Tiny random-weight Hugging Face vision checkpoints, built and saved locally (no hub access)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=14)
FAMILIES = ("dinov2", "dinov2_reg", "dinov2_swiglu", "siglip", "clip", "aimv2", "aimv2_native")


def build(family: str, image_size: int = 56, seed: int = 0):
    """A tiny HF vision model of ``family`` with random (seeded) weights, including the usually-zero
    tokens and LayerScale, so that every converted tensor matters."""
    import transformers as tf

    torch.manual_seed(seed)
    if family.startswith("dinov2"):
        kw = dict(COMMON, image_size=image_size)
        if family == "dinov2_reg":
            model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**kw, num_register_tokens=2))
        else:
            model = tf.Dinov2Model(tf.Dinov2Config(**kw, use_swiglu_ffn=family == "dinov2_swiglu"))
    elif family == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**COMMON, image_size=image_size))
    elif family == "clip":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**COMMON, image_size=image_size))
    elif family.startswith("aimv2"):
        model = tf.Aimv2VisionModel(
            tf.Aimv2VisionConfig(**COMMON, image_size=image_size, is_native=family == "aimv2_native")
        )
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "register_tokens", "lambda1", "class_embedding", "probe")):
                p.normal_(0, 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


PREPROCESSOR = {  # shapes of the real checkpoints' preprocessor_config.json
    "dinov2": {
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "size": {"shortest_edge": 256},
    },
    "siglip": {
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"height": 56, "width": 56},
    },
    "clip": {
        "image_mean": [0.4815, 0.4578, 0.4082],
        "image_std": [0.2686, 0.2613, 0.2758],
        "size": {"shortest_edge": 56},
    },
    "aimv2": {
        "image_mean": [0.4815, 0.4578, 0.4082],
        "image_std": [0.2686, 0.2613, 0.2758],
        "size": {"shortest_edge": 56},
    },
}


def save(family: str, root: Path, image_size: int = 56) -> Path:
    """Save the tiny model and a family-typical ``preprocessor_config.json`` under ``root/family``."""
    out = Path(root) / family
    build(family, image_size).save_pretrained(out)
    pre = dict(PREPROCESSOR[family.split("_")[0]], crop_size={"height": image_size, "width": image_size})
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    return out
