"""QwenVLBackbone: a Hugging Face Qwen2-VL / Qwen2.5-VL behind the VisionLanguageModel interface
(docs/method.md §3 "Backbones", §7), on tiny random checkpoints built and saved here (no hub)."""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from cmpt.demo.tiny_lm import default_corpus, train_tokenizer
from cmpt.embed.qwen_vl import QwenVLBackbone
from cmpt.losses import segment_mean
from cmpt.vlm.chat import IMAGE_PAD, VISION_END, VISION_START

ARCHS = ("qwen2_vl", "qwen2_5_vl")
VIDEO_PAD = "<|video_pad|>"
P, T, M = 14, 2, 2
PREPROCESSOR = {  # the shape of a real Qwen2.5-VL preprocessor_config.json, with a small pixel cap
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "min_pixels": 3136,
    "max_pixels": 28 * 28 * 24,
    "patch_size": P,
    "temporal_patch_size": T,
    "merge_size": M,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def build_checkpoint(arch: str, out: Path) -> Path:
    """A tiny random Qwen2-VL (untied head) or Qwen2.5-VL (tied head, windowed vision block)."""
    tok = train_tokenizer(default_corpus(200), vocab_size=300)
    tok.add_tokens([VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD], special_tokens=True)
    tid = tok.convert_tokens_to_ids
    vision = dict(
        depth=2, embed_dim=32, num_heads=4, patch_size=P, spatial_merge_size=M, temporal_patch_size=T
    )
    if arch == "qwen2_vl":
        vision.update(hidden_size=48, mlp_ratio=2)
    else:
        vision.update(hidden_size=32, out_hidden_size=48, intermediate_size=64, window_size=56)
        vision.update(fullatt_block_indexes=[1])
    text = dict(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]},
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cls = tf.Qwen2VLConfig if arch == "qwen2_vl" else tf.Qwen2_5_VLConfig
    cfg = cls(
        vision_config=vision,
        text_config=text,
        image_token_id=tid(IMAGE_PAD),
        video_token_id=tid(VIDEO_PAD),
        vision_start_token_id=tid(VISION_START),
        vision_end_token_id=tid(VISION_END),
        tie_word_embeddings=arch == "qwen2_5_vl",
    )
    torch.manual_seed(0)
    model_cls = (
        tf.Qwen2VLForConditionalGeneration if arch == "qwen2_vl" else tf.Qwen2_5_VLForConditionalGeneration
    )
    model = model_cls(cfg)
    with torch.no_grad():  # larger than the default init, so that every weight matters
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen_vl")
    return {arch: build_checkpoint(arch, root / arch) for arch in ARCHS}


def render(bb: QwenVLBackbone, parts: list) -> torch.Tensor:
    """Ids of text pieces (str) and images (int = merged tokens), Qwen style."""
    ids: list[int] = []
    for part in parts:
        if isinstance(part, str):
            ids += bb.tokenizer(part, add_special_tokens=False)["input_ids"]
        else:
            ids += [bb.config.vision_start_id, *[bb.config.image_pad_id] * part, bb.config.vision_end_id]
    return torch.tensor(ids)


SAMPLES = [  # (text pieces with grids in place of images)
    ["Describe ", (4, 6), " the chart shows sales."],
    ["What is the total? The total is 12."],
    [(2, 2), "Compare", (6, 4), "green and red."],
]


def batch(bb: QwenVLBackbone, samples: list[list], seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    seqs, grids, per = [], [], []
    for s in samples:
        g = [x for x in s if isinstance(x, tuple)]
        seqs.append(render(bb, [x if isinstance(x, str) else x[0] * x[1] // M**2 for x in s]))
        grids += g
        per.append(len(g))
    n = sum(h * w for h, w in grids)
    return dict(
        input_ids=torch.cat(seqs),
        cu_seqlens=torch.tensor([0, *[len(s) for s in seqs]]).cumsum(0),
        patches=torch.randn(n, 3 * P * P, generator=gen),
        grid_hw=torch.tensor(grids, dtype=torch.long).reshape(-1, 2),
        images_per_sample=torch.tensor(per),
    )


def split(b: dict) -> list[dict]:
    """The batch's samples as batches of one (same ids and patches)."""
    cu, per = b["cu_seqlens"].tolist(), b["images_per_sample"].tolist()
    rows = b["grid_hw"].prod(-1).tolist()
    out, img, row = [], 0, 0
    for i, k in enumerate(per):
        n = sum(rows[img : img + k])
        out.append(
            dict(
                input_ids=b["input_ids"][cu[i] : cu[i + 1]],
                cu_seqlens=torch.tensor([0, cu[i + 1] - cu[i]]),
                patches=b["patches"][row : row + n],
                grid_hw=b["grid_hw"][img : img + k],
                images_per_sample=torch.tensor([k]),
            )
        )
        img, row = img + k, row + n
    return out


def run(bb: QwenVLBackbone, b: dict, **kw):
    return bb(b["input_ids"], b["cu_seqlens"], patches=b["patches"], grid_hw=b["grid_hw"],
              images_per_sample=b["images_per_sample"], **kw)  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_load_and_interface(ckpts, arch):
    bb = QwenVLBackbone.from_pretrained(ckpts[arch])
    assert not bb.training and bb.packing and bb.device == torch.device("cpu")
    c = bb.config
    assert (c.model_type, c.merge_size, bb.patch_dim) == (arch, M, 3 * T * P * P)
    assert c.image_pad_id == bb.tokenizer.convert_tokens_to_ids(IMAGE_PAD) == bb.hf.config.image_token_id
    assert c.vision_start_id == bb.tokenizer.convert_tokens_to_ids(VISION_START)
    assert c.vision_end_id == bb.tokenizer.convert_tokens_to_ids(VISION_END)
    assert bb.body is bb.hf.model.language_model and bb.lm_head is bb.hf.lm_head
    p = bb.processor
    assert (p.patch_size, p.merge_size, p.max_pixels) == (P, M, PREPROCESSOR["max_pixels"])
    assert np.allclose(p.std, PREPROCESSOR["image_std"])
    parts = bb.parts()
    ids = [id(x) for ps in parts.values() for x in ps]
    assert len(ids) == len(set(ids)) and set(ids) == {id(x) for x in bb.hf.parameters()}
    assert {id(x) for x in parts["merger"]} == {id(x) for x in bb.visual.merger.parameters()}
    assert bb._tied() == (arch == "qwen2_5_vl") and len(parts["lm_head"]) == (arch == "qwen2_vl")
    bb.set_trainable(["vision", "merger"])
    assert all(
        x.requires_grad == (id(x) in {id(y) for y in bb.visual.parameters()}) for x in bb.hf.parameters()
    )
    assert len(bb.fsdp_units()) == 2 + 2
    assert not bb.configure_packing(False) and bb.configure_packing(None)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_reload_bit_exact(ckpts, arch, tmp_path):
    bb = QwenVLBackbone.from_pretrained(ckpts[arch])
    bb.save_pretrained(tmp_path / "copy")
    re = QwenVLBackbone.from_pretrained(tmp_path / "copy")
    a, b = bb.state_dict(), re.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert re.processor.to_dict() == bb.processor.to_dict() and re.config == bb.config
    text = "The chart shows sales."
    assert re.tokenizer(text)["input_ids"] == bb.tokenizer(text)["input_ids"]
    x = batch(bb, SAMPLES)
    assert torch.equal(run(bb, x).hidden, run(re, x).hidden)
    pre = json.loads((tmp_path / "copy" / "preprocessor_config.json").read_text())
    assert pre["processor_class"] == "Qwen2_5_VLProcessor" and pre["temporal_patch_size"] == T


def _hf_kwargs(bb: QwenVLBackbone, ids: torch.Tensor) -> dict:
    """transformers ≥ 5.x wants the token types for its own M-RoPE positions; 5.0 finds the images."""
    if "mm_token_type_ids" in inspect.signature(bb.hf.model.get_rope_index).parameters:
        return {"mm_token_type_ids": (ids == bb.config.image_pad_id).int()}
    return {}


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_equals_hf(ckpts, arch):
    """One sequence with two images (M-RoPE matters): equal to the HF model's own forward, which
    computes its positions itself with ``get_rope_index``."""
    bb = QwenVLBackbone.from_pretrained(ckpts[arch])
    x = batch(bb, [SAMPLES[2]])
    out = run(bb, x)
    ids = x["input_ids"][None]
    thw = torch.cat([torch.ones(len(x["grid_hw"]), 1, dtype=torch.long), x["grid_hw"]], 1)
    with torch.no_grad():
        ref = bb.hf.model(
            input_ids=ids,
            pixel_values=bb.prepare_patches(x["patches"]),
            image_grid_thw=thw,
            use_cache=False,
            **_hf_kwargs(bb, ids),
        )
    torch.testing.assert_close(out.hidden, ref.last_hidden_state[0], atol=1e-5, rtol=0)
    pos, _ = bb.hf.model.get_rope_index(input_ids=ids, image_grid_thw=thw, **_hf_kwargs(bb, ids))
    assert torch.equal(out.body_kwargs["position_ids"], pos)
    assert out.vision.shape == (sum(h * w for h, w in x["grid_hw"].tolist()) // M**2, 48)
    assert out.vision_per_sample == [out.vision.shape[0]] and out.layout.packed


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_padded(ckpts, arch, impl):
    bb = QwenVLBackbone.from_pretrained(ckpts[arch], attn_implementation=impl)
    x = batch(bb, SAMPLES)
    for attention in ("causal", "bidirectional"):
        assert bb.configure_packing(True)
        packed = run(bb, x, attention=attention)
        layer = copy.deepcopy(bb.body.layers[1])
        dec_packed = bb.run_layer(layer, packed.hidden, packed)
        bb.configure_packing(False)
        padded = run(bb, x, attention=attention)
        assert not padded.layout.packed and padded.body_kwargs["position_ids"].shape[:2] == (3, 3)
        torch.testing.assert_close(packed.hidden, padded.hidden, atol=1e-5, rtol=0)
        torch.testing.assert_close(dec_packed, bb.run_layer(layer, padded.hidden, padded), atol=1e-5, rtol=0)
        bb.configure_packing(True)
        alone = [run(bb, one, attention=attention).hidden for one in split(x)]
        torch.testing.assert_close(packed.hidden, torch.cat(alone), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_bidirectional_sees_later_tokens(ckpts, arch):
    bb = QwenVLBackbone.from_pretrained(ckpts[arch])
    x = batch(bb, [SAMPLES[0]])
    y = dict(x, input_ids=x["input_ids"].clone())
    y["input_ids"][-1] = bb.tokenizer(" red", add_special_tokens=False)["input_ids"][0]
    for attention, changes in (("causal", False), ("bidirectional", True)):
        a, b = run(bb, x, attention=attention).hidden, run(bb, y, attention=attention).hidden
        assert (a[0] - b[0]).abs().max().item() > 1e-4 if changes else torch.equal(a[:-1], b[:-1])


def _hf_image_processor(directory: Path):
    """transformers' PIL image processor (``Qwen2VLImageProcessorPil`` in newer 5.x, the slow
    ``Qwen2VLImageProcessor`` in 5.0); neither needs torchvision."""
    cls = getattr(tf, "Qwen2VLImageProcessorPil", None)
    if cls is None:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as cls
    return cls.from_pretrained(str(directory))


def test_prepare_patches_layout(ckpts):
    bb = QwenVLBackbone.from_pretrained(ckpts["qwen2_vl"])
    rows = torch.randn(8, 3 * P * P)
    model_rows = bb.prepare_patches(rows)
    assert model_rows.shape == (8, bb.patch_dim) and torch.equal(bb.prepare_patches(model_rows), model_rows)
    frames = model_rows.view(8, 3, T, P, P)  # (channel, frame, p, p), as Qwen2VLImageProcessor
    assert all(torch.equal(frames[:, :, t], rows.view(8, 3, P, P)) for t in range(T))
    with pytest.raises(ValueError, match="processor rows"):
        bb.prepare_patches(torch.zeros(2, 5))
    hf = _hf_image_processor(ckpts["qwen2_vl"])
    rng = np.random.default_rng(0)
    for size in ((112, 84), (130, 101)):  # (W, H): on the grid already, then resized once (bicubic)
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        ours = bb.processor([img])
        ref = hf(images=[img], return_tensors="pt")
        assert ref["image_grid_thw"].tolist() == [[1, *ours.grid_hw[0].tolist()]]
        torch.testing.assert_close(
            bb.prepare_patches(ours.patches), ref["pixel_values"].float(), atol=1e-5, rtol=0
        )


def test_placeholder_mismatch_names_sample(ckpts):
    bb = QwenVLBackbone.from_pretrained(ckpts["qwen2_vl"])
    x = batch(bb, SAMPLES)
    pads = (x["input_ids"] == bb.config.image_pad_id).nonzero()[:, 0]
    last = int(pads[-1])  # drop one <|image_pad|> of the third sample
    bad = dict(x, input_ids=torch.cat([x["input_ids"][:last], x["input_ids"][last + 1 :]]))
    bad["cu_seqlens"] = x["cu_seqlens"].clone()
    bad["cu_seqlens"][-1] -= 1
    with pytest.raises(ValueError, match="sample 'doc-7': 6 <\\|image_pad\\|> vs 7"):
        run(bb, bad, sample_ids=["a", "b", "doc-7"])
    with pytest.raises(ValueError, match="sample 'b': 0 vs 1"):
        run(bb, dict(x, images_per_sample=torch.tensor([1, 1, 1])), sample_ids=["a", "b", "c"])


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["Llava"]}))
    with pytest.raises(ValueError, match=r"'llava'.*qwen2_5_vl"):
        QwenVLBackbone.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        QwenVLBackbone.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("arch", ARCHS)
def test_training_dummy_image_and_checkpointing(ckpts, arch):
    bb = QwenVLBackbone.from_pretrained(ckpts[arch]).train()
    text_only = batch(bb, [SAMPLES[1]])
    run(bb, dict(text_only, patches=None, grid_hw=None), attention="bidirectional").hidden.sum().backward()
    assert all(p.grad is not None for p in bb.visual.parameters())  # the dummy image (§6)
    x = batch(bb, SAMPLES)
    grads = []
    for checkpointing in (False, True):
        bb.zero_grad()
        if checkpointing:
            bb.enable_gradient_checkpointing()
            assert all(m.gradient_checkpointing for m in bb.fsdp_units())
        run(bb, x, attention="bidirectional").hidden.square().mean().backward()
        grads.append([p.grad for p in bb.parameters() if p is not bb.lm_head.weight])  # head: unused
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_text_features_and_resize(ckpts):
    bb = QwenVLBackbone.from_pretrained(ckpts["qwen2_5_vl"])
    x = batch(bb, [SAMPLES[1], ["Hi there."]])
    feats = bb.text_features(x["input_ids"], x["cu_seqlens"])
    out = bb(x["input_ids"], x["cu_seqlens"])
    torch.testing.assert_close(feats, segment_mean(out.hidden, list(out.layout.lengths)), atol=1e-6, rtol=0)
    n = bb.input_embeddings.num_embeddings
    bb.tokenizer.add_tokens(["<|mask|>"], special_tokens=True)
    bb.resize_token_embeddings(len(bb.tokenizer))
    assert bb.input_embeddings.num_embeddings >= len(bb.tokenizer) > n and bb._tied()
