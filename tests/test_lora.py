"""LoRA / DoRA on the LLM of a MoCa stage (docs/method.md §3 "Stage 2"): only adapters train, and the
merged, saved model gives the same embeddings as the adapted one (a wrong merged checkpoint is a
known failure of the anchors)."""

from __future__ import annotations

import pytest
import torch

from cmpt.embed.embedder import Embedder
from cmpt.recipes import load_recipe
from vlm_fixtures import build_dirs, build_vlm

pytest.importorskip("peft", reason="LoRA/DoRA needs the optional peft package (cmpt[lora])")

TEXTS = ["a red square above a blue dot", "the chart shows sales rising"]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    build_vlm(build_dirs(root / "m"), "qwen2").save_pretrained(root / "vlm")
    return root / "vlm"


@pytest.mark.parametrize("dora", [False, True])
def test_only_adapters_train_and_the_merged_model_is_the_same(vlm_dir, tmp_path, dora):
    sets = [f"model.init={vlm_dir}", "model.lora_r=4", f"model.dora={str(dora).lower()}", "data.path=unused"]
    cfg, task_cls = load_recipe("tiny/moca_cl", sets)
    task = task_cls(cfg)
    body = task.backbone.body
    lora = [n for n, p in body.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    groups = {g["name"]: g["params"] for g in task.param_groups()}
    assert {id(p) for p in groups["llm"]} == {id(p) for n, p in body.named_parameters() if "lora_" in n}
    assert groups["vision"] and groups["merger"]  # the vision side still trains in full
    with torch.no_grad():  # a trained adapter: B ≠ 0 (it starts at 0, i.e. as the base model)
        for name, p in body.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    adapted = Embedder(task.backbone).encode(TEXTS)
    task.save_final(task.model, tmp_path / "final")
    assert not any("lora" in n for n, _ in body.named_parameters())  # merged and removed
    loaded = Embedder.from_pretrained(tmp_path / "final")
    assert not any("lora" in n for n, _ in loaded.backbone.named_parameters())
    torch.testing.assert_close(loaded.encode(TEXTS), adapted, rtol=1e-4, atol=1e-5)
