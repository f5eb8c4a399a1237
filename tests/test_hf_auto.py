"""transformers' Auto classes on cmpt directories (cmpt.hf_auto): after `import cmpt`, a NativeViT,
a VLM and an Embedder directory load with AutoConfig / AutoModel and give cmpt's own outputs, bit
for bit; a Qwen-VL Embedder stays a plain transformers checkpoint that cmpt still loads. What
AutoModel.from_pretrained hands over (config fields, dtype, device_map, attn_implementation) reaches
cmpt's loader or is one clear error; save_pretrained / from_config refuse what they cannot do."""

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


@pytest.fixture(scope="module")
def emb_dir(vlm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "emb"
    cmpt.Embedder.from_pretrained(vlm_dir).save_pretrained(out)
    return out


def _vit_inputs():
    torch.manual_seed(0)
    return torch.randn(4 * 4 + 2 * 4, 3 * 14 * 14), torch.tensor([[4, 4], [2, 4]])


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


def test_embedder_over_a_cmpt_vlm(emb_dir):
    assert AutoConfig.from_pretrained(emb_dir).model_type == "cmpt_embedder"
    auto = AutoModel.from_pretrained(emb_dir)
    assert isinstance(auto, CmptEmbedderModel)
    own = cmpt.Embedder.from_pretrained(emb_dir)
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


def test_config_overrides_reach_cmpts_loader(dirs, vlm_dir):
    """transformers routes an argument naming a config field into the config it hands over: the
    field reaches cmpt's loader, or is refused by name when the loader cannot apply it."""
    patches, grid = _vit_inputs()
    rope = cmpt.NativeViT.from_pretrained(dirs / "vit", rope=True)
    cfg = AutoConfig.from_pretrained(dirs / "vit")
    cfg.rope = True
    for auto in (
        AutoModel.from_pretrained(dirs / "vit", rope=True),
        AutoModel.from_pretrained(dirs / "vit", config=cfg),
        CmptNativeViTModel.from_pretrained(dirs / "vit", rope=True),
    ):
        assert auto.vit.config.rope and auto.config.rope
        with torch.no_grad():
            assert torch.equal(auto(patches, grid), rope(patches, grid))
    with pytest.raises(ValueError, match=r"do not fit the overridden config fields \['hidden_size'\]"):
        AutoModel.from_pretrained(dirs / "vit", hidden_size=64)  # the saved weights fix it
    with pytest.raises(ValueError, match="output_hidden_states=True cannot be applied"):
        AutoModel.from_pretrained(dirs / "vit", output_hidden_states=True)
    with pytest.raises(ValueError, match=r"fields \['merge_size'\]"):
        AutoModel.from_pretrained(vlm_dir, merge_size=4)  # the merger's weights fix it
    with pytest.raises(TypeError, match="config= must be a CmptNativeViTConfig"):
        CmptNativeViTModel.from_pretrained(dirs / "vit", config=AutoConfig.from_pretrained(vlm_dir))


def test_embedder_config_overrides(emb_dir):
    auto = AutoModel.from_pretrained(emb_dir, normalize=False, max_length=4)
    own = cmpt.Embedder.from_pretrained(emb_dir)
    own = cmpt.Embedder(own.backbone, own.config, normalize=False, max_length=4)
    texts = ["a red square on a green field", "hello"]
    assert torch.equal(auto(texts), own.encode(texts))
    assert auto.embedder.config == own.config and not auto.config.normalize
    with pytest.raises(ValueError, match=r"merge_size=4 cannot be applied .*VisionLanguageModel"):
        AutoModel.from_pretrained(emb_dir, merge_size=4)  # a backbone field


def test_attn_implementation_reaches_the_language_model(dirs, vlm_dir, emb_dir):
    for impl in ("eager", "sdpa"):
        own = cmpt.VisionLanguageModel.from_pretrained(vlm_dir, llm_kwargs={"attn_implementation": impl})
        want = own.llm.config._attn_implementation
        vlm = AutoModel.from_pretrained(vlm_dir, attn_implementation=impl)
        emb = AutoModel.from_pretrained(emb_dir, attn_implementation=impl)
        assert vlm.vlm.llm.config._attn_implementation == vlm.config._attn_implementation == want
        assert emb.backbone.llm.config._attn_implementation == emb.config._attn_implementation == want
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa': a NativeViT takes .* attn="):
        AutoModel.from_pretrained(dirs / "vit", attn_implementation="sdpa")


def test_dtype_and_device_map(dirs, tmp_path):
    def dtype(model):
        return next(model.parameters()).dtype

    assert dtype(AutoModel.from_pretrained(dirs / "vit", dtype="bfloat16")) == torch.bfloat16
    assert dtype(AutoModel.from_pretrained(dirs / "vit", dtype="auto")) == torch.float32
    cmpt.NativeViT.from_pretrained(dirs / "vit").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert dtype(AutoModel.from_pretrained(tmp_path / "bf16", dtype="auto")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='bf16': pass a floating-point torch dtype"):
        CmptNativeViTModel.from_pretrained(dirs / "vit", dtype="bf16")
    for device_map in ("cpu", torch.device("cpu"), {"": "cpu"}):
        assert AutoModel.from_pretrained(dirs / "vit", device_map=device_map).device.type == "cpu"
    for device_map in ("auto", {"vit.blocks": "cpu", "vit.norm": "cpu"}):
        with pytest.raises(ValueError, match=r"device_map=.*loads whole onto one device"):
            AutoModel.from_pretrained(dirs / "vit", device_map=device_map)


def test_save_options_and_from_config_are_refused_by_name(dirs, vlm_dir, emb_dir, tmp_path):
    auto = AutoModel.from_pretrained(dirs / "vit")
    with pytest.raises(ValueError, match="hf upload"):
        auto.save_pretrained(tmp_path / "x", push_to_hub=True, repo_id="me/vit")
    with pytest.raises(ValueError, match="safetensors only"):
        auto.save_pretrained(tmp_path / "x", safe_serialization=False)
    with pytest.raises(TypeError, match="max_shard_size"):
        auto.save_pretrained(tmp_path / "x", max_shard_size="1GB")
    assert not (tmp_path / "x").exists()
    auto.save_pretrained(tmp_path / "x", safe_serialization=True)  # the one serialization cmpt writes
    assert cmpt.NativeViT.from_pretrained(tmp_path / "x").config == auto.vit.config
    for d in (vlm_dir, emb_dir):
        with pytest.raises(ValueError, match=r"config.json alone.*AutoModel.from_pretrained\(DIR\)"):
            AutoModel.from_config(AutoConfig.from_pretrained(d))


def test_an_out_of_memory_error_under_overrides_is_not_a_misfit(dirs, monkeypatch):
    """Only the load's shape errors become "do not fit the overridden fields": an out-of-memory error
    (a RuntimeError subclass) while loading with an override passes unchanged."""

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cmpt.NativeViT, "from_pretrained", oom)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        AutoModel.from_pretrained(dirs / "vit", rope=True)
