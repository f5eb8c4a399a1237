"""The tiny MoCa corpus (docs/method.md §3): documents + passages, train/val mixtures, cached."""

from __future__ import annotations

import json

from cmpt.cli import main
from cmpt.data.open import open_source
from cmpt.demo.moca_data import prepare_moca_data


def test_prepare_builds_once_and_mixes_both_kinds(tmp_path, capsys):
    paths = prepare_moca_data(tmp_path, quick=True)
    assert paths["train"] == tmp_path / "tiny-quick" / "moca" / "train.yaml"
    train = [open_source(paths["train"])[i] for i in range(len(open_source(paths["train"])))]
    assert len(train) == 80 and all(r.text for r in train)
    with_images = [r for r in train if r.images]
    assert 0 < len(with_images) < len(train)  # interleaved documents and text-only passages
    val_ids = {open_source(paths["val"])[i].id for i in range(len(open_source(paths["val"])))}
    assert val_ids and not val_ids & {r.id for r in train}
    capsys.readouterr()
    assert prepare_moca_data(tmp_path, quick=True) == paths
    assert "cached" in capsys.readouterr().out


def test_synth_moca_kind_passes_the_checker(tmp_path, capsys):
    assert main(["data", "synth", "--kind", "moca", "--n", "6", "--out", str(tmp_path / "c")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sizes"] == {"documents": [6, 1], "passages": [6, 1]}
    assert main(["data", "check", str(tmp_path / "c" / "train.yaml")]) == 0
    assert "12 records, 0 bad" in capsys.readouterr().out


def test_packaged_moca_recipes_carry_the_official_hyperparameters():
    from cmpt.recipes import load_recipe

    cpt, _ = load_recipe("moca/qwen2.5-vl-3b/cpt")
    assert (cpt.optim.lr, cpt.optim.warmup_ratio, cpt.optim.clip_grad, cpt.train.grad_accum) == (
        2e-6,
        0.1,
        5.0,
        4,
    )
    assert cpt.data.max_text_tokens == 1280 and cpt.train.precision == "bf16"
    assert (cpt.stage.resolution.min_pixels, cpt.stage.resolution.max_pixels) == (
        256 * 28 * 28,
        1024 * 28 * 28,
    )
    assert (cpt.loss.mlm_prob, cpt.loss.mae_prob, cpt.loss.mae_weight) == (0.4, 0.5, 0.1)
    cl, _ = load_recipe("moca/qwen2.5-vl-3b/cl")
    assert (cl.stage.name, cl.optim.lr, cl.stage.batch_size, cl.optim.warmup_ratio) == ("cl", 2e-5, 24, 0.05)
    assert (cl.loss.temperature, cl.loss.num_hard_negatives, cl.data.max_text_tokens) == (0.03, 2, 1280)
    assert cpt.optim.schedule == cl.optim.schedule == "linear"  # --lr_scheduler_type linear in both scripts
    assert "lm_head" not in cl.stage.trainable  # the contrastive loss never reads it (DDP)
    for name in ("tiny/moca_cpt", "tiny/moca_cl"):
        cfg, _ = load_recipe(name)
        assert cfg.recipe == "moca"
