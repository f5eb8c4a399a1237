"""`cmpt eval ...` from the command line on a tiny VLM and synthetic data (docs/method.md §5)."""

from __future__ import annotations

import json

import pytest

from cmpt import NativeViT, NativeViTConfig, VisionLanguageModel
from cmpt.cli import main
from cmpt.demo.synthetic import generate_splits
from cmpt.demo.tiny_lm import build_tiny_causal_lm, default_corpus, train_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_eval")
    charts = generate_splits("charts", root / "charts", 2, 2, 3)
    scenes = generate_splits("scenes", root / "scenes", 12, 6, 1)
    tok = train_tokenizer(default_corpus(300), vocab_size=400)
    vit = NativeViT(
        NativeViTConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, pos_grid=4)
    )
    vlm = VisionLanguageModel.build(vit, build_tiny_causal_lm(tok, hidden_size=32), tok)
    vlm.save_pretrained(root / "vlm")
    return {"vlm": root / "vlm", "charts": charts["test"], "scenes": scenes["train"].parent}


def test_resolution_sweep_one_command_writes_plot(assets, tmp_path, capsys):
    sizes = "56*56,112*112,224*224"
    args = ["eval", "resolution", "--model", str(assets["vlm"]), "--data", str(assets["charts"])]
    assert main([*args, "--max-pixels", sizes, "--out", str(tmp_path), "--limit", "2"]) == 0
    assert (tmp_path / "resolution_sweep.png").stat().st_size > 0
    points = json.loads((tmp_path / "resolution_sweep.json").read_text())["points"]
    assert len(points) == 3


def test_vqa_and_probe_commands(assets, tmp_path, capsys):
    vqa = ["eval", "vqa", "--model", str(assets["vlm"]), "--data", str(assets["charts"]), "--limit", "2"]
    assert main([*vqa, "--out", str(tmp_path / "vqa")]) == 0
    assert (tmp_path / "vqa" / "predictions.jsonl").is_file()
    vit_dir = tmp_path / "vit"
    VisionLanguageModel.from_pretrained(assets["vlm"]).export_vit(vit_dir)
    out = tmp_path / "probe.json"
    assert (
        main(["eval", "probe", "--model", str(vit_dir), "--data", str(assets["scenes"]), "--out", str(out)])
        == 0
    )
    res = json.loads(out.read_text())
    assert 0.0 <= res["top1"] <= 1.0 and res["n_val"] == 6
