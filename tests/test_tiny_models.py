"""Tiny "pretrained" starting points (cmpt.demo.tiny_models.prepare_tiny), built with the quick sizes."""

from __future__ import annotations

import json
import time

import pytest
import torch
import yaml

from cmpt.demo.tiny_models import MARKER, QUICK, _build_cached, prepare_tiny

pytestmark = pytest.mark.slow  # trains the tiny starting points and runs the demo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, prepare_tiny(cache, quick=True)


def test_layout_is_where_the_tiny_recipes_look(tiny):
    from cmpt.recipes import load_recipe

    cache, paths = tiny
    root = cache / "tiny-quick"
    assert paths["root"] == root
    assert paths["vision"] == root / "vit-hf" and paths["llm"] == root / "lm"
    assert paths["data"] == root / "data" / "train.json" and paths["data"].is_file()
    cfg, _ = load_recipe("tiny/comp_stage1")
    assert cfg.model.vision.endswith("tiny/vit-hf") and cfg.model.llm.endswith("tiny/lm")
    assert cfg.data.path.endswith("tiny/data/train.json")
    for key in ("data_test", "scenes_train", "scenes_val", "scenes_test", "scenes_seg_train"):
        assert paths[key].is_file(), key


def test_vit_is_a_fixed_resolution_hf_dinov2_that_learned(tiny):
    from transformers import Dinov2Model

    from cmpt import NativeViT

    _, paths = tiny
    stats = json.loads(paths["vision_stats"].read_text())
    assert stats["resolution"] == QUICK.vit_size
    assert stats["val_accuracy"] > stats["chance_accuracy"] + 0.05, stats
    assert stats["val"]["colour"] > stats["chance"]["colour"] + 0.05, stats
    pre = json.loads((paths["vision"] / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": QUICK.vit_size, "width": QUICK.vit_size}

    vit = NativeViT.from_hf(paths["vision"])  # the conversion path CoMP stage I uses
    assert vit.config.pos_grid == QUICK.vit_size // 14 and vit.config.source == "hf:dinov2"
    hf = Dinov2Model.from_pretrained(paths["vision"]).eval()
    x = torch.randn(1, 3, QUICK.vit_size, QUICK.vit_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state[0]
        ours = vit.eval().forward_images([x[0]])[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_lm_is_an_hf_causal_lm_that_speaks_the_domain(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, paths = tiny
    tok = AutoTokenizer.from_pretrained(paths["llm"])
    lm = AutoModelForCausalLM.from_pretrained(paths["llm"])
    assert lm.get_input_embeddings().num_embeddings == len(tok)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    stats = json.loads(paths["lm_stats"].read_text())
    assert stats["held_out_loss"] < stats["held_out_loss_before"] - 0.3, stats


def test_pretraining_ran_through_the_trainer(tiny):
    """Both models come out of cmpt.train.Trainer runs (its schedule, its logs), not a loop of their own."""
    _, paths = tiny
    parts = (("vision", QUICK.vit_steps, "final_loss"), ("llm", QUICK.lm_steps, "final_train_loss"))
    for part, steps, final_key in parts:
        run = paths[part] / "pretrain"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["train"]["steps"] == steps and cfg["optim"]["schedule"] == "cosine", part
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert recs[-1]["step"] == steps and recs[-1]["loss"] < recs[0]["loss"], part
        stats = json.loads(paths["vision_stats" if part == "vision" else "lm_stats"].read_text())
        assert stats[final_key] < recs[0]["loss"], part  # the trainer's last step
        assert not (run / "checkpoints").exists() and not (paths[part] / "final").exists(), part


def test_data_mixture_and_held_out_splits(tiny):
    _, paths = tiny
    train = json.loads(paths["data"].read_text())
    kinds = {r["meta"]["kind"] for r in train}
    assert kinds == {"charts", "docs", "scenes"}
    assert all((paths["data"].parent / r["image"]).is_file() for r in train)
    test = json.loads(paths["data_test"].read_text())
    assert [r["meta"]["kind"] for r in test[:2]] == ["charts", "docs"]  # interleaved: limits mix kinds
    train_seeds = {r["meta"]["seed"] for r in train}
    assert not train_seeds & {r["meta"]["seed"] for r in test}  # separate seed streams
    scenes = json.loads(paths["scenes_val"].read_text())
    assert all(r["meta"]["num_shapes"] == len(r["meta"]["shapes"]) for r in scenes)


def test_second_call_reuses_the_cache(tiny):
    cache, paths = tiny
    watched = [
        paths["vision"] / "model.safetensors",
        paths["llm"] / "model.safetensors",
        paths["data"],
        paths["vision"] / MARKER,
    ]
    before = [p.stat().st_mtime_ns for p in watched]
    t = time.perf_counter()
    again = prepare_tiny(cache, quick=True)
    assert time.perf_counter() - t < 10.0
    assert again == paths
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_build_cached_rebuilds_incomplete_or_changed(tmp_path):
    calls = []

    def build(d):
        calls.append(d)
        (d / "x.txt").write_text("x")
        return {"n": len(calls)}

    target = tmp_path / "part"
    assert _build_cached(target, {"a": 1}, build, "part")["n"] == 1
    assert _build_cached(target, {"a": 1}, build, "part")["n"] == 1  # cached
    assert _build_cached(target, {"a": 2}, build, "part")["n"] == 2  # settings changed
    (target / MARKER).unlink()  # an interrupted build has no marker
    assert _build_cached(target, {"a": 2}, build, "part")["n"] == 3
    assert (target / "x.txt").is_file() and not list(tmp_path.glob("part.tmp-*"))
