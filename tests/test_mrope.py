"""M-RoPE ids of packed and padded Qwen2-VL / Qwen2.5-VL micro-batches (docs/method.md §3
"Backbones"): equal to transformers' own ``get_rope_index`` run on each sequence alone, on random
layouts; and computed without mixing devices or reading the device back (meta-device run)."""

from __future__ import annotations

import inspect
import random

import pytest
import torch
import transformers as tf

from cmpt.embed.mrope import images_per_sequence, mrope_position_ids
from cmpt.vlm.text_attention import TextLayout

M, VS, VE, PAD, VIDEO = 2, 60, 61, 62, 63  # merge size and the vision token ids of the tiny configs


def _hf_model(arch: str) -> torch.nn.Module:
    vision = dict(
        depth=1, embed_dim=16, num_heads=2, patch_size=14, spatial_merge_size=M, temporal_patch_size=2
    )
    if arch == "qwen2_vl":
        vision.update(hidden_size=16, mlp_ratio=2)
    else:
        vision.update(hidden_size=16, out_hidden_size=16, intermediate_size=32, window_size=56)
    text = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
    )
    cfg_cls, model_cls = (
        (tf.Qwen2VLConfig, tf.Qwen2VLModel)
        if arch == "qwen2_vl"
        else (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLModel)
    )
    cfg = cfg_cls(
        vision_config=vision,
        text_config=text,
        image_token_id=PAD,
        video_token_id=VIDEO,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
    )
    return model_cls(cfg).eval()


def _hf_positions(model: torch.nn.Module, ids: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
    """``(3, L)`` ids of one sequence from transformers (5.x takes the token types as well)."""
    if not grids:
        return torch.arange(ids.numel()).expand(3, -1)
    thw = torch.tensor([[1, h, w] for h, w in grids])
    kwargs = {}
    if "mm_token_type_ids" in inspect.signature(model.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = (ids[None] == PAD).int()
    pos, _ = model.get_rope_index(input_ids=ids[None], image_grid_thw=thw, **kwargs)
    return pos[:, 0]


def _random_batch(rng: random.Random) -> tuple[list[torch.Tensor], list[list[tuple[int, int]]]]:
    """Sequences of random text with 0–3 images each (``<vs> pad×(h/m·w/m) <ve>``), grids in
    patches, multiples of the merge size and rarely square."""
    seqs, grids = [], []
    for _ in range(rng.randint(1, 5)):
        toks, g = [], []
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            h, w = M * rng.randint(1, 5), M * rng.randint(1, 5)
            toks += [rng.randrange(0, 50) for _ in range(rng.randint(0, 4))]
            toks += [VS] + [PAD] * (h * w // M**2) + [VE]
            g.append((h, w))
        toks += [rng.randrange(0, 50) for _ in range(rng.randint(1 if not toks else 0, 6))]
        seqs.append(torch.tensor(toks))
        grids.append(g)
    return seqs, grids


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_equals_get_rope_index_per_sequence(arch):
    model, rng = _hf_model(arch), random.Random(0)
    for _ in range(40):
        seqs, grids = _random_batch(rng)
        ids = torch.cat(seqs)
        flat = [g for per_seq in grids for g in per_seq]
        refs = [_hf_positions(model, s, g) for s, g in zip(seqs, grids)]
        cu = [0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()]
        packed = mrope_position_ids(ids, TextLayout.from_cu_seqlens(cu, True), flat or None, M, PAD)
        assert torch.equal(packed, torch.cat(refs, dim=1)[:, None])
        padded = mrope_position_ids(ids, TextLayout.from_cu_seqlens(cu, False), flat or None, M, PAD)
        width = max(len(s) for s in seqs)
        assert padded.shape == (3, len(seqs), width)
        for row, ref in enumerate(refs):
            assert torch.equal(padded[:, row, : ref.shape[1]], ref)
            assert not padded[:, row, ref.shape[1] :].any()  # padding positions are 0


def test_hand_computed_example():
    """Text 0, <vs> 1, a 2×2 merged image at 2 (t, h, w = 2, 2 + row, 2 + col), then <ve> at
    2 + max(2, 2) = 4; the second sequence restarts at 0 and has a 1×2 merged image."""
    ids = torch.tensor([5, VS, PAD, PAD, PAD, PAD, VE, 6, VS, PAD, PAD, VE])
    layout = TextLayout.from_cu_seqlens([0, 8, 12], True)
    pos = mrope_position_ids(ids, layout, torch.tensor([[4, 4], [2, 4]]), M, PAD)
    want = [
        [0, 1, 2, 2, 2, 2, 4, 5, 0, 1, 1, 3],
        [0, 1, 2, 2, 3, 3, 4, 5, 0, 1, 1, 3],
        [0, 1, 2, 3, 2, 3, 4, 5, 0, 1, 2, 3],
    ]
    assert torch.equal(pos[:, 0], torch.tensor(want))


@pytest.mark.parametrize("packed", [True, False])
def test_stays_on_the_device_without_read_backs(packed):
    """On the meta device an operation that mixes devices, or that needs a value of the device
    (a boolean-mask gather, a repeat without its output size), raises: so the CUDA path neither
    mixes devices nor waits for the GPU. The grids are host metadata."""
    ids = torch.tensor([5, VS, PAD, PAD, PAD, PAD, VE, 6, VS, PAD, PAD, VE])
    layout = TextLayout.from_cu_seqlens([0, 8, 12], packed)
    out = mrope_position_ids(ids.to("meta"), layout, [(4, 4), (2, 4)], M, PAD)
    assert out.device.type == "meta" and out.shape == ((3, 1, 12) if packed else (3, 2, 8))


def test_empty_batch():
    layout = TextLayout.from_cu_seqlens([0], True)
    assert mrope_position_ids(torch.zeros(0, dtype=torch.long), layout, None, M, PAD).shape == (3, 1, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("packed", [True, False])
def test_cuda_equals_cpu_without_synchronising(packed):
    """On a GPU: the CPU's ids, with the grids as host metadata and no host-device synchronisation
    (``set_sync_debug_mode("error")`` raises at the first one)."""
    seqs, grids = _random_batch(random.Random(5))
    cu = [0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()]
    layout = TextLayout.from_cu_seqlens(cu, packed)
    flat = [g for per_seq in grids for g in per_seq] or None
    ids = torch.cat(seqs)
    want = mrope_position_ids(ids, layout, flat, M, PAD)
    ids_gpu = ids.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = mrope_position_ids(ids_gpu, layout, flat, M, PAD)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), want)


def test_images_per_sequence_never_counts_a_pair_across_sequences():
    """A sequence ending in <|vision_start|> and the next starting with <|image_pad|> hold no image:
    each sequence's first token is never the pad of a pair (empty sequences included)."""
    ids = torch.tensor([5, VS, PAD, VE, VS, PAD, PAD, VE])
    assert images_per_sequence(ids, TextLayout.from_cu_seqlens([0, 5, 8], True), 1, None, None, VS, PAD) == [
        1,
        0,
    ]
    three = TextLayout.from_cu_seqlens([0, 5, 8, 8], True)
    assert images_per_sequence(ids, three, 1, None, None, VS, PAD) == [1, 0, 0]
