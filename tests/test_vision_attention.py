"""Packed attention in a Hugging Face Qwen-VL vision tower (cmpt.embed.vision_attention; docs/method.md
§6 "Vision attention of Qwen-VL backbones"): the same merged tokens and gradients as transformers' own
per-segment attention, one plan per ``cu_seqlens`` (not per block), nothing of it saved."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cmpt.embed.vision_attention as va
from cmpt.embed.qwen_vl import QwenVLBackbone
from test_qwen_vl_backbone import ARCHS, P, build_checkpoint

GRIDS = [(4, 6), (6, 4), (2, 2), (8, 8), (10, 6)]  # windows of 4×4 patches cut at the edges


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen_vl_attn")
    return {arch: build_checkpoint(arch, root / arch) for arch in ARCHS}


def _tokens_and_grads(bb: QwenVLBackbone, patches: torch.Tensor, grids: torch.Tensor):
    bb.zero_grad(set_to_none=True)
    x = patches.clone().requires_grad_()
    out = bb.encode_images(x, grids)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in bb.visual.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_transformers_own(ckpts, arch: str) -> None:
    bb = QwenVLBackbone.from_pretrained(ckpts[arch])
    assert bb.visual.config._attn_implementation == va.VISION_VARLEN  # the default
    grids = torch.tensor(GRIDS)
    patches = torch.randn(int(grids.prod(-1).sum()), 3 * bb.config.temporal_patch_size * P * P)
    packed = _tokens_and_grads(bb, patches, grids)
    bb.set_vision_attention(None)
    assert bb.visual.config._attn_implementation == "sdpa"
    own = _tokens_and_grads(bb, patches, grids)
    torch.testing.assert_close(packed[0], own[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[1], own[1], rtol=1e-5, atol=1e-6)
    assert packed[2].keys() == own[2].keys() and len(own[2]) > 0
    for name in own[2]:
        torch.testing.assert_close(packed[2][name], own[2][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_plan_per_segmentation_not_per_block(ckpts, arch: str, monkeypatch) -> None:
    """The tower hands every block the same ``cu_seqlens`` tensors (windows; images): their lengths
    reach the host once each, and the windows really are cut (more segments than images)."""
    bb = QwenVLBackbone.from_pretrained(ckpts[arch])
    plans = []
    real = va.build_plan
    monkeypatch.setattr(va, "build_plan", lambda *a: plans.append(real(*a)) or plans[-1])
    grids = torch.tensor(GRIDS)
    with torch.no_grad():
        bb.encode_images(torch.randn(int(grids.prod(-1).sum()), bb.patch_dim), grids)
    assert len(bb.visual.blocks) == 2
    windowed = arch == "qwen2_5_vl"
    assert len(plans) == (2 if windowed else 1)
    assert sorted(len(p.lengths) for p in plans)[0] == len(GRIDS)  # the full-attention blocks: images
    if windowed:
        windows = max(plans, key=lambda p: len(p.lengths))
        assert sum(windows.lengths) == int(grids.prod(-1).sum()) and max(windows.lengths) == 16


def test_backend_choice_errors_and_nothing_saved(ckpts, tmp_path) -> None:
    bb = QwenVLBackbone.from_pretrained(ckpts["qwen2_5_vl"])
    bb.set_vision_attention("sdpa")
    attn = bb.visual.blocks[0].attn
    assert getattr(attn, va._BACKEND) == "sdpa"
    with pytest.raises(ValueError, match="unknown vision attention backend 'fast'"):
        bb.set_vision_attention("fast")
    q = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="unmasked, non-causal"):
        va.vision_varlen_forward(attn, q, q, q, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale"):
        va.vision_varlen_forward(attn, q, q, q, scaling=1.0)
    # no cu_seqlens (transformers splitting the segments itself): one segment = plain attention
    out, _ = va.vision_varlen_forward(attn, q, q, q)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    out_dir = bb.save_pretrained(tmp_path / "saved")
    assert va.VISION_VARLEN not in (out_dir / "config.json").read_text()
    code = (  # a fresh process (cmpt not imported) loads it with transformers alone
        "import sys, transformers as tf; "
        "m = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(sys.argv[1]); "
        "print(m.model.visual.config._attn_implementation)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "sdpa"


def test_benchmark_runs_and_agrees(monkeypatch) -> None:
    """``benchmarks/bench_qwen_vision_attn.py`` at a tiny size: both attentions give the same tokens."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_qwen_vision_attn

    fig = bench_qwen_vision_attn.main(["--images", "2", "--size", "224", "--width", "32", "--depth", "2"])
    assert fig["windows"] == 2 * 4 and fig["patches"] == 2 * 16 * 16
    assert fig["max_abs_diff"] < 1e-5 and fig["packed_vs_transformers"] > 0


def test_moca_recipe_applies_model_vit_attn(ckpts, tmp_path) -> None:
    """``model.vit_attn`` reaches a Qwen-VL tower built by the MoCa recipe."""
    from cmpt.recipes import load_recipe
    from cmpt.recipes.moca import load_backbone_for

    sets = [f"model.init={ckpts['qwen2_5_vl']}", "model.vit_attn=sdpa", f"run.dir={tmp_path / 'run'}"]
    cfg, _ = load_recipe("tiny/moca_cpt", sets)
    bb = load_backbone_for(cfg)
    assert bb.visual.config._attn_implementation == va.VISION_VARLEN
    assert {getattr(blk.attn, va._BACKEND) for blk in bb.visual.blocks} == {"sdpa"}
