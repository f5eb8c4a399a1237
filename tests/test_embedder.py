"""cmpt.Embedder over a cmpt VLM (docs/method.md §3): bidirectional, mean-pooled, L2-normalized;
independent of batch order, of padding and of the other inputs; save → load equal; a pooling it does
not implement is refused."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from PIL import Image

from cmpt.embed.backbones import backbone_kind
from cmpt.embed.embedder import EMBEDDER_CONFIG, Embedder, EmbedderConfig
from cmpt.vlm.chat import encode_text_with_images
from vlm_fixtures import build_dirs, build_vlm


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return build_dirs(tmp_path_factory.mktemp("embedder"))


@pytest.fixture(scope="module")
def emb(dirs):
    return Embedder(build_vlm(dirs, "qwen2"), batch_tokens=64)


def _image(seed: int, size=(56, 28)) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    img.putpixel((3, 3), (255, 255, 255))
    return img


TEXTS = [
    "a red square",
    None,
    "the chart shows sales rising over three years",
    "<image> then <image> compared",
]
IMAGES = [None, _image(0), _image(1, (28, 56)), [_image(2), _image(3, (28, 28))]]


def test_encode_shapes_norms_and_kinds(emb):
    out = emb.encode(TEXTS, IMAGES, instructions="Represent the input.")
    assert out.shape == (4, emb.backbone.llm.config.hidden_size) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))
    assert emb.encode("a red square").shape == (1, out.shape[1])
    with pytest.raises(ValueError, match="input 1 is empty"):
        emb.encode(["x", ""])
    with pytest.raises(ValueError, match="3 entries for 4 inputs"):
        emb.encode(TEXTS, IMAGES, instructions=["a", "b", "c"])


def test_batch_order_padding_and_neighbours_change_nothing(emb):
    ref = emb.encode(TEXTS, IMAGES)
    perm = [2, 0, 3, 1]
    shuffled = emb.encode([TEXTS[i] for i in perm], [IMAGES[i] for i in perm])
    torch.testing.assert_close(shuffled, ref[perm], rtol=1e-5, atol=1e-6)
    alone = torch.cat([emb.encode([t], [im]) for t, im in zip(TEXTS, IMAGES)])
    torch.testing.assert_close(alone, ref, rtol=1e-5, atol=1e-6)
    emb.backbone.configure_packing(False)  # right-padded rows: padding must not matter
    try:
        torch.testing.assert_close(emb.encode(TEXTS, IMAGES), ref, rtol=1e-5, atol=1e-6)
    finally:
        emb.backbone.configure_packing(True)


def test_pooling_is_the_bidirectional_mean(emb):
    vlm = emb.backbone
    text = "the chart shows sales"
    ids = encode_text_with_images(text, vlm.tokenizer, [])
    with torch.no_grad():
        causal = vlm(ids, [0, len(ids)], attention="causal").hidden
        bi = vlm(ids, [0, len(ids)], attention="bidirectional").hidden
        changed = ids.clone()
        changed[-1] = (changed[-1] + 1) % 100
        bi2 = vlm(changed, [0, len(ids)], attention="bidirectional").hidden
    assert not torch.allclose(bi[0], bi2[0])  # the first token sees the last one
    assert not torch.allclose(causal.mean(0), bi.mean(0))
    expected = torch.nn.functional.normalize(bi.mean(0), dim=-1)
    torch.testing.assert_close(emb.encode(text)[0], expected, rtol=1e-5, atol=1e-6)


def test_save_load_equal_and_kind(emb, tmp_path):
    ref = emb.encode(TEXTS, IMAGES)
    emb.save_pretrained(tmp_path / "e")
    assert backbone_kind(tmp_path / "e") == "cmpt" and (tmp_path / "e" / "embedder_config.json").is_file()
    loaded = Embedder.from_pretrained(tmp_path / "e")
    assert loaded.config == emb.config
    torch.testing.assert_close(loaded.encode(TEXTS, IMAGES), ref, rtol=0, atol=0)


def test_unimplemented_pooling_is_refused(emb, tmp_path):
    """``pooling`` is saved in embedder_config.json; a value other than "mean" would be stored but
    not applied, so it is refused when built or loaded (docs/method.md §3)."""
    accepted = re.escape("accepted: ['mean']")
    with pytest.raises(ValueError, match=rf"pooling='last' is not implemented; {accepted}"):
        EmbedderConfig(pooling="last")
    with pytest.raises(ValueError, match=accepted):
        Embedder(emb.backbone, pooling="cls")
    d = emb.save_pretrained(tmp_path / "e")
    cfg_file = d / EMBEDDER_CONFIG
    assert json.loads(cfg_file.read_text())["pooling"] == "mean"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "pooling": "last"}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(cfg_file))}: pooling='last' .*{accepted}"):
        Embedder.from_pretrained(d)


def test_unsupported_architecture_is_named(dirs):
    with pytest.raises(ValueError, match=r"unsupported architecture.*LlamaForCausalLM"):
        Embedder.from_pretrained(dirs / "llama")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        Embedder.from_pretrained(dirs / "nowhere")


def test_long_text_is_cut_after_the_last_image(emb):
    long = "word " * 400
    short = Embedder(emb.backbone, max_length=32, batch_tokens=4096)
    out = short.encode([long + "<image>", long], [_image(5), None])
    assert out.shape[0] == 2 and torch.isfinite(out).all()
