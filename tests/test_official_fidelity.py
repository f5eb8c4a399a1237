"""Fidelity to the official CoMP release (docs/method.md §1, §1.4): the SigLIP tower of a CoMP VLM
has no ``post_layernorm``; ``resize: official`` reproduces the release's two resizes.

References are re-implemented here from the method's description, independently of cmpt's code.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hf_tiny
from cmpt.data.config import ResolutionConfig
from cmpt.vision.processor import ImageProcessor
from cmpt.vision.vit import NativeViT
from cmpt.vlm.model import VisionLanguageModel

SIDE = 112  # checkpoint resolution of the tiny SigLIP: an 8×8 patch grid, 16 merged tokens
TOL = 1e-4
STAGE_CAP = 14 * 14 * 4 * 3000  # official native stages: at most 3000 merged tokens per image


# ---------------------------------------------------------------- tiny models, built locally


def _tiny_lm():
    """A 1-layer Qwen2 causal LM and a word-level tokenizer (random weights, no hub access)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = ["a", "chart", "of", "the", "red", "blue", "bar", "cat", "on", "mat"]
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[PAD]"
    )
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return Qwen2ForCausalLM(cfg).eval(), tok


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {fam: hf_tiny.save(fam, root, image_size=SIDE) for fam in ("siglip", "dinov2")}


def _build(vit) -> VisionLanguageModel:
    lm, tok = _tiny_lm()
    vlm = VisionLanguageModel.build(vit, lm, tok, rope=False)
    torch.manual_seed(1)
    with torch.no_grad():  # a non-trivial merger LayerNorm, so that the reference checks its use
        vlm.merger.norm.weight.normal_(1.0, 0.3)
        vlm.merger.norm.bias.normal_(0.0, 0.3)
    return vlm


def _pixels(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))


def _reference_merge(feats: torch.Tensor, h: int, w: int, merger) -> torch.Tensor:
    """Raster (h·w, D) ViT output → official PatchMerger: per-patch LayerNorm, 2×2 windows in raster
    order concatenated (patches in raster order inside a window), Linear → GELU → Linear."""
    d = feats.shape[-1]
    windows = feats.reshape(h // 2, 2, w // 2, 2, d).permute(0, 2, 1, 3, 4).reshape(-1, 4, d)
    normed = F.layer_norm(windows, (d,), merger.norm.weight, merger.norm.bias, merger.norm.eps)
    hidden = F.gelu(F.linear(normed.reshape(-1, 4 * d), merger.fc1.weight, merger.fc1.bias))
    return F.linear(hidden, merger.fc2.weight, merger.fc2.bias)


def _merged(vlm: VisionLanguageModel, img: Image.Image) -> torch.Tensor:
    packed = vlm.processor([img])
    assert packed.grid_hw.tolist() == [[SIDE // 14, SIDE // 14]]  # checkpoint resolution, no resize
    with torch.no_grad():
        return vlm.encode_images(packed.patches, packed.grid_hw)


# ---------------------------------------------------------------- §1: SigLIP tower without post-LN


def test_siglip_vlm_tower_matches_release_without_post_layernorm(hf_dirs, tmp_path):
    hf = type(hf_tiny.build("siglip")).from_pretrained(hf_dirs["siglip"]).eval()
    vlm = _build(hf_dirs["siglip"])
    assert vlm.vit.norm is None and vlm.vit.config.final_norm is False
    img = _pixels(0)
    x = (torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        encoded = hf.encoder(inputs_embeds=hf.embeddings(x[None])).last_hidden_state[0]  # before post-LN
        with_post_ln = hf(pixel_values=x[None]).last_hidden_state[0]
        ref = _reference_merge(encoded, SIDE // 14, SIDE // 14, vlm.merger)
        hf_style = _reference_merge(with_post_ln, SIDE // 14, SIDE // 14, vlm.merger)
    ours = _merged(vlm, img)
    assert ours.shape == ref.shape == (16, 32)
    assert (ours - ref).abs().max().item() <= TOL
    assert (ours - hf_style).abs().max().item() > 100 * TOL  # the test can tell the two towers apart

    # persisted: the saved VLM reloads without the norm, and the CoMP-VFM export too
    vlm.save_pretrained(tmp_path / "vlm")
    assert json.loads((tmp_path / "vlm" / "vision" / "config.json").read_text())["final_norm"] is False
    again = VisionLanguageModel.from_pretrained(tmp_path / "vlm")
    assert again.vit.norm is None
    torch.testing.assert_close(_merged(again, img), ours, atol=0, rtol=0)
    vfm = NativeViT.from_pretrained(vlm.export_vit(tmp_path / "vfm"))
    assert vfm.norm is None


def test_feature_extraction_keeps_siglip_post_layernorm(hf_dirs):
    hf = type(hf_tiny.build("siglip")).from_pretrained(hf_dirs["siglip"]).eval()
    vit = NativeViT.from_hf(hf_dirs["siglip"]).eval()
    assert vit.config.final_norm and vit.norm is not None
    x = torch.randn(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state[0]
        out = vit.forward_images([x[0]])[0]
    assert (out - ref).abs().max().item() <= TOL
    # the switch on its own: from_hf / from_pretrained with final_norm=False drop the norm
    assert NativeViT.from_hf(hf_dirs["siglip"], final_norm=False).norm is None


def test_vlm_written_with_the_norm_on_still_loads_unchanged(hf_dirs, tmp_path):
    """A VLM directory from before the switch (SigLIP tower with its post-LN) keeps it on reload."""
    vlm = _build(NativeViT.from_hf(hf_dirs["siglip"], keep_prefix_tokens=False))
    assert vlm.vit.norm is not None
    img = _pixels(3)
    before = _merged(vlm, img)
    vlm.save_pretrained(tmp_path / "old")
    again = VisionLanguageModel.from_pretrained(tmp_path / "old")
    assert again.vit.config.final_norm and again.vit.norm is not None
    torch.testing.assert_close(_merged(again, img), before, atol=0, rtol=0)
    plain = NativeViT.from_pretrained(tmp_path / "old" / "vision", final_norm=False)
    assert plain.norm is None


def test_dinov2_vlm_tower_keeps_its_final_layernorm(hf_dirs):
    hf = type(hf_tiny.build("dinov2")).from_pretrained(hf_dirs["dinov2"]).eval()
    vlm = _build(hf_dirs["dinov2"])
    assert vlm.vit.config.final_norm and vlm.vit.norm is not None
    torch.testing.assert_close(vlm.vit.norm.weight, hf.layernorm.weight, atol=0, rtol=0)
    torch.testing.assert_close(vlm.vit.norm.bias, hf.layernorm.bias, atol=0, rtol=0)


# ---------------------------------------------------------------- §1.4: the release's two resizes


def _ref_smart_resize(h: int, w: int, factor: int, lo: int, hi: int) -> tuple[int, int]:
    """Qwen2-VL's rule as described in docs/method.md §1.4 (nearest multiple, then floor/ceil)."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        hb, wb = (
            max(factor, math.floor(h / beta / factor) * factor),
            max(factor, math.floor(w / beta / factor) * factor),
        )
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def _official_two_step(img: Image.Image, lo: int, hi: int) -> Image.Image:
    """qwen-vl-utils ``fetch_image`` (factor 28, 4·28² … 16384·28², PIL's default filter), then the
    Qwen2-VL processor's smart_resize at the stage cap (PIL bicubic)."""
    h1, w1 = _ref_smart_resize(img.height, img.width, 28, 4 * 28 * 28, 16384 * 28 * 28)
    first = img.resize((w1, h1))  # no filter given, as fetch_image: bicubic for RGB
    h2, w2 = _ref_smart_resize(h1, w1, 28, lo, hi)
    return first if (h2, w2) == (h1, w1) else first.resize((w2, h2), Image.Resampling.BICUBIC)


def _image(h: int, w: int, seed: int) -> Image.Image:
    """A textured RGB image of any size, made cheaply (small noise upscaled, plus a gradient)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8))
    return small.resize((w, h), Image.Resampling.BILINEAR)


@pytest.mark.parametrize(
    "size,cap",
    [
        ((1000, 1333), 28 * 28 * 300),  # above the stage cap: the grid differs from a single resize
        ((3700, 3600), 28 * 28 * 600),  # above fetch_image's own 16384·28² cap too
        ((333, 500), 28 * 28 * 600),  # below the cap: one effective resize, as in single mode
        ((700, 1100), 28 * 28 * 600),
    ],
)
def test_official_resize_equals_two_step_reference(size, cap):
    img = _image(*size, seed=sum(size))
    official = ImageProcessor(max_pixels=cap, resize="official")
    single = ImageProcessor(max_pixels=cap)
    ref = _official_two_step(img, single.min_pixels, cap)
    got = official.prepare(img)
    assert got.size == ref.size and np.array_equal(np.asarray(got), np.asarray(ref))
    assert official.target_size(*size) == (ref.height, ref.width)  # length index == built sample
    packed = official([img])
    assert packed.grid_hw.tolist() == [list(official.grid_size(*size))]
    assert torch.equal(packed.patches, single([ref]).patches)  # ref needs no further resize
    if size == (1000, 1333):
        assert single.grid_size(*size) != official.grid_size(*size)


def _grids(sizes, **kw) -> list[tuple[int, int]]:
    proc = ImageProcessor(max_pixels=STAGE_CAP, **kw)
    return [proc.grid_size(h, w) for h, w in sizes]


def test_fraction_of_changed_grids_above_the_cap():
    """Measured: ~20 % of a uniform grid of sizes 1000–5000 px above the 3000-token cap (22 % up to
    8000 px, 28 % for 300–12000 px); never more than half."""
    sides = range(1000, 5001, 37)
    sizes = [(h, w) for h in sides for w in sides if h * w > STAGE_CAP]
    changed = sum(a != b for a, b in zip(_grids(sizes), _grids(sizes, resize="official")))
    assert 0.1 < changed / len(sizes) < 0.5, changed / len(sizes)
    # where a single resize stays under the cap, the second resize of the release is a no-op
    small = [(h, w) for h in range(60, 1600, 13) for w in range(60, 1600, 17)]
    below = [(h, w) for h, w in small if math.prod(_ref_smart_resize(h, w, 28, 56 * 56, 10**12)) <= STAGE_CAP]
    assert _grids(below) == _grids(below, resize="official")


def test_resize_mode_is_persisted_and_configurable(tmp_path):
    proc = ImageProcessor(max_pixels=STAGE_CAP, resize="official")
    proc.save_pretrained(tmp_path)
    assert ImageProcessor.from_hf(tmp_path).resize == "official"
    assert ImageProcessor.from_dict({"max_pixels": STAGE_CAP}).resize == "single"  # older files
    res = ResolutionConfig(resize="official")
    assert res.processor_kwargs()["resize"] == "official" and res.make_processor().resize == "official"
    assert ResolutionConfig().make_processor().resize == "single"
    with pytest.raises(ValueError, match="resize"):
        ResolutionConfig(resize="twice")
    with pytest.raises(ValueError, match="ImageProcessor: resize"):
        ImageProcessor(resize="twice")
