"""Model cards (cmpt.model_card): every saved / exported directory carries a README.md whose YAML
front matter parses and whose fields name the kind, the base models, the run (recipe, stage, start,
steps, data) and the run's evaluation results."""

from __future__ import annotations

import json
import warnings

import pytest
import yaml

import cmpt
from cmpt.config import to_dict
from cmpt.model_card import RunFacts, write_model_card
from cmpt.recipes import load_recipe
from vlm_fixtures import build_dirs, build_vlm


def card(directory) -> tuple[dict, str]:
    text = (directory / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return build_vlm(build_dirs(tmp_path_factory.mktemp("card")))


def test_saved_outside_a_run(vlm, tmp_path):
    vlm.save_pretrained(tmp_path / "vlm")
    meta, body = card(tmp_path / "vlm")
    assert meta["library_name"] == "cmpt" and meta["pipeline_tag"] == "image-text-to-text"
    assert "cmpt" in meta["tags"] and "base_model" not in meta  # local paths are no hub ids
    assert "not known (saved outside a cmpt training run)" in body
    assert 'cmpt.VisionLanguageModel.from_pretrained("REPO")' in body
    assert not (tmp_path / "vlm" / "vision" / "README.md").exists()  # one card per directory
    vlm.export_vit(tmp_path / "vfm")
    meta, _ = card(tmp_path / "vfm")
    assert meta["pipeline_tag"] == "image-feature-extraction"
    cmpt.Embedder(vlm).save_pretrained(tmp_path / "emb")
    meta, body = card(tmp_path / "emb")
    assert meta["pipeline_tag"] == "feature-extraction" and "cmpt.Embedder.from_pretrained" in body


def test_hub_base_models_and_run_facts(vlm, tmp_path):
    run = tmp_path / "run"
    cfg, _ = load_recipe("tiny/comp_stage1", ["model.vision=google/siglip-base-patch16-224", "train.steps=7"])
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (run / "eval" / "embed").mkdir(parents=True)
    scores = {"model": "final", "mmeb_mean_precision_at_1": 0.25, "pages_mean_ndcg_at_5": 0.5}
    (run / "eval" / "embed" / "embed_results.json").write_text(json.dumps(scores))
    sweep = {"metric": "relaxed", "points": [{"max_pixels": 3136, "score": 0.125, "metric": "relaxed"}]}
    (run / "eval" / "resolution_sweep.json").write_text(json.dumps(sweep))
    vlm.config.llm = "Qwen/Qwen2.5-0.5B"
    try:
        vlm.save_pretrained(tmp_path / "vlm")
    finally:
        vlm.config.llm = ""
    write_model_card(tmp_path / "vlm", RunFacts(run, step=3, checkpoint=str(run / "checkpoints/step_000003")))
    meta, body = card(tmp_path / "vlm")
    assert meta["base_model"] == ["google/siglip-base-patch16-224", "Qwen/Qwen2.5-0.5B"]
    assert "comp" in meta["tags"]
    assert "| recipe | `comp`, stage `stage1` |" in body
    assert "| steps | 3 of 7 (checkpoint `step_000003`) |" in body
    assert "vision `google/siglip-base-patch16-224`" in body and "| trainable parts | merger |" in body
    assert f"| data | {cfg.data.path} |" in body
    assert "| `eval/embed/embed_results.json` | MMEB mean P@1 | 0.2500 | final |" in body
    assert "| page retrieval nDCG@5 | 0.5000 |" in body
    assert "VQA relaxed at max_pixels 3136 | 0.1250 |" in body


@pytest.mark.slow
def test_final_export_and_vfm_of_a_run(tmp_path):
    """A real tiny CoMP run: final/ and final/vit carry cards; `cmpt eval` results and a mid-run
    `cmpt export` show in the exported card; `cmpt export --vfm-only` of final/ keeps the run."""
    from cmpt.cli import main
    from cmpt.recipes import run_recipe
    from comp_fixtures import make_tiny_setup, overrides

    setup = make_tiny_setup(tmp_path / "tiny")
    run = tmp_path / "s1"
    run_recipe("tiny/comp_stage1", overrides(setup, run, steps=2, **{"train.save_every": 1}))
    for d in (run / "final", run / "final" / "vit"):
        meta, body = card(d)
        assert "| recipe | `comp`, stage `stage1` |" in body and "| steps | 2 of 2 |" in body
        assert f"| data | {setup['data']} |" in body and "| run | `s1` |" in body
    eval_args = ["eval", "vqa", "--model", str(run / "final"), "--data", str(setup["data"]), "--limit", "2"]
    assert main([*eval_args, "--out", str(run / "eval" / "vqa")]) == 0
    with warnings.catch_warnings(record=True) as caught:  # DCP's single-process warning is silenced
        warnings.simplefilter("always")
        assert main(["export", str(run / "checkpoints" / "step_000001"), "--out", str(tmp_path / "x")]) == 0
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]
    for d in (tmp_path / "x", tmp_path / "x" / "vit"):
        _, body = card(d)
        assert "| steps | 1 of 2 (checkpoint `step_000001`) |" in body
        assert "| `eval/vqa/vqa_results.json` | VQA " in body
    assert main(["export", str(run / "final"), "--vfm-only", "--out", str(tmp_path / "vfm")]) == 0
    meta, body = card(tmp_path / "vfm")
    assert meta["pipeline_tag"] == "image-feature-extraction" and "| steps | 2 of 2 |" in body
