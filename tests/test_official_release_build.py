"""A CoMP-VFM tower of the release as the vision part of a fresh VLM: ``build_vlm`` and CoMP's
``model.vision`` (docs/method.md §1.5), eager and as a meta skeleton."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hf_tiny
from cmpt.demo.tiny_lm import build_tiny_causal_lm, default_corpus, train_tokenizer
from cmpt.vision.official_release import load_official_vit
from cmpt.vlm.chat import ensure_vision_tokens
from cmpt.vlm.model import VisionLanguageModel
from release_fixtures import (
    GRIDS,
    LLM_H,
    TOL,
    HeadersOnly,
    max_err,
    reference_tower,
    sample_patches,
    tower_weights,
    write_vfm,
)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    tokenizer = train_tokenizer(default_corpus(300), vocab_size=400)
    ensure_vision_tokens(tokenizer)
    d = tmp_path_factory.mktemp("lm")
    build_tiny_causal_lm(tokenizer, "qwen2", hidden_size=LLM_H, seed=5).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


@pytest.mark.parametrize("family", ["siglip", "dinov2"])
def test_build_from_a_vfm_tower(tmp_path, llm_dir, family):
    """``VisionLanguageModel.build(<CoMP-VFM dir>, llm)`` (a CoMP recipe's ``model.vision``) takes the
    release's tower as ``load_official_vit`` reads it, not as an HF checkpoint (docs/method.md §1.5)."""
    d = write_vfm(tmp_path, family)
    want = load_official_vit(d).eval()
    vlm = VisionLanguageModel.build(d, llm_dir)
    c = vlm.vit.config
    assert c == want.config and (c.pos_embed_order, c.rope, c.keep_prefix_tokens) == ("official", True, False)
    assert vlm.config.vision == str(d) and vlm.merger.fc2.out_features == LLM_H
    patches, grids = sample_patches(6)
    with torch.no_grad():
        ours = vlm.vit(patches, grids)
        assert torch.equal(ours, want(patches, grids))
        assert max_err(ours, reference_tower(family, tower_weights(family), patches, GRIDS)) <= TOL
    # rope / keep_prefix_tokens are the caller's; vit_from_hf=False reads it through from_pretrained
    off = VisionLanguageModel.build(d, llm_dir, rope=False, keep_prefix_tokens=True, vit_from_hf=False)
    assert (off.vit.config.rope, off.vit.config.keep_prefix_tokens) == (False, True)
    assert off.vit.config.pos_embed_order == "official"


def test_build_from_a_vfm_tower_as_a_meta_skeleton(tmp_path, llm_dir, monkeypatch):
    """``weights=False`` (FSDP2 ranks > 0, docs/method.md §6): the tower from its config and the
    weights' headers, the LLM from its config; the same modules as the eager build, all on meta."""
    import cmpt.vision.official_release as official
    from test_meta_build import _assert_skeleton_of

    d = write_vfm(tmp_path, "dinov2")
    eager = VisionLanguageModel.build(d, llm_dir, rope=False)
    monkeypatch.setattr(official, "safe_open", HeadersOnly)
    meta = VisionLanguageModel.build(d, llm_dir, rope=False, weights=False)
    _assert_skeleton_of(meta, eager)
    assert meta.vit.config == eager.vit.config and meta.config == eager.config


def test_release_tower_by_hub_id_fetches_weights_only_for_the_release(tmp_path, monkeypatch):
    """A hub id is decided from its config first: an HF checkpoint's weights are not downloaded."""
    import shutil

    import cmpt.hub as hub
    from cmpt.hub import CONFIG_FILES
    from cmpt.vision.official_release import release_tower_dir

    full = {"org/vfm": write_vfm(tmp_path, "siglip"), "org/hf": hf_tiny.save("siglip", tmp_path)}
    fetched = []

    def snapshot(name, what="model", *, allow_patterns=None, **kw):
        fetched.append((name, allow_patterns))
        if allow_patterns != CONFIG_FILES:
            return full[name]
        configs = tmp_path / "configs" / name
        configs.mkdir(parents=True, exist_ok=True)
        shutil.copy(full[name] / "config.json", configs)
        return configs

    monkeypatch.setattr(hub, "is_hub_id", lambda name: name in full)
    monkeypatch.setattr(hub, "local_model_dir", snapshot)
    assert release_tower_dir("org/vfm") == full["org/vfm"]
    assert release_tower_dir("org/hf") is None
    assert [n for n, patterns in fetched if patterns != CONFIG_FILES] == ["org/vfm"]
    assert release_tower_dir(full["org/vfm"]) == full["org/vfm"] and release_tower_dir(full["org/hf"]) is None


@pytest.mark.parametrize("rank, meta", [(0, False), (1, True)])
def test_comp_recipe_with_a_vfm_tower_as_model_vision(tmp_path, llm_dir, monkeypatch, rank, meta):
    from cmpt.recipes import load_recipe
    from cmpt.recipes.comp import load_model

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    d = write_vfm(tmp_path, "siglip")
    sets = [f"model.vision={d}", f"model.llm={llm_dir}", "train.dist=fsdp", "stage.rope=true"]
    cfg, _ = load_recipe("tiny/comp_stage1", sets)
    vlm = load_model(cfg)
    c = vlm.vit.config
    assert (c.pos_embed_order, c.rope, c.final_norm) == ("official", True, False)
    assert c.source == "comp-release:siglip"
    assert {p.is_meta for p in vlm.parameters()} == {meta}
