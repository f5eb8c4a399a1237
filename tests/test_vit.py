"""NativeViT behaviour: packing, merge-window order, C-RoPE table order, prefix tokens, I/O, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cmpt import NativeViT, NativeViTConfig
from cmpt.vision.rope import patch_positions

P = 14


def tiny(**kw) -> NativeViT:
    torch.manual_seed(0)
    base = dict(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        pos_grid=4,
        cls_token=True,
        num_register_tokens=2,
        pos_cls=True,
        layerscale_init=0.5,
    )
    return NativeViT(NativeViTConfig(**{**base, **kw})).eval()


def raster_patches(img: torch.Tensor) -> torch.Tensor:
    h, w = img.shape[1] // P, img.shape[2] // P
    return img.reshape(3, h, P, w, P).permute(1, 3, 0, 2, 4).reshape(h * w, -1)


def to_window(x: torch.Tensor, h: int, w: int, m: int = 2) -> torch.Tensor:
    """Raster-ordered rows (h·w, ...) → merge-window order, via the positions of each window token."""
    rc = patch_positions([(h, w)], m)
    return x[rc[:, 0] * w + rc[:, 1]]


IMAGES = [(56, 84), (112, 56), (28, 28), (84, 140)]


def window_packed_images() -> tuple[list[torch.Tensor], list[tuple[int, int]], torch.Tensor]:
    """Random images of the sizes in IMAGES, their patch grids and their patches packed in
    merge-window order (what the processor gives the ViT)."""
    imgs = [torch.randn(3, h, w) for h, w in IMAGES]
    grids = [(h // P, w // P) for h, w in IMAGES]
    return imgs, grids, torch.cat([to_window(raster_patches(im), *g) for im, g in zip(imgs, grids)])


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("keep_prefix", [True, False])
def test_packed_equals_one_at_a_time(rope, keep_prefix):
    vit = tiny(rope=rope, keep_prefix_tokens=keep_prefix)
    imgs = [torch.randn(3, h, w) for h, w in IMAGES]
    with torch.no_grad():
        together = vit.forward_images(imgs)
        alone = [vit.forward_images([im])[0] for im in imgs]
    for a, b in zip(together, alone):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", [False, True])
def test_window_order_forward_matches_raster(rope):
    """forward() on merge-window-ordered patches = forward_images() re-ordered: the position table and
    the RoPE angles follow each patch (docs/method.md §1: table in the same order as the patches)."""
    vit = tiny(rope=rope)
    imgs, grids, packed = window_packed_images()
    with torch.no_grad():
        out = vit(packed, torch.tensor(grids))
        ref = vit.forward_images(imgs)
    expected = torch.cat([to_window(r[3:], *g) for r, g in zip(ref, grids)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_official_pos_order_scrambles_windows():
    """`pos_embed_order: official` adds the raster-order table to window-order patches (released CoMP)."""
    vit = tiny(
        keep_prefix_tokens=False, num_layers=0, final_norm=False, cls_token=False, num_register_tokens=0
    )
    grids = [(4, 6)]
    zeros = torch.zeros(24, 3 * P * P)
    with torch.no_grad():
        correct = vit(zeros, torch.tensor(grids)) - vit.patch_embed.bias
        vit.config.pos_embed_order = "official"
        official = vit(zeros, torch.tensor(grids)) - vit.patch_embed.bias
    from cmpt.vision.vit import interpolate_table

    table = interpolate_table(vit.pos_embed.detach(), 4, 4, 6)
    torch.testing.assert_close(official, table)
    torch.testing.assert_close(correct, to_window(table, 4, 6))
    assert not torch.allclose(correct, official)


def test_forward_images_of_an_official_order_tower_runs_as_released():
    """A release tower (`pos_embed_order: official`) sees window-order patches under the raster
    table, in forward_images too: its raster output is forward() on window-order patches put back
    in raster order, not the (different) output of the same weights with correct positions."""
    vit = tiny()
    vit.config.pos_embed_order = "official"
    imgs, grids, packed = window_packed_images()
    with torch.no_grad():
        released = vit(packed, torch.tensor(grids))
        got = vit.forward_images(imgs)
        vit.config.pos_embed_order = "window"
        corrected = vit.forward_images(imgs)
    prefix = vit.config.num_prefix_tokens
    torch.testing.assert_close(torch.cat([to_window(r[prefix:], *g) for r, g in zip(got, grids)]), released)
    assert not torch.allclose(got[0], corrected[0], atol=1e-4)
    vit.config.pos_embed_order = "official"
    with pytest.raises(ValueError, match=r"multiples of 28 \(an official-order tower"):
        vit.forward_images([torch.randn(3, 42, 56)])


def test_rope_changes_output_and_prefix_is_kept_first():
    imgs = [torch.randn(3, 56, 56)]
    with torch.no_grad():
        off = tiny(rope=False).forward_images(imgs)[0]
        on = tiny(rope=True).forward_images(imgs)[0]
    assert off.shape == on.shape == (3 + 16, 32)
    assert not torch.allclose(off, on)


def test_pos_table_interpolated_in_float32_under_bf16():
    vit = tiny().to(torch.bfloat16)
    x = torch.randn(24, 3 * P * P, dtype=torch.bfloat16)
    with torch.no_grad():
        out = vit(x, torch.tensor([[4, 6]]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_save_and_load_roundtrip_identical(tmp_path):
    vit = tiny(rope=True, pool="cls", pool_norm=True)
    vit.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    back = NativeViT.from_pretrained(tmp_path).eval()
    imgs = [torch.randn(3, 56, 84), torch.randn(3, 28, 56)]
    with torch.no_grad():
        for a, b in zip(vit.forward_images(imgs), back.forward_images(imgs)):
            assert torch.equal(a, b)
    assert NativeViT.from_pretrained(tmp_path, rope=False).config.rope is False


def test_grad_checkpointing_same_gradients():
    vit = tiny(rope=True).train()
    x = torch.randn(16 + 24, 3 * P * P)
    grid = torch.tensor([[4, 4], [4, 6]])
    vit(x, grid).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}
    vit.zero_grad()
    vit.grad_checkpointing = True
    vit(x, grid).square().sum().backward()
    for n, p in vit.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5)


def test_bad_inputs_have_clear_errors(tmp_path):
    vit = tiny()
    with pytest.raises(ValueError, match="not divisible by merge_size"):
        vit(torch.randn(15, 3 * P * P), torch.tensor([[3, 5]]))
    with pytest.raises(ValueError, match=r"grid_hw=\[\(4, 4\)\] describes 16 patches .* patches has 10 rows"):
        vit(torch.randn(10, 3 * P * P), torch.tensor([[4, 4]]))
    with pytest.raises(ValueError, match="patches must be"):
        vit(torch.randn(16, 5), torch.tensor([[4, 4]]))
    with pytest.raises(ValueError, match="multiples of 14"):
        vit.forward_images([torch.randn(3, 50, 56)])
    with pytest.raises(FileNotFoundError, match="not a NativeViT directory"):
        NativeViT.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pool"):
        NativeViTConfig(pool="max")


@pytest.mark.parametrize("keep_prefix", [True, False])
def test_unused_parameters_get_no_gradient_and_the_rest_do(keep_prefix):
    vit = tiny(keep_prefix_tokens=keep_prefix, pool="map", pool_norm=True).train()
    vit(torch.randn(16, 3 * P * P), torch.tensor([[4, 4]])).sum().backward()
    unused = {id(p) for p in vit.unused_parameters()}
    for name, p in vit.named_parameters():
        assert (p.grad is None) == (id(p) in unused), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rope", [False, True])
def test_cuda_bf16_autocast_matches_cpu_fp32(rope):
    """On a GPU under bf16 autocast the ``auto`` backend (flash kernel when present) gives the CPU
    fp32 features within bf16 rounding, packed images included."""
    vit = tiny(rope=rope, hidden_size=64, num_heads=2)  # head_dim 32: flash kernels need >= 8, even
    imgs = [torch.randn(3, h, w) for h, w in IMAGES]
    with torch.no_grad():
        ref = torch.cat(vit.forward_images(imgs))
        gpu = vit.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = torch.cat(gpu.forward_images([im.cuda() for im in imgs])).float().cpu()
    assert (out - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("antialias", [False, True])
def test_table_interpolation_equals_torch_bicubic(antialias):
    """The matrix-product resize is F.interpolate's bicubic, up and down, odd and 1-wide grids."""
    from cmpt.vision.vit import interpolate_table

    g = torch.Generator().manual_seed(int(antialias))
    for grid, h, w in [(4, 6, 9), (7, 3, 1), (16, 37, 5), (37, 16, 16), (5, 1, 40), (6, 6, 7)]:
        table = torch.randn(grid * grid, 12, generator=g)
        ref = F.interpolate(
            table.reshape(1, grid, grid, 12).permute(0, 3, 1, 2),
            size=(h, w),
            mode="bicubic",
            align_corners=False,
            antialias=antialias,
        )
        ref = ref.permute(0, 2, 3, 1).reshape(h * w, 12)
        torch.testing.assert_close(interpolate_table(table, grid, h, w, antialias), ref, atol=1e-5, rtol=1e-5)
