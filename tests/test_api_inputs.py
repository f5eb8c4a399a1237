"""User-facing inputs of the public API refused or accepted clearly (docs/method.md §1 "Input
packing", §1.4, §3): info_nce's empty batch, masks and positives; float, numpy and tensor images;
NativeViT's empty input and grid checks, its load overrides and push_to_hub; Embedder's load
overrides and encode inputs; ImageProcessor.for_vit of a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cmpt.embed.embedder import Embedder
from cmpt.losses import info_nce
from cmpt.vision.image_io import ImageLoadError, load_image
from cmpt.vision.processor import ImageProcessor
from cmpt.vision.vit import NativeViT, NativeViTConfig
from vlm_fixtures import build_dirs, build_vlm


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---------------------------------------------------------------- info_nce (docs/method.md §3)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_info_nce_empty_batch_is_a_connected_zero(reduction):
    q = _unit(3, 8, seed=1).requires_grad_()
    t = _unit(3, 8, seed=2).requires_grad_()
    loss = info_nce(q[:0], t[:0], reduction=reduction)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert q.grad is not None and torch.all(q.grad == 0)


def test_info_nce_mask_hiding_a_positive_is_refused():
    q, t = _unit(2, 8, seed=1), _unit(3, 8, seed=2)
    with pytest.raises(ValueError, match=r"target_mask hides the positive of queries \[1\]"):
        info_nce(q, t, target_mask=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match=r"target_mask must be \(3,\)"):
        info_nce(q, t, target_mask=torch.tensor([True, True]))
    ok = info_nce(q, t, target_mask=torch.tensor([True, True, False]))  # only a negative hidden
    assert torch.isfinite(ok)


def test_info_nce_targets_and_positives_are_checked():
    q, t = _unit(4, 8, seed=1), _unit(2, 8, seed=2)
    with pytest.raises(ValueError, match=r"target has 2 rows for 4 queries.*positives="):
        info_nce(q, t)
    with pytest.raises(ValueError, match=r"positives must index the 2 target rows \(0..1\)"):
        info_nce(q, t, positives=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"positives must be a \(4,\) integer tensor"):
        info_nce(q, t, positives=torch.tensor([0, 1]))
    assert torch.isfinite(info_nce(q, t, positives=torch.tensor([0, 1, 1, 0])))  # shared positives


# ---------------------------------------------------------------- images (docs/method.md §1.4)
def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_float_mode_f_image_in_unit_range_is_scaled():
    ramp = np.linspace(0, 1, 16 * 8, dtype=np.float32).reshape(16, 8)
    img = load_image(Image.fromarray(ramp))  # PIL mode "F"
    got = _pixels(img)[..., 0]
    np.testing.assert_array_equal(got, np.rint(ramp * 255).astype(np.uint8))
    assert got.min() == 0 and got.max() == 255  # not a constant image


def test_float_image_outside_unit_range_is_refused():
    ramp = np.linspace(0, 200, 16, dtype=np.float32).reshape(4, 4)
    with pytest.raises(
        ImageLoadError, match=r"values from 0 to 200; float images must hold values in \[0, 1\]"
    ):
        load_image(Image.fromarray(ramp))


def test_numpy_and_tensor_images_equal_the_pil_image():
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    want = _pixels(Image.fromarray(rgb))
    np.testing.assert_array_equal(_pixels(load_image(rgb)), want)
    np.testing.assert_array_equal(_pixels(load_image(torch.from_numpy(rgb).permute(2, 0, 1))), want)
    as_float = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    np.testing.assert_array_equal(_pixels(load_image(as_float)), want)
    gray = rgb[..., 0]
    np.testing.assert_array_equal(_pixels(load_image(gray)), _pixels(Image.fromarray(gray)))
    proc = ImageProcessor(14, 2, min_pixels=28 * 28, max_pixels=56 * 56)
    one = proc(rgb)  # one array is one image, not a batch of rows
    assert one.num_images == 1
    torch.testing.assert_close(one.patches, proc([Image.fromarray(rgb)]).patches, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("src", "err", "match"),
    [
        (np.zeros((3, 10, 12), np.uint8), ImageLoadError, r"\(H, W\) or \(H, W, C\).*transpose\(1, 2, 0\)"),
        (torch.zeros(10, 12, 3, dtype=torch.uint8), ImageLoadError, r"\(C, H, W\).*permute\(2, 0, 1\)"),
        (torch.zeros(2, 3, 8, 8), ImageLoadError, r"got shape \(2, 3, 8, 8\).*pass a list"),
        (np.zeros((8, 8), np.int32), TypeError, r"dtype int32 is not an image dtype.*uint8"),
        (np.zeros((0, 8, 3), np.uint8), ImageLoadError, r"zero size"),
    ],
)
def test_bad_arrays_are_refused(src, err, match):
    with pytest.raises(err, match=match):
        load_image(src)


# ---------------------------------------------------------------- NativeViT (docs/method.md §1)
@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return NativeViT(
        NativeViTConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, cls_token=True)
    )


def test_vit_empty_input_gives_empty_outputs(vit):
    packed = ImageProcessor.for_vit(vit)([])
    assert vit(packed.patches, packed.grid_hw).shape == (0, 32)
    tokens, prefix = vit.encode(packed.patches, packed.grid_hw)
    assert tokens.shape == (0, 32) and prefix.shape == (0, 1, 32)
    assert vit.pool(tokens, prefix, packed.grid_hw).shape == (0, 32)


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        (torch.tensor([2, 2]), r"grid_hw must be \(n, 2\).*got shape \(2,\)"),
        (torch.tensor([[2, 4]]), r"grid_hw=\[\(2, 4\)\] describes 8 patches .* patches has 4 rows"),
        (torch.tensor([[-2, -2]]), r"grid_hw must hold positive integers"),
    ],
)
def test_vit_bad_grid_is_named(vit, grid, match):
    with pytest.raises(ValueError, match=match):
        vit(torch.zeros(4, 588), grid)


def test_vit_pool_with_a_mismatching_grid_is_named(vit):
    tokens, prefix = vit.encode(torch.zeros(4, 588), torch.tensor([[2, 2]]))
    with pytest.raises(ValueError, match=r"grid_hw=\[\(2, 4\)\] describes 8 patches .* patch_tokens has 4"):
        vit.pool(tokens, prefix, torch.tensor([[2, 4]]))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return build_dirs(tmp_path_factory.mktemp("api_inputs"))


def test_vit_architecture_override_is_refused_runtime_ones_load(dirs):
    with pytest.raises(ValueError, match=r"\['hidden_size'\] \(hidden_size=64 \(saved 32\)\)"):
        NativeViT.from_pretrained(dirs / "vit", hidden_size=64)
    loaded = NativeViT.from_pretrained(dirs / "vit", rope=True, keep_prefix_tokens=False, hidden_size=32)
    assert loaded.config.rope and loaded.config.hidden_size == 32


def test_vit_from_a_vlm_or_embedder_directory_points_to_vision(dirs, tmp_path):
    vlm = build_vlm(dirs)
    vlm.save_pretrained(tmp_path / "vlm")
    Embedder(vlm).save_pretrained(tmp_path / "emb")
    for d in (tmp_path / "vlm", tmp_path / "emb"):
        with pytest.raises(ValueError, match=r"NativeViT.from_pretrained\('.*vision'\)"):
            NativeViT.from_pretrained(d)


def test_vit_push_to_hub_is_refused(vit, tmp_path):
    with pytest.raises(ValueError, match=r"push_to_hub=True.*hf upload"):
        vit.save_pretrained(tmp_path / "v", push_to_hub=True)
    assert not (tmp_path / "v").exists()


def test_processor_for_vit_takes_the_model(vit):
    assert ImageProcessor.for_vit(vit).to_dict() == ImageProcessor.for_vit(vit.config).to_dict()
    with pytest.raises(TypeError, match=r"takes a NativeViT or its NativeViTConfig, got int"):
        ImageProcessor.for_vit(3)


# ---------------------------------------------------------------- Embedder (docs/method.md §3)
@pytest.fixture(scope="module")
def emb_dir(dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("emb") / "e"
    Embedder(build_vlm(dirs), batch_tokens=64).save_pretrained(d)
    return d


def test_embedder_from_pretrained_takes_config_overrides(emb_dir):
    emb = Embedder.from_pretrained(emb_dir, normalize=False, max_length=8)
    assert emb.config.normalize is False and emb.config.max_length == 8 and emb.config.batch_tokens == 64
    raw = emb.encode(["a longer text than eight tokens, cut to max_length"])  # normalize=False applies
    unit = Embedder.from_pretrained(emb_dir, max_length=8).encode(
        ["a longer text than eight tokens, cut to max_length"]
    )
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(1))
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), unit, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=r"unsupported arguments \['colour'\]"):
        Embedder.from_pretrained(emb_dir, colour=1)


def test_embedder_encode_inputs_are_named(emb_dir):
    emb = Embedder.from_pretrained(emb_dir)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a string or None, got int \(3\)"):
        emb.encode(["ok", 3])
    with pytest.raises(TypeError, match=r"images\[0\] must be None, one image"):
        emb.encode(["a"], [[object()]])
    with pytest.raises(ValueError, match=r"input 1: its text has 1 <image> placeholder\(s\) but 0 image"):
        emb.encode(["plain", "look <image> here"])
    rgb = np.full((28, 28, 3), 120, np.uint8)
    torch.testing.assert_close(emb.encode(["x"], [rgb]), emb.encode(["x"], [Image.fromarray(rgb)]))


def test_generate_takes_one_array_image(dirs):
    """``VisionLanguageModel.generate`` with one numpy image answers as with the same PIL image."""
    vlm = build_vlm(dirs)
    arr = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    pil = vlm.generate(Image.fromarray(arr), "what is this?", max_new_tokens=3)
    assert vlm.generate(arr, "what is this?", max_new_tokens=3) == pil
