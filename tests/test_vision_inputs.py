"""A Qwen-VL vision tower's inputs precomputed from the host's grids (docs/method.md §7 "Batches on
the host"; :mod:`cmpt.embed.vision_inputs`): transformers' own numbers, the tower's output
unchanged, the segments where the attention reads them, nothing for a tower that cannot take them."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch
from torch import nn

from cmpt.embed.qwen_vl import QwenVLBackbone
from cmpt.embed.vision_attention import VISION_VARLEN
from cmpt.embed.vision_inputs import precomputed_vision_inputs
from test_qwen_vl_backbone import ARCHS, build_checkpoint

GRIDS = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 4]])
#: transformers 5.17+: the towers take their grid-derived inputs precomputed
TAKES_THEM = find_spec("transformers.vision_utils") is not None
takes_them = pytest.mark.skipif(not TAKES_THEM, reason="transformers < 5.17: the tower computes them")


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, QwenVLBackbone]:
    root = tmp_path_factory.mktemp("vision_inputs")
    return {arch: QwenVLBackbone.from_pretrained(build_checkpoint(arch, root / arch)) for arch in ARCHS}


@takes_them
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attention", ["auto", None])
def test_tower_output_unchanged_and_values_are_transformers_own(towers, arch, attention):
    bb = towers[arch]
    bb.set_vision_attention(attention)
    visual = bb.visual
    kwargs = precomputed_vision_inputs(visual, GRIDS, torch.device("cpu"))
    windowed = arch == "qwen2_5_vl"
    keys = {"position_ids", "cu_seqlens", "max_seqlen"}
    window_keys = {"window_index", "cu_window_seqlens", "max_window_seqlen"}
    assert set(kwargs) == keys | (window_keys if windowed else set())
    rows = int(GRIDS.prod(-1).sum())
    assert kwargs["position_ids"].shape == (rows, 2)
    assert kwargs["cu_seqlens"].tolist() == [0, 24, 28, 52] and kwargs["max_seqlen"] == 24
    if windowed:
        assert sorted(kwargs["window_index"].tolist()) == list(range(rows // 4))
        lengths = (kwargs["cu_window_seqlens"][1:] - kwargs["cu_window_seqlens"][:-1]).tolist()
        assert kwargs["max_window_seqlen"] == max(lengths) and sum(lengths) == rows
    pixels = torch.randn(rows, bb.patch_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = visual(pixels, grid_thw=GRIDS).pooler_output
        given = visual(pixels, grid_thw=GRIDS, **dict(kwargs)).pooler_output
    torch.testing.assert_close(given, own, rtol=0, atol=0)
    bb.set_vision_attention("auto")


PLACES = [(VISION_VARLEN, False), ("sdpa", False), ("flash_attention_2", True)]


@takes_them
@pytest.mark.parametrize(("impl", "on_device"), PLACES)
def test_segments_stay_on_the_host_unless_a_flash_kernel_reads_them(towers, impl, on_device, monkeypatch):
    visual = towers["qwen2_5_vl"].visual
    monkeypatch.setattr(visual.config, "_attn_implementation", impl)
    kwargs = precomputed_vision_inputs(visual, GRIDS, torch.device("meta"))
    assert kwargs["position_ids"].is_meta and kwargs["window_index"].is_meta
    for key in ("cu_seqlens", "cu_window_seqlens"):
        assert kwargs[key].is_meta == on_device, key


class _OlderTower(nn.Module):
    """A tower whose module (this test file) has no ``get_vision_*`` helpers: an older transformers."""

    spatial_merge_size = 2


def test_nothing_for_an_older_tower_or_grids_on_the_device(towers):
    assert precomputed_vision_inputs(_OlderTower(), GRIDS, torch.device("cpu")) == {}
    visual = towers["qwen2_vl"].visual
    assert precomputed_vision_inputs(visual, GRIDS.to("meta"), torch.device("meta")) == {}
    if not TAKES_THEM:  # transformers 5.0–5.16: its real towers get nothing either
        for t in towers.values():
            assert precomputed_vision_inputs(t.visual, GRIDS, torch.device("cpu")) == {}
