"""NativeViT.from_hf reproduces Hugging Face's last_hidden_state (docs/method.md §1 "Families"),
fp32, ≤ 1e-4."""

from __future__ import annotations

import pytest
import torch

import hf_tiny
from cmpt import NativeViT

# checkpoint resolution is 56 px = 4×4 patches; the others are larger, smaller and non-square grids
SIZES = [(56, 56), (84, 42), (28, 70), (112, 98), (42, 28)]
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {fam: hf_tiny.save(fam, root) for fam in hf_tiny.FAMILIES}


def _hf_forward(hf, family: str, x: torch.Tensor) -> torch.Tensor:
    interpolate = tuple(x.shape[-2:]) != (56, 56)
    kwargs = {"interpolate_pos_encoding": interpolate} if family in ("siglip", "clip") else {}
    with torch.no_grad():
        return hf(pixel_values=x, **kwargs)


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
@pytest.mark.parametrize("size", SIZES)
def test_last_hidden_state_parity(checkpoints, family, size):
    if family == "aimv2" and size != (56, 56):
        pytest.skip("HF cannot resize AIMv2's learned table: parity only at the checkpoint resolution")
    hf = type(hf_tiny.build(family)).from_pretrained(checkpoints[family]).eval()
    vit = NativeViT.from_hf(checkpoints[family], rope=False, keep_prefix_tokens=True).eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    ref = _hf_forward(hf, family, x).last_hidden_state
    with torch.no_grad():
        out = vit.forward_images([x[0], x[1]])
    for i in range(2):
        assert out[i].shape == ref[i].shape
        assert (out[i] - ref[i]).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["dinov2", "dinov2_reg", "siglip", "clip"])
def test_pooled_output_parity(checkpoints, family):
    hf = type(hf_tiny.build(family)).from_pretrained(checkpoints[family]).eval()
    vit = NativeViT.from_hf(checkpoints[family]).eval()
    x = torch.randn(3, 3, 56, 56)
    ref = _hf_forward(hf, family, x).pooler_output
    patches = torch.cat([img.reshape(3, 4, 14, 4, 14).permute(1, 3, 0, 2, 4).reshape(16, -1) for img in x])
    with torch.no_grad():
        tokens, prefix = vit.encode(patches, [(4, 4)] * 3, merge_size=1)
        pooled = vit.pool(tokens, prefix, [(4, 4)] * 3)
    assert (pooled - ref).abs().max().item() <= TOL


@pytest.mark.parametrize(
    "family,full_cls",
    [("clip", "CLIPModel"), ("siglip", "SiglipModel"), ("aimv2", "Aimv2Model")],
)
def test_vision_tower_of_full_checkpoint(tmp_path, family, full_cls):
    import transformers as tf

    cfg_cls = getattr(tf, full_cls.replace("Model", "Config"))
    text_cls = getattr(tf, full_cls.replace("Model", "TextConfig"))
    vision = hf_tiny.build(family)
    text = text_cls(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    full = getattr(tf, full_cls)(cfg_cls(text_config=text.to_dict(), vision_config=vision.config.to_dict()))
    full.save_pretrained(tmp_path)
    vit = NativeViT.from_hf(tmp_path).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ref = full.vision_model(pixel_values=x).last_hidden_state[0]
        out = vit.forward_images([x[0]])[0]
    assert (out - ref).abs().max().item() <= TOL


def test_odd_grid_dinov2_native_518(checkpoints):
    """DINOv2's native 518 px is a 37×37 grid: no 2×2 merge needed for forward_images."""
    hf = type(hf_tiny.build("dinov2")).from_pretrained(checkpoints["dinov2"]).eval()
    vit = NativeViT.from_hf(checkpoints["dinov2"]).eval()
    x = torch.randn(1, 3, 518, 518)
    ref = _hf_forward(hf, "dinov2", x).last_hidden_state[0]
    with torch.no_grad():
        out = vit.forward_images([x[0]])[0]
    assert out.shape == (1 + 37 * 37, 32)
    assert (out - ref).abs().max().item() <= TOL


def test_unsupported_architecture_is_named(tmp_path):
    import transformers as tf

    tf.ViTModel(
        tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'vit' is not supported"):
        NativeViT.from_hf(tmp_path)


def test_missing_config_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        NativeViT.from_hf(tmp_path)
