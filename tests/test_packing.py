"""Padding-free packed text equals right-padded rows (docs/method.md §7).

The same micro-batch (sequences of very different lengths, with and without images) runs once
packed (one row, block-diagonal attention) and once padded; CoMP's losses and every parameter
gradient must agree within 1e-5 (fp32), causal and bidirectional, for the sdpa, eager and flex
attention implementations of two decoder families. PyTorch has no FlexAttention backward on the
CPU, so there flex is compared on the forward values only.
"""

from __future__ import annotations

import pytest
import torch

from cmpt.losses import next_token_loss
from cmpt.recipes.comp import LossConfig
from cmpt.recipes.comp_objective import CompObjective
from cmpt.vision.attention import build_plan
from cmpt.vlm.packed_sdpa import PACKED_SDPA, implementation_for, packed_sdpa_forward
from cmpt.vlm.text_attention import TextLayout, body_inputs, pad_rows, unpad_rows
from vlm_fixtures import UNEVEN, build_dirs, build_vlm, make_batch, zero_grads

IMPLS = ["sdpa", "eager", "flex_attention"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return build_dirs(tmp_path_factory.mktemp("packing"))


def _vlm(dirs, arch: str, impl: str):
    vlm = build_vlm(dirs, arch, llm_kwargs={"attn_implementation": impl})
    assert vlm.llm.config._attn_implementation == implementation_for(impl, packed=True)
    return vlm.train()


def _check(a, b, impl: str) -> None:
    _assert_same(a, b)
    assert len(a[1]) > 0 or impl == "flex_attention"


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _run(vlm, batch, packed: bool, fn) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    vlm.configure_packing(packed)
    zero_grads(vlm)
    impl = vlm.llm.config._attn_implementation
    with torch.no_grad() if impl == "flex_attention" and vlm.device.type == "cpu" else torch.enable_grad():
        values = fn(batch)
        if torch.is_grad_enabled():
            sum(v for v in values.values()).backward()
    return {k: v.detach() for k, v in values.items()}, _grads(vlm)


def _assert_same(a, b):
    (va, ga), (vb, gb) = a, b
    for k in va:
        torch.testing.assert_close(va[k], vb[k], rtol=1e-5, atol=1e-5, msg=k)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_comp_losses_and_grads_packed_equal_padded(dirs, arch, impl):
    vlm = _vlm(dirs, arch, impl)
    objective = CompObjective(vlm, LossConfig(align=True))
    batch = make_batch(vlm, UNEVEN, seed=1)
    lengths = batch["cu_seqlens"].diff().tolist()
    assert max(lengths) > 4 * min(lengths)  # very different lengths

    def losses(b):  # normalized as the trainer does: per supervised token, per aligned sample, λ
        out = objective(b)
        assert out["lm_count"] == b["num_loss_tokens"] and out["align_count"] == b["num_align"] == 2
        return {"lm": out["lm_sum"] / out["lm_count"], "align": 0.05 * out["align_sum"] / out["align_count"]}

    _check(_run(vlm, batch, True, losses), _run(vlm, batch, False, losses), impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_bidirectional_packed_equal_padded(dirs, impl):
    vlm = _vlm(dirs, "qwen2", impl)
    batch = make_batch(vlm, UNEVEN, seed=2)
    head = vlm.lm_head

    def losses(b):  # a masked-LM style loss (unshifted labels) on bidirectional hidden states
        out = vlm(
            b["input_ids"],
            b["cu_seqlens"],
            patches=b["patches"],
            grid_hw=b["grid_hw"],
            images_per_sample=b["images_per_sample"],
            attention="bidirectional",
        )
        s, n = next_token_loss(out.hidden, b["input_ids"], head.weight, shift=False)
        return {"mlm": s / n, "merged": out.vision.pow(2).mean()}

    _check(_run(vlm, batch, True, losses), _run(vlm, batch, False, losses), impl)
    vlm.configure_packing(True)
    packed = vlm.text_features(batch["caption_ids"], batch["caption_cu_seqlens"], "bidirectional")
    vlm.configure_packing(False)
    padded = vlm.text_features(batch["caption_ids"], batch["caption_cu_seqlens"], "bidirectional")
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


def test_packed_layout_helpers_round_trip():
    layout = TextLayout.from_cu_seqlens(torch.tensor([0, 3, 3, 8]), packed=False)
    assert layout.lengths == (3, 0, 5) and layout.width == 5 and layout.total == 8
    assert layout.positions_computed == 15 and TextLayout(layout.lengths, True).positions_computed == 8
    x = torch.arange(8.0)[:, None]
    rows = pad_rows(x, layout, value=-1)
    assert rows.shape == (3, 5, 1) and rows[1].eq(-1).all() and rows[0, :3, 0].tolist() == [0, 1, 2]
    assert torch.equal(unpad_rows(rows, layout), x)
    packed = TextLayout(layout.lengths, True)
    assert packed.position_ids().tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    mask = body_inputs(packed, "sdpa", "causal", torch.float32, torch.device("cpu"))["attention_mask"][0, 0]
    assert mask[4, 3] and not mask[3, 4] and not mask[3, 2]  # causal inside a sequence, none across
    bi = body_inputs(packed, "sdpa", "bidirectional", torch.float32, torch.device("cpu"))["attention_mask"]
    assert bi[0, 0, 3, 4] and not bi[0, 0, 3, 2]
    with pytest.raises(ValueError, match="never decrease"):
        TextLayout.from_cu_seqlens([0, 4, 2], packed=True)


def test_unsupported_attention_falls_back_or_refuses(dirs, caplog):
    vlm = build_vlm(dirs, "qwen2")
    vlm.llm.config._attn_implementation = "some_custom_kernel"
    with caplog.at_level("INFO", logger="cmpt.vlm"):
        assert vlm.configure_packing(None) is False
    assert "right-padded" in caplog.text and "some_custom_kernel" in caplog.text
    with pytest.raises(ValueError, match=r"data.packing=true.*some_custom_kernel"):
        vlm.configure_packing(True)
    with pytest.raises(ValueError, match="cannot build a bidirectional mask"):
        body_inputs(TextLayout((2, 3), False), "some_custom_kernel", "bidirectional", torch.float32, "cpu")


def test_packed_sdpa_runs_without_a_mask_and_switches_back(dirs):
    """Packed sdpa runs each sequence's slice (no N×N mask); padded rows go back to plain sdpa."""
    vlm = build_vlm(dirs, "qwen2", llm_kwargs={"attn_implementation": "sdpa"})
    assert vlm.packing and vlm.llm.config._attn_implementation == PACKED_SDPA
    batch = make_batch(vlm, UNEVEN)
    images = {"patches": batch["patches"], "grid_hw": batch["grid_hw"]}
    with torch.no_grad():
        out = vlm(batch["input_ids"], batch["cu_seqlens"], **images)
    assert out.body_kwargs["attention_mask"] is None
    assert out.body_kwargs["packed_plan"].lengths == batch["cu_seqlens"].diff().tolist()
    vlm.configure_packing(False)
    assert vlm.llm.config._attn_implementation == "sdpa"
    with torch.no_grad():
        padded = vlm(
            batch["input_ids"], batch["cu_seqlens"], patches=batch["patches"], grid_hw=batch["grid_hw"]
        )
    torch.testing.assert_close(padded.hidden, out.hidden, rtol=1e-5, atol=1e-5)


def test_packed_sdpa_refuses_what_it_cannot_compute():
    """A sliding window shorter than a packed sequence, and attention dropout: a clear error that
    names the fix (data.packing: false), never silently different attention."""
    q = torch.randn(1, 2, 10, 8)
    plan = build_plan([6, 4], "sdpa", q.device, q.dtype)
    layer = torch.nn.Module()
    layer.is_causal = True
    out, _ = packed_sdpa_forward(layer.eval(), q, q, q, None, packed_plan=plan, sliding_window=6)
    assert out.shape == (1, 10, 2, 8)  # every sequence within the window
    with pytest.raises(ValueError, match="sliding window of 4 tokens and a sequence of 6"):
        packed_sdpa_forward(layer, q, q, q, None, packed_plan=plan, sliding_window=4)
    with pytest.raises(ValueError, match=r"attention dropout is 0\.1"):
        packed_sdpa_forward(layer.train(), q, q, q, None, dropout=0.1, packed_plan=plan)
