"""CoMP's objective over the pure VLM: L_dec counts, L_align against a hand computation, the gradient
paths and the caption pass (docs/method.md §2, §6, §7)."""

from __future__ import annotations

import pytest
import torch

import cmpt.recipes.comp_objective as objective_module
from cmpt.losses import alignment_loss, next_token_loss, segment_mean
from cmpt.recipes.comp import LossConfig
from cmpt.recipes.comp_objective import CompObjective
from vlm_fixtures import THREE, TWO, build_dirs, build_vlm, make_batch, zero_grads


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return build_dirs(tmp_path_factory.mktemp("objective"))


@pytest.fixture(scope="module")
def qwen(dirs):
    return build_vlm(dirs, "qwen2")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lm_loss_equals_per_sample_causal_lm(dirs, arch):
    vlm = build_vlm(dirs, arch)
    batch = make_batch(vlm, TWO)
    out = CompObjective(vlm, LossConfig(align=False))(batch)
    assert out["lm_count"] == batch["num_loss_tokens"] > 0
    assert out["align_count"] == 0 and out["align_sum"].item() == 0.0
    # reference: each sample alone through the VLM (one row, no packing), shifted CE summed
    total, cu = 0.0, batch["cu_seqlens"].tolist()
    with torch.no_grad():
        vision = vlm.encode_images(batch["patches"], batch["grid_hw"])
        embeds = vlm.embed_inputs(batch["input_ids"], vision)
        for i in range(len(cu) - 1):
            e = embeds[cu[i] : cu[i + 1]][None]
            hidden = vlm.body(inputs_embeds=e).last_hidden_state
            labels = batch["labels"][cu[i] : cu[i + 1]][None]
            total += next_token_loss(hidden, labels, vlm.lm_head.weight, vlm.lm_head.bias)[0].item()
    assert out["lm_sum"].item() == pytest.approx(total, rel=1e-5)


def _features_by_hand(vlm, batch, keep):
    with torch.no_grad():
        merged = vlm.merger(vlm.vit(batch["patches"], batch["grid_hw"]))
        per_sample = [
            sum(int(h * w) // 4 for h, w in g.tolist())
            for g in batch["grid_hw"].split(batch["images_per_sample"].tolist())
        ]
        fv = segment_mean(merged, per_sample)[keep]
        cu = batch["caption_cu_seqlens"].tolist()
        cu, body = batch["caption_cu_seqlens"].tolist(), vlm.llm.model
        caps = [batch["caption_ids"][cu[i] : cu[i + 1]][None] for i in keep]
        ft = torch.stack([body(input_ids=c).last_hidden_state[0].mean(0) for c in caps])
    return fv, ft


@pytest.mark.parametrize("with_counts", [False, True])
def test_alignment_equals_hand_computation(qwen, with_counts):
    batch = make_batch(qwen, THREE, seed=3)
    counts = None
    if with_counts:  # counted before the vision tokens were added: zero-padded to the head rows
        counts = torch.randint(0, 50, (len(qwen.tokenizer) - 3,))
    out = CompObjective(qwen, LossConfig(), counts)(batch)
    assert out["align_count"] == 2  # x and z: y has no image
    fv, ft = _features_by_hand(qwen, batch, [0, 2])
    padded = None if counts is None else torch.cat([counts, torch.zeros(3, dtype=counts.dtype)])
    ref = alignment_loss(fv, ft, qwen.llm.lm_head.weight, padded)
    torch.testing.assert_close(out["align_sum"], ref * 2, rtol=1e-4, atol=1e-5)

    cu = batch["caption_cu_seqlens"].clone()
    cu[3] = cu[2]  # z without caption: only x remains
    no_caption = dict(batch, caption_cu_seqlens=cu, caption_ids=batch["caption_ids"][: int(cu[2])])
    out1 = CompObjective(qwen, LossConfig())(no_caption)
    assert out1["align_count"] == 1
    fv, ft = _features_by_hand(qwen, batch, [0])
    torch.testing.assert_close(out1["align_sum"], alignment_loss(fv, ft, qwen.lm_head.weight))


def test_vocab_counts_longer_than_the_head_are_refused(qwen):
    with pytest.raises(ValueError, match="LM head only"):
        CompObjective(qwen, LossConfig(), torch.ones(len(qwen.tokenizer) + 5))


def test_alignment_gradient_only_on_vision_path(qwen):
    batch = make_batch(qwen, THREE, seed=4)
    qwen.train()
    try:
        out = CompObjective(qwen, LossConfig())(batch)
        zero_grads(qwen)
        out["align_sum"].backward()
        assert qwen.vit.patch_embed.weight.grad.abs().sum() > 0
        assert qwen.merger.fc2.weight.grad.abs().sum() > 0
        for name, p in qwen.llm.named_parameters():  # text path and prototypes: no gradient
            assert p.grad is None or p.grad.abs().sum() == 0, name
    finally:
        qwen.eval()
        zero_grads(qwen)


def test_alignment_zero_when_no_sample_qualifies(qwen):
    qwen.train()
    try:
        out = CompObjective(qwen, LossConfig())(make_batch(qwen, [TWO[1]]))
        assert out["align_count"] == 0 and out["align_sum"].item() == 0.0
        assert out["align_sum"].requires_grad
    finally:
        qwen.eval()


def test_caption_path_sees_no_image(qwen, monkeypatch):
    """No leakage: the caption forward gets caption embeddings only; its features ignore the pixels."""
    batch = make_batch(qwen, THREE, seed=5)
    calls, text_feats = [], []

    def hook(module, args, kwargs):
        calls.append(kwargs["inputs_embeds"].detach().clone())

    def spy(vision_feats, text, *a, **kw):
        text_feats.append(text.clone())
        return alignment_loss(vision_feats, text, *a, **kw)

    monkeypatch.setattr(objective_module, "alignment_loss", spy)
    handle = qwen.body.register_forward_pre_hook(hook, with_kwargs=True)
    objective = CompObjective(qwen, LossConfig())
    try:
        with torch.no_grad():
            a = objective(batch)
            b = objective(dict(batch, patches=torch.randn_like(batch["patches"])))
    finally:
        handle.remove()
    assert len(calls) == 4  # main + caption, twice
    cu = batch["caption_cu_seqlens"].tolist()
    captions = torch.cat([batch["caption_ids"][cu[i] : cu[i + 1]] for i in (0, 2)])
    with torch.no_grad():
        torch.testing.assert_close(calls[1][0], qwen.llm.get_input_embeddings()(captions))
    torch.testing.assert_close(text_feats[0], text_feats[1])
    assert not torch.allclose(a["align_sum"], b["align_sum"])
