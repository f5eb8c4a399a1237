"""VisionLanguageModel: assembly, losses, dummy image, alignment, I/O, generation, parts (SPEC §2, §6)."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

import cmpt.vlm.model as vlm_model
from cmpt.demo.tiny_lm import build_tiny_causal_lm, default_corpus, save_tiny_lm, train_tokenizer
from cmpt.losses import alignment_loss, masked_mean, segment_mean
from cmpt.vision.processor import ImageProcessor
from cmpt.vision.vit import NativeViT, NativeViTConfig
from cmpt.vlm.chat import IMAGE_PAD, caption_ids, collate_rendered, render_conversation
from cmpt.vlm.model import VisionLanguageModel, VLMConfig

P = 14
PATCH_DIM = 3 * P * P


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    tok = train_tokenizer(default_corpus(300), vocab_size=400)
    save_tiny_lm(build_tiny_causal_lm(tok, "qwen2"), tok, root / "qwen2")
    save_tiny_lm(build_tiny_causal_lm(tok, "llama", tie_word_embeddings=False, seed=1), tok, root / "llama")
    torch.manual_seed(0)
    vit = NativeViT(
        NativeViTConfig(
            hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, pos_grid=4, patch_size=P
        )
    )
    vit.save_pretrained(root / "vit")
    return root


def _build(dirs, arch: str = "qwen2", **kw) -> VisionLanguageModel:
    processor = ImageProcessor(P, 2, min_pixels=28 * 28, max_pixels=56 * 56)
    return VisionLanguageModel.build(dirs / "vit", dirs / arch, processor=processor, **kw)


@pytest.fixture(scope="module")
def qwen(dirs) -> VisionLanguageModel:
    return _build(dirs, "qwen2")


@pytest.fixture(scope="module")
def llama(dirs) -> VisionLanguageModel:
    return _build(dirs, "llama")


def make_batch(vlm: VisionLanguageModel, samples: list[dict], seed: int = 0) -> dict:
    """Collate like the data pipeline: rendered ids/labels, packed patches, captions (SPEC §2 contract).

    ``samples``: ``{"id", "grids": [(h, w), ...], "question", "answer"}``; ``tokens`` overrides the
    number of placeholders rendered per image (to provoke mismatches).
    """
    gen = torch.Generator().manual_seed(seed)
    rendered, patches, grids, caps = [], [], [], []
    for s in samples:
        n_tok = s.get("tokens", [h * w // 4 for h, w in s["grids"]])
        conv = [
            {"from": "human", "value": "<image>\n" * len(s["grids"]) + s["question"]},
            {"from": "gpt", "value": s["answer"]},
        ]
        r = render_conversation(conv, vlm.tokenizer, n_tok, sample_id=s["id"])
        rendered.append(r)
        caps.append(caption_ids(r.caption, vlm.tokenizer, 32))
        for h, w in s["grids"]:
            patches.append(torch.randn(h * w, PATCH_DIM, generator=gen))
            grids.append((h, w))
    batch = collate_rendered(rendered, vlm.tokenizer.pad_token_id)
    tc = max(len(c) for c in caps)
    batch["caption_ids"] = torch.full((len(caps), tc), vlm.tokenizer.pad_token_id, dtype=torch.long)
    batch["caption_mask"] = torch.zeros((len(caps), tc), dtype=torch.long)
    for i, c in enumerate(caps):
        batch["caption_ids"][i, : len(c)], batch["caption_mask"][i, : len(c)] = c, 1
    batch["patches"] = torch.cat(patches) if patches else torch.zeros(0, PATCH_DIM)
    batch["grid_hw"] = torch.tensor(grids, dtype=torch.long).view(-1, 2)
    batch["images_per_sample"] = torch.tensor([len(s["grids"]) for s in samples])
    batch["num_loss_tokens"] = int((batch["labels"][:, 1:] != -100).sum())
    batch["num_align"] = sum(1 for s in samples if s["grids"])
    batch["sample_ids"] = [s["id"] for s in samples]
    return batch


TWO = [
    {"id": "a", "grids": [(2, 2), (4, 2)], "question": "What does the chart show?", "answer": "The sales."},
    {"id": "b", "grids": [], "question": "How many shapes are there?", "answer": "There are 3 red dots."},
]
THREE = [
    {"id": "x", "grids": [(4, 4)], "question": "Describe the image.", "answer": "A blue square."},
    {"id": "y", "grids": [], "question": "What is the total?", "answer": "The total is 12."},
    {"id": "z", "grids": [(2, 4), (2, 2)], "question": "What colour?", "answer": "Green and red."},
]


def _zero_grads(vlm: VisionLanguageModel) -> None:
    for p in vlm.parameters():
        p.grad = None


def test_build_adds_vision_tokens_and_config(qwen):
    tok = qwen.tokenizer
    assert len(tok) == 403
    assert qwen.llm.get_input_embeddings().num_embeddings == len(tok)
    assert qwen.config.image_pad_id == tok.convert_tokens_to_ids(IMAGE_PAD)
    assert qwen.merger.fc2.out_features == 64 and qwen.merger.norm.normalized_shape == (32,)
    assert qwen.config.merge_size == 2 and not qwen.vit.config.keep_prefix_tokens
    assert not qwen.training


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_forward_counts(arch, qwen, llama):
    vlm = qwen if arch == "qwen2" else llama
    batch = make_batch(vlm, TWO)
    assert (batch["input_ids"] == vlm.config.image_pad_id).sum() == 1 + 2
    out = vlm(batch)
    assert set(out) == {"lm_sum", "lm_count", "align_sum", "align_count"}
    assert out["lm_count"] == batch["num_loss_tokens"] > 0
    assert torch.isfinite(out["lm_sum"]) and out["lm_sum"] > 0
    assert out["align_count"] == 0 and out["align_sum"].item() == 0.0


def test_placeholder_mismatch_names_sample(qwen):
    bad = [dict(TWO[0], tokens=[1, 1]), TWO[1]]  # 2 placeholders rendered, 3 merged tokens
    with pytest.raises(ValueError, match=r"sample 'a': 2 <\|image_pad\|> vs 3 merged"):
        qwen(make_batch(qwen, bad))


def test_image_tokens_change_loss_and_grads_reach_everything(llama):
    vlm = llama.train()
    try:
        batch = make_batch(vlm, TWO)
        out = vlm(batch)
        other = dict(batch, patches=batch["patches"] + 1.0)
        with torch.no_grad():
            assert not torch.allclose(vlm(other)["lm_sum"], out["lm_sum"])
        _zero_grads(vlm)
        out["lm_sum"].backward()
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
        _zero_grads(vlm)


def test_text_only_batch_uses_dummy_image_in_training(qwen):
    batch = make_batch(qwen, [TWO[1]])
    assert batch["patches"].shape == (0, PATCH_DIM) and batch["grid_hw"].shape == (0, 2)
    qwen.train()
    try:
        out = qwen(batch)
        _zero_grads(qwen)
        out["lm_sum"].backward()
        for name, p in [*qwen.vit.named_parameters(), *qwen.merger.named_parameters()]:
            assert p.grad is not None, name
            assert p.grad.abs().sum() == 0, name
        _zero_grads(qwen)
        qwen.eval()
        qwen(batch)["lm_sum"].backward()  # eval mode: no dummy image
        assert all(p.grad is None for p in qwen.vit.parameters())
    finally:
        qwen.eval()
        _zero_grads(qwen)


def _features_by_hand(vlm, batch, keep):
    with torch.no_grad():
        merged = vlm.merger(vlm.vit(batch["patches"], batch["grid_hw"]))
        per_sample = [
            sum(int(h * w) // 4 for h, w in g.tolist())
            for g in batch["grid_hw"].split(batch["images_per_sample"].tolist())
        ]
        fv = segment_mean(merged, per_sample)[keep]
        ids, mask = batch["caption_ids"][keep], batch["caption_mask"][keep]
        hidden = vlm.llm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ft = masked_mean(hidden, mask)
    return fv, ft


@pytest.mark.parametrize("with_counts", [False, True])
def test_alignment_equals_hand_computation(qwen, with_counts):
    batch = make_batch(qwen, THREE, seed=3)
    counts = None
    if with_counts:  # counted before the vision tokens were added: zero-padded to the head rows
        counts = torch.randint(0, 50, (len(qwen.tokenizer) - 3,))
    out = qwen(batch, align=True, vocab_counts=counts)
    assert out["align_count"] == 2  # x and z: y has no image
    fv, ft = _features_by_hand(qwen, batch, [0, 2])
    padded = None if counts is None else torch.cat([counts, torch.zeros(3, dtype=counts.dtype)])
    ref = alignment_loss(fv, ft, qwen.llm.lm_head.weight, padded)
    torch.testing.assert_close(out["align_sum"], ref * 2, rtol=1e-4, atol=1e-5)

    no_caption = dict(batch, caption_mask=batch["caption_mask"].clone())
    no_caption["caption_mask"][2] = 0  # z without caption: only x remains
    out1 = qwen(no_caption, align=True)
    assert out1["align_count"] == 1
    fv, ft = _features_by_hand(qwen, batch, [0])
    torch.testing.assert_close(out1["align_sum"], alignment_loss(fv, ft, qwen.lm_head.weight))


def test_alignment_gradient_only_on_vision_path(qwen):
    batch = make_batch(qwen, THREE, seed=4)
    qwen.train()
    try:
        out = qwen(batch, align=True)
        _zero_grads(qwen)
        out["align_sum"].backward()
        assert qwen.vit.patch_embed.weight.grad.abs().sum() > 0
        assert qwen.merger.fc2.weight.grad.abs().sum() > 0
        for name, p in qwen.llm.named_parameters():  # text path and prototypes: no gradient
            assert p.grad is None or p.grad.abs().sum() == 0, name
    finally:
        qwen.eval()
        _zero_grads(qwen)


def test_alignment_zero_when_no_sample_qualifies(qwen):
    qwen.train()
    try:
        out = qwen(make_batch(qwen, [TWO[1]]), align=True)
        assert out["align_count"] == 0 and out["align_sum"].item() == 0.0
        assert out["align_sum"].requires_grad
    finally:
        qwen.eval()


def test_caption_path_sees_no_image(qwen, monkeypatch):
    """No leakage: the caption forward gets token ids only, and its features ignore the pixels."""
    batch = make_batch(qwen, THREE, seed=5)
    calls, text_feats = [], []

    def hook(module, args, kwargs):
        calls.append(kwargs)

    def spy(vision_feats, text, *a, **kw):
        text_feats.append(text.clone())
        return alignment_loss(vision_feats, text, *a, **kw)

    monkeypatch.setattr(vlm_model, "alignment_loss", spy)
    handle = qwen.body.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            a = qwen(batch, align=True)
            b = qwen(dict(batch, patches=torch.randn_like(batch["patches"])), align=True)
    finally:
        handle.remove()
    assert len(calls) == 4  # main + caption, twice
    caption_call = calls[1]
    assert caption_call.get("inputs_embeds") is None
    assert not (caption_call["input_ids"] == qwen.config.image_pad_id).any()
    torch.testing.assert_close(caption_call["input_ids"], batch["caption_ids"][[0, 2]])
    torch.testing.assert_close(text_feats[0], text_feats[1])
    assert not torch.allclose(a["align_sum"], b["align_sum"])


def test_save_load_roundtrip_and_export_vit(qwen, tmp_path):
    batch = make_batch(qwen, THREE, seed=6)
    with torch.no_grad():
        ref = qwen(batch, align=True)
    qwen.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "processor" / "preprocessor_config.json").is_file()
    assert (tmp_path / "m" / "merger.safetensors").is_file()
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m")
    assert loaded.config == qwen.config
    assert loaded.processor.to_dict() == qwen.processor.to_dict()
    a, b = qwen.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        out = loaded(batch, align=True)
    assert torch.equal(out["lm_sum"], ref["lm_sum"]) and torch.equal(out["align_sum"], ref["align_sum"])

    qwen.export_vit(tmp_path / "vfm")
    vfm = NativeViT.from_pretrained(tmp_path / "vfm")
    with torch.no_grad():
        assert torch.equal(
            vfm(batch["patches"], batch["grid_hw"]), qwen.vit(batch["patches"], batch["grid_hw"])
        )


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
    vlm = _build(dirs, "qwen2", vit_from_hf=None, rope=True, dummy_image=False, vision_temp=0.01)
    assert vlm.vit.config.rope and not vlm.config.dummy_image and vlm.config.vision_temp == 0.01
    vlm = VisionLanguageModel.build(hf_dir, dirs / "qwen2")  # an HF vision checkpoint is converted
    assert vlm.vit.config.cls_token and vlm.vit.config.num_prefix_tokens == 0
    assert vlm.processor.patch_size == 14 and vlm.processor.merge_size == 2
    vlm.enable_gradient_checkpointing()
    vlm.train()
    out = vlm(make_batch(vlm, TWO))
    assert out["lm_count"] > 0
    out["lm_sum"].backward()
    assert vlm.vit.blocks[0].attn.qkv.weight.grad is not None
    with pytest.raises(ValueError, match="unknown VLMConfig keys"):
        VLMConfig.from_dict({"nope": 1})
