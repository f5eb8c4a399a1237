"""The CoMP release's own checkpoints (docs/method.md §1.5): tiny CoMP-VFM towers and a CoMP-MM VLM
written in the release's layout (``release_fixtures``) load, give the release's outputs (its reference
forward, re-implemented independently of cmpt) and train on."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import hf_tiny
from cmpt.demo.tiny_lm import default_corpus, train_tokenizer
from cmpt.recipes.comp import LossConfig
from cmpt.recipes.comp_objective import CompObjective
from cmpt.vision.official_release import detect_official_layout, load_official_vit
from cmpt.vision.vit import NativeViT
from cmpt.vlm.chat import ensure_vision_tokens
from cmpt.vlm.model import VisionLanguageModel
from cmpt.vlm.official_release import convert_official, load_official_vlm
from release_fixtures import (
    FFN,
    GRIDS,
    STD,
    TOL,
    D,
    HeadersOnly,
    max_err,
    merger_weights,
    reference_merger,
    reference_tower,
    sample_patches,
    tower_config,
    tower_weights,
    write_vfm,
    write_vlm,
)
from vlm_fixtures import TWO, make_batch


@pytest.mark.parametrize("family,nested", [("siglip", True), ("siglip", False), ("dinov2", False)])
def test_vfm_tower_gives_the_release_outputs(tmp_path, family, nested):
    d = write_vfm(tmp_path, family, nested=nested)
    assert detect_official_layout(d) == "vit"
    vit = load_official_vit(d).eval()
    c = vit.config
    assert (c.pos_embed_order, c.rope, c.merge_size, c.keep_prefix_tokens) == ("official", True, 2, False)
    assert c.final_norm is (family == "dinov2") and c.cls_token is False
    assert list(c.image_std) == STD[family]
    patches, grids = sample_patches()
    with torch.no_grad():
        ours = vit(patches, grids)
        ref = reference_tower(family, tower_weights(family), patches, GRIDS)
        assert max_err(ours, ref) <= TOL
        c.pos_embed_order = "window"  # cmpt's default order is another model: the test tells them apart
        assert max_err(vit(patches, grids), ref) > 1e-3
    direct = NativeViT.from_pretrained(d).eval()  # from_pretrained reads the release's directory itself
    assert direct.config.pos_embed_order == "official"
    with torch.no_grad():
        assert max_err(direct(patches, grids), ref) <= TOL
    # `cmpt convert official` writes a NativeViT directory that reloads as the same model
    kind, out = convert_official(d, tmp_path / "converted")
    again = NativeViT.from_pretrained(out)
    assert kind == "vit" and again.config.pos_embed_order == "official"
    with torch.no_grad():
        assert max_err(again(patches, grids), ref) <= TOL


def test_vfm_rope_follows_use_rope(tmp_path):
    d = write_vfm(tmp_path, "dinov2", use_rope=False)
    vit = load_official_vit(d, rope=None).eval()  # None keeps the checkpoint's setting
    assert vit.config.rope is False and load_official_vit(d, rope=True).config.rope is True
    patches, grids = sample_patches(4)
    with torch.no_grad():
        ref = reference_tower("dinov2", tower_weights("dinov2"), patches, GRIDS, use_rope=False)
        assert max_err(vit(patches, grids), ref) <= TOL


def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    d = write_vfm(tmp_path, "siglip")
    one = load_official_vit(d).state_dict()
    weights = tower_weights("siglip")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(d / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "model.safetensors").unlink()
    sharded = load_official_vit(d).state_dict()
    assert sharded.keys() == one.keys() and all(torch.equal(sharded[k], one[k]) for k in one)


def test_other_layouts_are_not_taken_for_the_release(tmp_path):
    hf = hf_tiny.save("siglip", tmp_path)  # HF's own SigLIP (post_layernorm, head): not the release
    assert detect_official_layout(hf) is None
    with pytest.raises(ValueError, match=r"NativeViT\.from_hf"):
        load_official_vit(hf)
    with pytest.raises(ValueError, match="not a checkpoint of the CoMP release"):
        convert_official(hf, tmp_path / "x")
    assert detect_official_layout(tmp_path / "nothing") is None
    qwen2vl = tmp_path / "qwen2-vl"  # Qwen2-VL's own layout (its tower under visual. is no CoMP tower)
    qwen2vl.mkdir()
    weights = {
        "model.embed_tokens.weight": torch.zeros(2, 2),
        "visual.blocks.0.attn.qkv.weight": torch.ones(2),
    }
    save_file(weights, str(qwen2vl / "model.safetensors"))
    (qwen2vl / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"]}))
    assert detect_official_layout(qwen2vl) is None


def test_unknown_weights_and_wrong_configs_are_named(tmp_path):
    d = write_vfm(tmp_path, "siglip")
    extra = {**tower_weights("siglip"), "vision_model.head.probe": torch.zeros(1, 1, D)}
    save_file(extra, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"not part of the CoMP siglip tower.*head\.probe"):
        load_official_vit(d)
    save_file(tower_weights("siglip"), str(d / "model.safetensors"))
    cfg = tower_config("siglip")
    cfg["vision_config"]["intermediate_size"] = 2 * FFN
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match the tower's config"):
        load_official_vit(d)
    (d / "config.json").write_text(json.dumps(tower_config("dinov2")))
    with pytest.raises(ValueError, match=r"model_type 'dinov2'.*CoMP siglip tower"):
        load_official_vit(d)


def test_vfm_rope_none_keeps_use_rope(tmp_path):
    """``rope=None`` (``cmpt encode``'s default, ``NativeViT.from_pretrained(d, rope=None)``) keeps the
    tower's ``use_rope``, as it does for every other loader."""
    d = write_vfm(tmp_path, "siglip", use_rope=True)
    assert load_official_vit(d, rope=None).config.rope is True
    assert NativeViT.from_pretrained(d, rope=None).config.rope is True


# ---------------------------------------------------------------- CoMP-MM VLM


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(default_corpus(300), vocab_size=400)
    ensure_vision_tokens(tok)  # Qwen2.5's tokenizer carries the vision tokens
    return tok


@pytest.mark.parametrize("family,tied", [("siglip", True), ("dinov2", False)])
def test_vlm_loads_with_the_release_lm_and_tower(tmp_path, tokenizer, family, tied):
    tower_dir = tmp_path / "tower"  # custom_visual_model: the tower's own config, here a local directory
    tower_dir.mkdir()
    (tower_dir / "config.json").write_text(json.dumps(tower_config(family)))
    d, lm = write_vlm(tmp_path, family, tokenizer, tied, tower_ref=str(tower_dir))
    lm.config.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0}
    ref_lm = type(lm)(lm.config).eval()  # the tiny transformers LM with the same weights and rope_theta
    ref_lm.load_state_dict(lm.state_dict())
    assert detect_official_layout(d) == "vlm"
    vlm = VisionLanguageModel.from_pretrained(d)  # the release's directory itself (load_official_vlm)
    assert vlm.vit.config.pos_embed_order == "official" and vlm.vit.config.rope is True
    assert vlm.processor.max_pixels == 14 * 14 * 4 * 3000 and list(vlm.processor.std) == STD[family]
    assert vlm.config.image_pad_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (vlm.lm_head.weight is vlm.input_embeddings.weight) is tied

    ids = torch.tensor(tokenizer("the chart shows red bars and a blue line")["input_ids"])
    with torch.no_grad():
        ours = vlm.lm_head(vlm(ids, torch.tensor([0, len(ids)])).hidden)
        ref = ref_lm(ids[None]).logits[0]
        assert max_err(ours, ref) <= TOL
        patches, grids = sample_patches(5)
        w = {**tower_weights(family), **merger_weights()}
        merged = reference_merger(w, reference_tower(family, w, patches, GRIDS))
        assert max_err(vlm.encode_images(patches, grids), merged) <= TOL


def test_vlm_trains_on_and_converts(tmp_path, tokenizer):
    tower = tmp_path / "tower.json"
    tower.write_text(json.dumps(tower_config("siglip")))
    d, _ = write_vlm(tmp_path, "siglip", tokenizer, tied=True)  # a hub id not in the cache
    with pytest.raises(FileNotFoundError, match=r"hf download SliMM-X/CoMP-Tiny-Tower.*--vision-config"):
        load_official_vlm(d)
    kind, out = convert_official(d, tmp_path / "cmpt-vlm", vision_config=tower)
    assert kind == "vlm"
    vlm = VisionLanguageModel.from_pretrained(out)  # a normal cmpt VLM directory (model.init of a stage)
    assert vlm.vit.config.pos_embed_order == "official"
    direct = load_official_vlm(d, vision_config=tower)
    batch = make_batch(vlm, TWO)
    with torch.no_grad():
        assert (
            max_err(
                vlm.encode_images(batch["patches"], batch["grid_hw"]),
                direct.encode_images(batch["patches"], batch["grid_hw"]),
            )
            == 0
        )

    objective = CompObjective(vlm.train(), LossConfig(align=True))
    before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    opt = torch.optim.AdamW(vlm.parameters(), lr=1e-3)
    out = objective(batch)
    loss = out["lm_sum"] / out["lm_count"] + 0.05 * out["align_sum"] / out["align_count"]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    moved = {n.split(".")[0] for n, p in vlm.named_parameters() if not torch.equal(p, before[n])}
    assert {"vit", "merger", "llm"} <= moved


def test_cli_convert_official(tmp_path, capsys):
    from cmpt.cli import main

    d = write_vfm(tmp_path, "dinov2")
    assert main(["convert", "official", str(d), str(tmp_path / "out")]) == 0
    assert "pos_embed_order: official" in capsys.readouterr().out
    assert NativeViT.from_pretrained(tmp_path / "out").config.pos_embed_order == "official"
    assert main(["convert", "official", str(tmp_path / "out"), str(tmp_path / "again")]) == 2  # cmpt's own
    assert "not a checkpoint of the CoMP release" in capsys.readouterr().err


def test_release_layouts_build_as_meta_skeletons(tmp_path, tokenizer, monkeypatch):
    """FSDP2 ranks > 0 (docs/method.md §6): the release's directories give the same modules on the
    meta device, read from configs and the weights' headers only."""
    import cmpt.vision.official_release as official
    from test_meta_build import _assert_skeleton_of

    vfm = write_vfm(tmp_path / "vfm", "siglip")
    tower = tmp_path / "tower.json"
    tower.write_text(json.dumps(tower_config("dinov2")))
    vlm_dir, _ = write_vlm(tmp_path / "vlm", "dinov2", tokenizer, tied=False)
    eager_vit = NativeViT.from_pretrained(vfm)
    eager_vlm = load_official_vlm(vlm_dir, vision_config=tower)
    monkeypatch.setattr(official, "safe_open", HeadersOnly)
    with pytest.raises(AssertionError, match="read the tensor"):  # the guard is real
        NativeViT.from_pretrained(vfm)
    _assert_skeleton_of(NativeViT.from_pretrained(vfm, weights=False), eager_vit)
    meta = load_official_vlm(vlm_dir, vision_config=tower, weights=False)
    _assert_skeleton_of(meta, eager_vlm)
    assert meta.vit.config == eager_vlm.vit.config and meta.config == eager_vlm.config


# ---------------------------------------------------------------- a CoMP-VFM tower as model.vision
