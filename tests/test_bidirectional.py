"""Bidirectional attention for Hugging Face decoders through their public mask interface (docs/method.md §7).

For tiny random Qwen2, Llama (SmolLM's architecture) and Qwen2-VL text models, and the sdpa and
eager implementations (flex too, forward only): in bidirectional mode a position's hidden state
changes when a *later* token changes, in causal mode it does not; padding changes nothing in
either mode; packed rows equal one row per sequence.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

from cmpt.vlm.text_attention import TextLayout, body_inputs, pad_rows, set_attention_mode, unpad_rows

SIZES = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip


def _qwen2_vl_text(impl: str):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    cfg = Qwen2VLTextConfig(**SIZES, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1]})
    cfg._attn_implementation = impl
    return Qwen2VLTextModel(cfg)


def _body(family: str, impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "qwen2_vl_text":
        return _qwen2_vl_text(impl).eval()
    cls, cfg_cls = {"qwen2": (Qwen2Model, Qwen2Config), "llama": (LlamaModel, LlamaConfig)}[family]
    cfg = cfg_cls(**SIZES)
    cfg._attn_implementation = impl
    return cls(cfg).eval()


def _hidden(body, ids: torch.Tensor, layout: TextLayout, mode: str, pad_value: int = 0) -> torch.Tensor:
    """Hidden states ``(N, H)`` of packed ``ids`` run in ``layout`` (padding filled with ``pad_value``)."""
    set_attention_mode(body, mode)
    kwargs = body_inputs(layout, body.config._attn_implementation, mode, torch.float32, ids.device)
    rows = ids[None] if layout.packed else pad_rows(ids, layout, value=pad_value)
    with torch.no_grad():
        out = body(input_ids=rows, use_cache=False, **kwargs).last_hidden_state
    return out[0] if layout.packed else unpad_rows(out, layout)


FAMILIES = ["qwen2", "llama", "qwen2_vl_text"]


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex_attention"])
@pytest.mark.parametrize("family", FAMILIES)
def test_later_tokens_matter_only_in_bidirectional_mode(family, impl):
    if family == "qwen2_vl_text" and impl == "flex_attention":
        pytest.skip("transformers has no flex_attention for Qwen2-VL's text model")
    body = _body(family, impl)
    ids = torch.randint(1, 64, (12,), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[9] = (ids[9] + 7) % 63 + 1  # a later token of the second sequence (5..11)
    for packed in (True, False):
        layout = TextLayout((5, 7), packed)
        for mode in ("causal", "bidirectional"):
            a, b = _hidden(body, ids, layout, mode), _hidden(body, changed, layout, mode)
            assert torch.equal(a[:5], b[:5]) or torch.allclose(a[:5], b[:5], atol=1e-6)  # other sequence
            early = (a[5:9] - b[5:9]).abs().max().item()  # positions before the change
            if mode == "causal":
                assert early < 1e-6, (packed, mode)
            else:
                assert early > 1e-4, (packed, mode)
    set_attention_mode(body, "causal")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padding_changes_nothing_and_packed_equals_padded(family, impl):
    body = _body(family, impl)
    ids = torch.randint(1, 64, (3 + 9 + 1,), generator=torch.Generator().manual_seed(2))
    lengths = (3, 9, 1)
    for mode in ("causal", "bidirectional"):
        padded = TextLayout(lengths, packed=False)
        a = _hidden(body, ids, padded, mode, pad_value=0)
        b = _hidden(body, ids, padded, mode, pad_value=17)  # different padding tokens
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        packed = _hidden(body, ids, TextLayout(lengths, packed=True), mode)
        torch.testing.assert_close(packed, a, rtol=1e-5, atol=1e-5)
        alone = torch.cat([_hidden(body, x, TextLayout((len(x),), True), mode) for x in ids.split(lengths)])
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    set_attention_mode(body, "causal")


def test_causal_mode_equals_the_models_own_causal_mask():
    body = _body("qwen2", "sdpa")
    ids = torch.randint(1, 64, (10,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = body(input_ids=ids[None]).last_hidden_state[0]
    torch.testing.assert_close(
        _hidden(body, ids, TextLayout((10,), True), "causal"), ref, rtol=1e-5, atol=1e-6
    )


def test_bidirectional_needs_switchable_attention():
    with pytest.raises(ValueError, match="no attention module with an `is_causal` flag"):
        set_attention_mode(torch.nn.Linear(2, 2), "bidirectional")
    with pytest.raises(ValueError, match="attention must be one of"):
        set_attention_mode(_body("llama", "sdpa"), "prefix")
