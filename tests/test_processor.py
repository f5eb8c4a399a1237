"""Tests for cmpt.vision.processor (docs/method.md §1 input packing, §1.4 resolution policy)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from cmpt.vision.processor import (
    CLIP_MEAN,
    CLIP_STD,
    ImageProcessor,
    PackedImages,
    smart_resize,
    unpatchify,
)
from processor_fixtures import textured

MAXP = 14 * 14 * 4 * 1280
HF_PIL_PROCESSOR = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
HF_PIL_REASON = "the reference Qwen2VLImageProcessorPil is in newer transformers 5.x only"


# ---------------------------------------------------------------- smart_resize (docs/method.md §1.4)


def _round_half_even_multiple(n: int, f: int) -> int:
    """Nearest multiple of f with ties to the even quotient, in exact integer arithmetic."""
    q, r = divmod(n, f)
    if 2 * r > f or (2 * r == f and q % 2 == 1):
        q += 1
    return q * f


def _reference_smart_resize(h: int, w: int, f: int, lo: int, hi: int) -> tuple[int, int]:
    hb, wb = max(f, _round_half_even_multiple(h, f)), max(f, _round_half_even_multiple(w, f))
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        return max(f, math.floor(h / beta / f) * f), max(f, math.floor(w / beta / f) * f)
    if hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        return math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
    return hb, wb


def _random_sizes(n: int, seed: int = 0) -> list[tuple[int, int, int, int, int]]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        f = rnd.choice([28, 28, 28, 14, 32, 16])
        kind = i % 5
        if kind == 0:  # tiny
            h, w = rnd.randint(1, 60), rnd.randint(1, 60)
        elif kind == 1:  # huge
            h, w = rnd.randint(2000, 20000), rnd.randint(2000, 20000)
        elif kind == 2:  # exact ties for round-half-to-even
            h, w = f * rnd.randint(0, 60) + f // 2, f * rnd.randint(0, 60) + f // 2
        elif kind == 3:  # extreme but legal aspect ratios
            h = rnd.randint(5, 300)
            w = min(h * 200, h * rnd.randint(20, 200))
        else:
            h, w = rnd.randint(50, 3000), rnd.randint(50, 3000)
        if rnd.random() < 0.5:
            h, w = w, h
        lo = rnd.choice([56 * 56, 4 * 28 * 28, 128 * 28 * 28])
        hi = rnd.choice([MAXP, 16384 * 28 * 28, 256 * 28 * 28, lo * 2])
        out.append((h, w, f, lo, hi))
    return out


def test_smart_resize_matches_reference_formula():
    for h, w, f, lo, hi in _random_sizes(500):
        got = smart_resize(h, w, factor=f, min_pixels=lo, max_pixels=hi)
        assert got == _reference_smart_resize(h, w, f, lo, hi), (h, w, f, lo, hi)
        rh, rw = got
        assert rh % f == 0 and rw % f == 0 and rh >= f and rw >= f
        rounded = max(f, _round_half_even_multiple(h, f)) * max(f, _round_half_even_multiple(w, f))
        if rounded > hi and rh > f and rw > f:  # scaled down: within max (unless a side is clamped)
            assert rh * rw <= hi, (h, w, got)
        elif rounded < lo:  # scaled up: at least min
            assert rh * rw >= lo, (h, w, got)
        elif lo <= rounded <= hi:
            assert lo <= rh * rw <= hi


def test_smart_resize_agrees_with_transformers_where_sides_cannot_round_to_zero():
    hf_smart_resize = pytest.importorskip(HF_PIL_PROCESSOR, reason=HF_PIL_REASON).smart_resize

    for h, w, f, lo, hi in _random_sizes(300, seed=1):
        if min(h, w) > f // 2:  # transformers lacks the `max(factor, ...)` on the first rounding
            assert smart_resize(h, w, f, lo, hi) == hf_smart_resize(h, w, f, lo, hi)


def test_smart_resize_known_values_and_ties():
    assert smart_resize(42, 70) == (56, 56)  # 1.5 -> 2, 2.5 -> 2 (half to even)
    assert smart_resize(14 * 28 + 14, 20 * 28 + 14) == (14 * 28, 20 * 28)  # 14.5 -> 14, 20.5 -> 20
    assert smart_resize(1, 1) == (56, 56)  # upscaled to min_pixels
    assert smart_resize(10, 1900) == (28, 1904)  # a side rounding to 0 is clamped to one factor
    h, w = smart_resize(20000, 30000)
    assert h * w <= MAXP and h % 28 == 0 and w % 28 == 0


def test_smart_resize_rejects_extreme_aspect_and_bad_sizes():
    assert smart_resize(1, 200, min_pixels=0)  # exactly 200 is allowed
    for h, w in [(1, 201), (100, 20100), (20100, 100), (1, 5000)]:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(h, w)
    for h, w in [(0, 10), (10, 0), (-5, 10)]:
        with pytest.raises(ValueError, match="positive"):
            smart_resize(h, w)


# ---------------------------------------------------------------- patch order and parity (docs/method.md §1)


def _coded_image(gh: int, gw: int, p: int) -> Image.Image:
    """R = patch row, G = patch col, B = pixel index inside the patch."""
    y, x = np.mgrid[0 : gh * p, 0 : gw * p]
    arr = np.stack([y // p, x // p, (y % p) * p + (x % p)], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    ("p", "m", "gh", "gw"), [(14, 2, 12, 8), (14, 1, 5, 7), (16, 2, 6, 10), (8, 3, 9, 12)]
)
def test_patch_order_is_merge_window_order(p, m, gh, gw):
    proc = ImageProcessor(patch_size=p, merge_size=m, mean=(0, 0, 0), std=(1, 1, 1), min_pixels=0)
    batch = proc([_coded_image(gh, gw, p)])
    assert batch.grid_hw.tolist() == [[gh, gw]]
    vals = torch.round(batch.patches * 255).to(torch.int64).view(gh * gw, 3, p, p)
    for k in range(gh * gw):
        window, inside = divmod(k, m * m)
        wr, wc = divmod(window, gw // m)
        ir, ic = divmod(inside, m)
        row, col = wr * m + ir, wc * m + ic
        assert (vals[k, 0] == row).all() and (vals[k, 1] == col).all(), k
        assert torch.equal(vals[k, 2].flatten(), torch.arange(p * p))


@pytest.mark.parametrize(
    ("kwargs", "sizes"),
    [
        ({}, [(300, 500), (57, 80), (224, 224), (31, 600), (640, 480)]),
        ({"min_pixels": 100 * 100, "max_pixels": 200 * 200}, [(300, 500), (40, 50), (900, 250)]),
        ({"merge_size": 1, "patch_size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3}, [(123, 321)]),
    ],
)
def test_parity_with_transformers_qwen2vl_pil_processor(kwargs, sizes):
    Qwen2VLImageProcessorPil = pytest.importorskip(
        HF_PIL_PROCESSOR, reason=HF_PIL_REASON
    ).Qwen2VLImageProcessorPil

    proc = ImageProcessor(**kwargs)
    hf = Qwen2VLImageProcessorPil(
        temporal_patch_size=1,
        patch_size=proc.patch_size,
        merge_size=proc.merge_size,
        image_mean=list(proc.mean),
        image_std=list(proc.std),
        min_pixels=proc.min_pixels,
        max_pixels=proc.max_pixels,
    )
    images = [textured(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    ours = proc(images)
    ref = hf(images, return_tensors="pt")
    thw = ref["image_grid_thw"]
    assert torch.equal(thw[:, 0], torch.ones(len(images), dtype=thw.dtype))
    assert torch.equal(ours.grid_hw, thw[:, 1:].to(torch.int64))
    assert ours.patches.dtype == torch.float32 and ours.patches.shape == ref["pixel_values"].shape
    assert (ours.patches - ref["pixel_values"]).abs().max().item() <= 1e-5


def test_unpatchify_inverts_patchify():
    proc = ImageProcessor(min_pixels=0)
    images = [textured(h, w, seed=h) for h, w in [(112, 168), (56, 280), (84, 84)]]
    batch = proc(images)
    recon = unpatchify(batch.patches, batch.grid_hw, 14, 2)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    for img, rec in zip(images, recon):
        want = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - mean) / std
        assert rec.shape == want.shape
        assert (rec - want).abs().max().item() < 1e-5
    again = unpatchify(batch.patches, batch.grid_hw.tolist(), 14, 2)
    assert all(torch.equal(a, b) for a, b in zip(recon, again))
    with pytest.raises(ValueError, match="patches"):
        unpatchify(batch.patches[:-1], batch.grid_hw, 14, 2)


def test_inputs_as_path_bytes_and_pil_agree(tmp_path):
    img = textured(90, 130, seed=3)
    path = tmp_path / "a.png"
    img.save(path)
    proc = ImageProcessor()
    a, b, c = proc([img]), proc([path]), proc([path.read_bytes()])
    assert torch.equal(a.patches, b.patches) and torch.equal(a.patches, c.patches)
    patches, grid = proc.preprocess(str(path))
    assert torch.equal(patches, a.patches) and grid == tuple(a.grid_hw[0].tolist())


def test_packed_images_helpers_and_empty_batch():
    proc = ImageProcessor()
    batch = proc([textured(56, 84, 0), textured(112, 56, 1)])
    assert isinstance(batch, PackedImages)
    assert batch.num_images == len(batch) == 2
    assert batch.tokens_per_image == [4 * 6, 8 * 4]
    assert batch.cu_seqlens.tolist() == [0, 24, 56] and batch.cu_seqlens.dtype == torch.int32
    assert batch.patches.shape == (56, 3 * 14 * 14) and batch.grid_hw.dtype == torch.int64
    half = batch.to("cpu", dtype=torch.bfloat16)
    assert half.patches.dtype == torch.bfloat16 and half.grid_hw.dtype == torch.int64
    empty = proc([])
    assert empty.patches.shape == (0, 588) and empty.grid_hw.shape == (0, 2) and len(empty) == 0
    assert proc.grid_size(84, 56) == (6, 4)


# ---------------------------------------------------------------- resolution policies


def test_fixed_policy_gives_square():
    proc = ImageProcessor(policy="fixed", fixed_size=448)
    batch = proc([textured(300, 700, 0), textured(50, 90, 1)])
    assert batch.grid_hw.tolist() == [[32, 32], [32, 32]]
    assert proc.target_size(1, 5000) == (448, 448)
    # 384 is not a multiple of 28: the official force_resize goes 384x384, then smart_resize -> 392
    odd = ImageProcessor(policy="fixed", fixed_size=384)
    img = textured(200, 333, 2)
    step = img.resize((384, 384), Image.Resampling.BICUBIC).resize((392, 392), Image.Resampling.BICUBIC)
    assert torch.equal(odd([img]).patches, ImageProcessor()([step]).patches)


def test_native_policy_resizes_once_and_skips_when_unchanged():
    img = textured(112, 168, 0)
    assert ImageProcessor().prepare(img) is img  # already a valid size: no resize, no copy
    assert ImageProcessor().prepare(textured(100, 150, 0)).size == (140, 112)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"policy": "fixed"},
        {"fixed_size": 224},
        {"policy": "square"},
        {"patch_size": 0},
        {"merge_size": 1.5},
        {"mean": (0.5, 0.5)},
        {"std": (0.5, 0.0, 0.5)},
        {"min_pixels": 10, "max_pixels": 5},
        {"resize": "twice"},
    ],
)
def test_processor_argument_validation(kwargs):
    with pytest.raises(ValueError, match="ImageProcessor"):
        ImageProcessor(**kwargs)


# ---------------------------------------------------------------- config I/O


def _write(dir_, cfg, model_cfg=None):
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "preprocessor_config.json").write_text(json.dumps(cfg))
    if model_cfg is not None:
        (dir_ / "config.json").write_text(json.dumps(model_cfg))
    return dir_


def test_from_hf_reads_qwen_clip_siglip_dinov2_configs(tmp_path):
    qwen = _write(
        tmp_path / "qwen",
        {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2,
         "temporal_patch_size": 2, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
         "image_processor_type": "Qwen2VLImageProcessor"},
    )  # fmt: skip
    p = ImageProcessor.from_hf(qwen)
    assert (p.policy, p.min_pixels, p.max_pixels, p.patch_size) == ("native", 3136, 12845056, 14)
    p = ImageProcessor.from_hf(qwen / "preprocessor_config.json", max_pixels=1000 * 28 * 28)
    assert p.max_pixels == 1000 * 28 * 28
    new = _write(tmp_path / "new", {"size": {"shortest_edge": 1000, "longest_edge": 90000}, "patch_size": 16})
    p = ImageProcessor.from_hf(new)
    assert (p.min_pixels, p.max_pixels, p.patch_size, p.policy) == (1000, 90000, 16, "native")
    clip = _write(
        tmp_path / "clip",
        {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
         "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)},
        {"vision_config": {"patch_size": 32}},
    )  # fmt: skip
    p = ImageProcessor.from_hf(clip)
    assert (p.policy, p.fixed_size, p.patch_size) == ("fixed", 224, 32)
    siglip = _write(
        tmp_path / "siglip",
        {"size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        {"vision_config": {"patch_size": 14}},
    )
    p = ImageProcessor.from_hf(siglip)
    assert (p.policy, p.fixed_size, p.mean, p.std) == ("fixed", 384, (0.5,) * 3, (0.5,) * 3)
    dino = _write(
        tmp_path / "dino",
        {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
         "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
        {"patch_size": 14},
    )  # fmt: skip
    p = ImageProcessor.from_hf(dino, policy="native")
    assert (p.policy, p.fixed_size, p.mean) == ("native", None, (0.485, 0.456, 0.406))
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config\.json"):
        ImageProcessor.from_hf(tmp_path / "nowhere")


def test_save_pretrained_round_trip(tmp_path):
    proc = ImageProcessor(
        patch_size=16, merge_size=2, mean=(0.5,) * 3, std=(0.25,) * 3, policy="fixed", fixed_size=512
    )
    native = ImageProcessor(resize="official")
    assert ImageProcessor.from_dict(native.to_dict()).to_dict() == native.to_dict()
    path = proc.save_pretrained(tmp_path / "out")
    assert path.name == "preprocessor_config.json"
    for other in (ImageProcessor.from_hf(tmp_path / "out"), ImageProcessor.from_dict(proc.to_dict())):
        assert other.to_dict() == proc.to_dict()
    assert "fixed_size=512" in repr(proc)


def _tiny_vit(**kw):
    from cmpt import NativeViT, NativeViTConfig

    cfg = dict(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, pos_grid=4, patch_size=16)
    return NativeViT(NativeViTConfig(**cfg, image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6), **kw))


def test_a_saved_vit_directory_carries_its_image_processor(tmp_path):
    """``NativeViT.save_pretrained`` (also ``cmpt export --vfm-only`` and a run's ``final/vit``)
    writes ``preprocessor_config.json``: the directory preprocesses by itself, with ``from_hf`` and
    ``from_pretrained``; a directory written before (no such file) still loads with ``from_pretrained``."""
    vit = _tiny_vit(merge_size=1)
    vit.save_pretrained(tmp_path / "vit")
    want = ImageProcessor.for_vit(vit.config).to_dict()
    assert (want["patch_size"], want["merge_size"], want["image_mean"]) == (16, 1, [0.1, 0.2, 0.3])
    for load in (ImageProcessor.from_hf, ImageProcessor.from_pretrained):
        assert load(tmp_path / "vit").to_dict() == want
    assert ImageProcessor.from_pretrained(tmp_path / "vit", max_pixels=64 * 64).max_pixels == 64 * 64
    (tmp_path / "vit" / "preprocessor_config.json").unlink()  # a directory from before
    assert ImageProcessor.from_pretrained(tmp_path / "vit").to_dict() == want
    from cmpt.vision.vit_io import save_vit

    own = ImageProcessor(16, 1, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), max_pixels=96 * 96)
    save_vit(vit, tmp_path / "vit2", processor=own)  # a VLM's own processor (its training resolution)
    assert ImageProcessor.from_pretrained(tmp_path / "vit2").to_dict() == own.to_dict()


def test_from_pretrained_reads_vlm_vit_and_hf_directories(tmp_path):
    from cmpt import VisionLanguageModel
    from cmpt.demo.tiny_lm import build_tiny_causal_lm, default_corpus, train_tokenizer

    tok = train_tokenizer(default_corpus(50), vocab_size=300)
    proc = ImageProcessor(16, 2, mean=(0.2, 0.3, 0.4), min_pixels=32 * 32, max_pixels=64 * 64)
    lm = build_tiny_causal_lm(tok, hidden_size=32)
    vlm = VisionLanguageModel.build(_tiny_vit(), lm, tok, processor=proc)
    vlm.save_pretrained(tmp_path / "vlm")
    assert ImageProcessor.from_pretrained(tmp_path / "vlm").to_dict() == proc.to_dict()  # its processor/
    vlm.export_vit(tmp_path / "vfm")  # what `cmpt export --vfm-only` writes
    assert (tmp_path / "vfm" / "preprocessor_config.json").is_file()
    # the ViT alone preprocesses as inside the VLM: the VLM's processor, not the tower's defaults
    assert ImageProcessor.from_pretrained(tmp_path / "vfm").to_dict() == proc.to_dict()
    assert ImageProcessor.from_pretrained(tmp_path / "vlm" / "vision").to_dict() == proc.to_dict()
    _tiny_vit().save_pretrained(tmp_path / "vit")  # a ViT saved alone: its own native processor
    assert ImageProcessor.from_pretrained(tmp_path / "vit").mean == (0.1, 0.2, 0.3)
    qwen = _write(tmp_path / "qwen", {"min_pixels": 3136, "max_pixels": 50176, "merge_size": 2})
    assert ImageProcessor.from_pretrained(qwen).to_dict() == ImageProcessor.from_hf(qwen).to_dict()
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config\.json"):
        ImageProcessor.from_pretrained(tmp_path / "nowhere")
