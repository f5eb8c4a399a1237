"""transformers' Auto classes on cmpt directories (cmpt.hf_auto): after `import cmpt`, a NativeViT,
a VLM and an Embedder directory load with AutoConfig / AutoModel and give cmpt's own outputs, bit
for bit; a Qwen-VL Embedder stays a plain transformers checkpoint that cmpt still loads."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel

import cmpt
from cmpt.hf_auto import CmptEmbedderModel, CmptNativeViTModel, CmptVLMModel, register_auto_classes
from vlm_fixtures import THREE, build_dirs, build_vlm, make_batch


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return build_dirs(tmp_path_factory.mktemp("hf_auto"))


@pytest.fixture(scope="module")
def vlm_dir(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm") / "vlm"
    build_vlm(dirs).save_pretrained(out)
    return out


def _vlm_forward(model, batch):
    keys = ("patches", "grid_hw", "images_per_sample")
    with torch.no_grad():
        return model(batch["input_ids"], batch["cu_seqlens"], **{k: batch[k] for k in keys}).hidden


def test_registration_is_idempotent():
    assert register_auto_classes() and register_auto_classes()  # `import cmpt` already did it once


def test_native_vit(dirs, tmp_path):
    cfg = AutoConfig.from_pretrained(dirs / "vit")
    assert cfg.model_type == "cmpt_native_vit" and cfg.hidden_size == 32
    auto = AutoModel.from_pretrained(dirs / "vit")
    assert isinstance(auto, CmptNativeViTModel)
    own = cmpt.NativeViT.from_pretrained(dirs / "vit")
    torch.manual_seed(0)
    patches, grid = torch.randn(4 * 4 + 2 * 4, 3 * 14 * 14), torch.tensor([[4, 4], [2, 4]])
    with torch.no_grad():
        assert torch.equal(auto(patches, grid), own(patches, grid))
    auto.save_pretrained(tmp_path / "again")  # writes a cmpt NativeViT directory
    again = cmpt.NativeViT.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(patches, grid), own(patches, grid))
    fresh = AutoModel.from_config(cfg)  # the architecture alone, from the config
    assert isinstance(fresh, CmptNativeViTModel) and fresh.vit.config == own.config


def test_vlm(vlm_dir):
    raw = json.loads((vlm_dir / "config.json").read_text())
    assert raw["model_type"] == "cmpt_vlm" and raw["architectures"] == ["CmptVLMModel"]
    cfg = AutoConfig.from_pretrained(vlm_dir)
    assert cfg.model_type == "cmpt_vlm" and cfg.merge_size == 2
    auto = AutoModel.from_pretrained(vlm_dir)
    assert isinstance(auto, CmptVLMModel)
    own = cmpt.VisionLanguageModel.from_pretrained(vlm_dir)
    batch = make_batch(own, THREE, seed=3)
    assert torch.equal(_vlm_forward(auto, batch), _vlm_forward(own, batch))
    with pytest.raises(TypeError, match="unsupported arguments"):
        AutoModel.from_pretrained(vlm_dir, offload_folder="x")


def test_embedder_over_a_cmpt_vlm(vlm_dir, tmp_path):
    cmpt.Embedder.from_pretrained(vlm_dir).save_pretrained(tmp_path / "emb")
    assert AutoConfig.from_pretrained(tmp_path / "emb").model_type == "cmpt_embedder"
    auto = AutoModel.from_pretrained(tmp_path / "emb")
    assert isinstance(auto, CmptEmbedderModel)
    own = cmpt.Embedder.from_pretrained(tmp_path / "emb")
    texts = ["a red square", None, "<image> and <image>"]
    images = [None, Image.new("RGB", (56, 28), (200, 10, 10)), [Image.new("RGB", (28, 28), (0, 90, 0))] * 2]
    assert torch.equal(auto(texts, images), own.encode(texts, images))


def test_qwen_vl_embedder_stays_a_transformers_checkpoint(tmp_path):
    from test_qwen_vl_backbone import build_checkpoint

    src = build_checkpoint("qwen2_5_vl", tmp_path / "qwen")
    emb = cmpt.Embedder.from_pretrained(src)
    emb.save_pretrained(tmp_path / "emb")
    assert json.loads((tmp_path / "emb" / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    assert AutoConfig.from_pretrained(tmp_path / "emb").model_type == "qwen2_5_vl"
    assert (tmp_path / "emb" / "README.md").is_file()
    again = cmpt.Embedder.from_pretrained(tmp_path / "emb")
    texts = ["a chart of sales", "<image> a picture"]
    images = [None, Image.new("RGB", (56, 56), (10, 20, 200))]
    assert torch.equal(again.encode(texts, images), emb.encode(texts, images))
