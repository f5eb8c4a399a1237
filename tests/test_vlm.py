"""VisionLanguageModel, a pure model: assembly, hidden states, dummy image, I/O, generation, parts
(docs/method.md §2, §6, §7). Its losses are tested with the CoMP objective (test_comp_objective.py)."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from PIL import Image

from cmpt.vision.vit import NativeViT
from cmpt.vlm.chat import IMAGE_PAD
from cmpt.vlm.model import VisionLanguageModel, VLMConfig
from vlm_fixtures import PATCH_DIM, THREE, TWO, build_dirs, build_vlm, make_batch, zero_grads


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return build_dirs(tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def qwen(dirs) -> VisionLanguageModel:
    return build_vlm(dirs, "qwen2")


@pytest.fixture(scope="module")
def llama(dirs) -> VisionLanguageModel:
    return build_vlm(dirs, "llama")


def test_build_adds_vision_tokens_and_config(qwen):
    tok = qwen.tokenizer
    assert len(tok) == 403
    assert qwen.llm.get_input_embeddings().num_embeddings == len(tok)
    assert qwen.config.image_pad_id == tok.convert_tokens_to_ids(IMAGE_PAD)
    assert qwen.merger.fc2.out_features == 64 and qwen.merger.norm.normalized_shape == (32,)
    assert qwen.config.merge_size == 2 and not qwen.vit.config.keep_prefix_tokens
    assert not qwen.training


def _forward(vlm: VisionLanguageModel, batch: dict, **kw):
    keys = ("patches", "grid_hw", "images_per_sample", "sample_ids")
    return vlm(batch["input_ids"], batch["cu_seqlens"], **{k: batch[k] for k in keys}, **kw)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_forward_returns_hidden_states(arch, qwen, llama):
    vlm = qwen if arch == "qwen2" else llama
    batch = make_batch(vlm, TWO)
    assert (batch["input_ids"] == vlm.config.image_pad_id).sum() == 1 + 2
    with torch.no_grad():
        out = _forward(vlm, batch)
    assert out.hidden.shape == (batch["num_tokens"], vlm.llm.config.hidden_size)
    assert out.vision.shape == (3, vlm.llm.config.hidden_size) and out.vision_per_sample == [3, 0]
    assert out.layout.lengths == tuple(batch["cu_seqlens"].diff().tolist()) and out.layout.packed
    assert torch.isfinite(out.hidden).all()


def test_placeholder_mismatch_names_sample(qwen):
    bad = [dict(TWO[0], tokens=[1, 1]), TWO[1]]  # 2 placeholders rendered, 3 merged tokens
    with pytest.raises(ValueError, match=r"sample 'a': 2 <\|image_pad\|> vs 3 merged"):
        _forward(qwen, make_batch(qwen, bad))


def test_image_tokens_change_hidden_and_grads_reach_everything(llama):
    vlm = llama.train()
    try:
        batch = make_batch(vlm, TWO)
        out = _forward(vlm, batch)
        with torch.no_grad():
            other = _forward(vlm, dict(batch, patches=batch["patches"] + 1.0))
        assert not torch.allclose(other.hidden, out.hidden)
        zero_grads(vlm)
        torch.nn.functional.linear(out.hidden, vlm.lm_head.weight).logsumexp(-1).sum().backward()
        for name, p in [
            ("vit.patch_embed", vlm.vit.patch_embed.weight),
            ("vit.pos_embed", vlm.vit.pos_embed),
            ("merger.fc1", vlm.merger.fc1.weight),
            ("merger.fc2", vlm.merger.fc2.weight),
            ("llm.layer0.q", vlm.body.layers[0].self_attn.q_proj.weight),
            ("lm_head", vlm.lm_head.weight),
        ]:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    finally:
        vlm.eval()
        zero_grads(vlm)


def test_text_only_batch_uses_dummy_image_in_training(qwen):
    batch = make_batch(qwen, [TWO[1]])
    assert batch["patches"].shape == (0, PATCH_DIM) and batch["grid_hw"].shape == (0, 2)
    qwen.train()
    try:
        _forward(qwen, batch).hidden.sum().backward()
        for name, p in [*qwen.vit.named_parameters(), *qwen.merger.named_parameters()]:
            assert p.grad is not None, name
            assert p.grad.abs().sum() == 0, name
        zero_grads(qwen)
        qwen.eval()
        _forward(qwen, batch).hidden.sum().backward()  # eval mode: no dummy image
        assert all(p.grad is None for p in qwen.vit.parameters())
    finally:
        qwen.eval()
        zero_grads(qwen)


def test_text_features_are_mean_of_final_hidden_states(qwen):
    ids = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10])]
    feats = qwen.text_features(torch.cat(ids), [0, 4, 6])
    for i, x in enumerate(ids):
        with torch.no_grad():
            ref = qwen.body(input_ids=x[None]).last_hidden_state[0].mean(0)
        torch.testing.assert_close(feats[i], ref, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip_and_export_vit(qwen, tmp_path):
    batch = make_batch(qwen, THREE, seed=6)
    with torch.no_grad():
        ref = _forward(qwen, batch).hidden
    qwen.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "processor" / "preprocessor_config.json").is_file()
    assert (tmp_path / "m" / "merger.safetensors").is_file()
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m")
    assert loaded.config == qwen.config
    assert loaded.processor.to_dict() == qwen.processor.to_dict()
    a, b = qwen.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(_forward(loaded, batch).hidden, ref)

    qwen.export_vit(tmp_path / "vfm")
    vfm = NativeViT.from_pretrained(tmp_path / "vfm")
    with torch.no_grad():
        assert torch.equal(
            vfm(batch["patches"], batch["grid_hw"]), qwen.vit(batch["patches"], batch["grid_hw"])
        )


def test_directory_with_training_settings_loads_with_one_warning(qwen, tmp_path):
    """VLM directories written before the model became loss-free carry loss settings."""
    qwen.save_pretrained(tmp_path / "old")
    cfg_file = tmp_path / "old" / "vlm_config.json"
    raw = json.loads(cfg_file.read_text())
    raw.update(dummy_image=True, vision_temp=0.005, sinkhorn_variant="official", lm_chunk_size=4096)
    cfg_file.write_text(json.dumps(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = VisionLanguageModel.from_pretrained(tmp_path / "old")
    msgs = [str(w.message) for w in caught if "no longer part" in str(w.message)]
    assert len(msgs) == 1 and "vision_temp" in msgs[0] and "dummy_image" in msgs[0]
    assert loaded.config == qwen.config
    with pytest.raises(TypeError, match="unknown VLMConfig overrides"):
        VisionLanguageModel.from_pretrained(tmp_path / "old", vision_temp=0.1)


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    img.putpixel((1, 1), (255, 0, 0))
    return img


def test_generate_single_and_batch(llama):
    imgs = [_image(0, (28, 28)), _image(1, (56, 28)), _image(2, (40, 40))]
    items = [([imgs[0]], "What is the largest bar?"), (None, "Describe the image."), (imgs[1:], "Compare.")]
    singles = [llama.generate(im, q, max_new_tokens=6) for im, q in items]
    assert all(isinstance(s, str) for s in singles)
    assert llama.generate_batch(items, max_new_tokens=6) == singles
    assert llama.generate_batch([]) == []


def test_parts_and_set_trainable(qwen, llama):
    for vlm, tied in ((qwen, True), (llama, False)):
        parts = vlm.parts()
        ids = [id(p) for group in parts.values() for p in group]
        assert len(ids) == len(set(ids)) == len({id(p) for p in vlm.parameters()})
        embed = vlm.llm.get_input_embeddings().weight
        assert any(p is embed for p in parts["llm"])
        assert (parts["lm_head"] == []) is tied
        try:
            vlm.set_trainable(["merger"])  # stage I
            for name, group in parts.items():
                assert all(p.requires_grad == (name == "merger") for p in group), name
            if tied:
                with pytest.warns(UserWarning, match="tied"):
                    vlm.set_trainable(["lm_head"])
                assert not embed.requires_grad
            else:
                vlm.set_trainable(["lm_head"])
                assert vlm.lm_head.weight.requires_grad and not embed.requires_grad
            with pytest.raises(ValueError, match="unknown parts"):
                vlm.set_trainable(["vit"])
        finally:
            vlm.set_trainable(list(parts))
    units = qwen.fsdp_units()
    assert len(units) == 2 + 2 and units[0] is qwen.vit.blocks[0] and units[-1] is qwen.body.layers[-1]


def test_build_options(dirs, tmp_path):
    import hf_tiny

    hf_dir = hf_tiny.save("dinov2", tmp_path)
    vlm = build_vlm(dirs, "qwen2", vit_from_hf=None, rope=True)
    assert vlm.vit.config.rope
    vlm = VisionLanguageModel.build(hf_dir, dirs / "qwen2")  # an HF vision checkpoint is converted
    assert vlm.vit.config.cls_token and vlm.vit.config.num_prefix_tokens == 0
    assert vlm.processor.patch_size == 14 and vlm.processor.merge_size == 2
    vlm.enable_gradient_checkpointing()
    vlm.train()
    _forward(vlm, make_batch(vlm, TWO)).hidden.sum().backward()
    assert vlm.vit.blocks[0].attn.qkv.weight.grad is not None
    with pytest.warns(UserWarning, match="nope"):
        assert VLMConfig.from_dict({"nope": 1}) == VLMConfig()


def test_generate_is_causal_after_a_bidirectional_forward(llama):
    items = [(None, "Describe the image.")]  # one row: no padding, so no mask from transformers
    ref = llama.generate_batch(items, max_new_tokens=5)
    with torch.no_grad():
        _forward(llama, make_batch(llama, TWO), attention="bidirectional")
    assert llama.generate_batch(items, max_new_tokens=5) == ref


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_run_layer_reproduces_a_body_layer(qwen, packed, attention):
    """An extra layer sees the forward's mask, attention mode and positions: re-running layer 1 on
    layer 0's output gives layer 1's output."""
    seen = {}
    hooks = [
        layer.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(i, o[0] if isinstance(o, tuple) else o)
        )
        for i, layer in enumerate(qwen.body.layers)
    ]
    qwen.configure_packing(packed)
    try:
        with torch.no_grad():
            out = _forward(qwen, make_batch(qwen, THREE), attention=attention)
            h0 = seen[0][0] if packed else seen[0][out.layout.padding_mask().bool()]
            h1 = seen[1][0] if packed else seen[1][out.layout.padding_mask().bool()]
            again = qwen.run_layer(qwen.body.layers[1], h0, out)
    finally:
        for h in hooks:
            h.remove()
        qwen.configure_packing(True)
    torch.testing.assert_close(again, h1, rtol=1e-5, atol=1e-5)


def test_embed_inputs_refuses_a_placeholder_count_mismatch(qwen):
    """``embed_inputs`` counts the placeholders of the ids it is given (on the host) itself."""
    pad = qwen.config.image_pad_id
    ids = torch.tensor([1, pad, pad, 2])
    h = qwen.input_embeddings.weight.shape[1]
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholders but 3 merged"):
        qwen.embed_inputs(ids, torch.zeros(3, h))
    assert qwen.embed_inputs(ids, torch.zeros(2, h)).shape == (4, h)
