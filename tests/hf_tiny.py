"""Tiny random-weight Hugging Face vision checkpoints, built and saved locally (no hub access)."""

from __future__ import annotations

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


def save(family: str, root: Path, image_size: int = 56) -> Path:
    out = Path(root) / family
    build(family, image_size).save_pretrained(out)
    return out
