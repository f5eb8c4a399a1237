"""CoMP recipe end to end on tiny offline models (docs/method.md §2.1): stage chain, frozen parts,
exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cmpt.recipes import load_recipe, run_recipe
from cmpt.train.loop import Trainer
from comp_fixtures import make_tiny_setup, overrides


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))


def losses(run_dir, key="loss"):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(final_dir):
    out = {f"vision.{k}": v for k, v in load_file(final_dir / "vision" / "model.safetensors").items()}
    out |= {f"merger.{k}": v for k, v in load_file(final_dir / "merger.safetensors").items()}
    out |= {f"llm.{k}": v for k, v in load_file(final_dir / "llm" / "model.safetensors").items()}
    return out


def test_packaged_recipes_load():
    for name in ["tiny/comp_stage1", "tiny/comp_stage2", "tiny/comp_stage3"]:
        cfg, _ = load_recipe(name)
        assert cfg.recipe == "comp"
    for pair in ["siglip-so400m_qwen2.5-0.5b", "dinov2-large_qwen2.5-0.5b"]:
        s1, _ = load_recipe(f"comp/{pair}/stage1")
        s2, _ = load_recipe(f"comp/{pair}/stage2")
        s3, _ = load_recipe(f"comp/{pair}/stage3")
        assert s1.stage.trainable == ["merger"] and s1.stage.lr == {"merger": 1e-3} and not s1.stage.rope
        assert s2.stage.lr == {"vision": 1e-4, "merger": 5e-3, "llm": 2e-5, "lm_head": 2e-5} and s2.stage.rope
        assert s2.stage.resolution.max_pixels == 14 * 14 * 4 * 3000 and s2.loss.align
        assert s3.stage.lr["vision"] == 2e-5 and s3.stage.lr["llm"] == 1e-5 and not s3.loss.align
        assert s1.loss.align_weight == 0.05 and s2.model.init.endswith("stage2_pass1/final")


@pytest.mark.slow
def test_stage_chain_losses_fall_and_stage1_freezes(setup, tmp_path):
    runs = {}
    for i, name in enumerate(["tiny/comp_stage1", "tiny/comp_stage2", "tiny/comp_stage3"], start=1):
        extra = {} if i == 1 else {"model.init": runs[i - 1] / "final"}
        run_dir = tmp_path / f"s{i}"
        summary = run_recipe(name, overrides(setup, run_dir, steps=30, **extra))
        assert summary["step"] == 30 and (run_dir / "final" / "vlm_config.json").is_file()
        curve = losses(run_dir)
        assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2, f"stage {i} loss did not fall: {curve}"
        runs[i] = run_dir
    # stage I trains only the merger: ViT and LLM weights stay bit-identical to the starting point
    from cmpt import NativeViT

    start = NativeViT.from_hf(setup["vision"], keep_prefix_tokens=False).state_dict()
    after = load_file(runs[1] / "final" / "vision" / "model.safetensors")
    assert all(torch.equal(start[k], after[k]) for k in start)
    lm_start = load_file(setup["llm"] / "model.safetensors")
    lm_after = load_file(runs[1] / "final" / "llm" / "model.safetensors")
    for k, v in lm_start.items():
        if "embed_tokens" not in k and "lm_head" not in k:  # embeddings grew by the added vision tokens
            assert torch.equal(v, lm_after[k]), k
    assert (runs[3] / "final" / "vit" / "model.safetensors").is_file()  # CoMP-VFM export


def _stage2_trainer(setup, run_dir, init, stop_after_microbatches=None) -> Trainer:
    """A tiny stage-II trainer; optionally asks to stop (as SIGTERM does) after some micro-batches."""
    extra = {"train.save_every": 4, "model.init": init}
    cfg, task_cls = load_recipe("tiny/comp_stage2", overrides(setup, run_dir, 12, **extra))
    torch.manual_seed(cfg.run.seed)
    trainer = Trainer(cfg.run, cfg.optim, cfg.train, task_cls(cfg), full_config=cfg)
    if stop_after_microbatches is not None:
        compute, calls = trainer.task.compute_loss, [0]

        def counting(model, batch):
            calls[0] += 1
            if calls[0] == stop_after_microbatches:
                trainer.request_stop()
            return compute(model, batch)

        trainer.task.compute_loss = counting
    return trainer


@pytest.mark.slow
def test_resume_is_bitwise_exact(setup, tmp_path):
    """Stop mid-run (checkpoint), rerun the same command: final weights equal an uninterrupted run."""
    init = tmp_path / "s1"
    run_recipe("tiny/comp_stage1", overrides(setup, init, steps=4))
    straight = _stage2_trainer(setup, tmp_path / "straight", init / "final").fit()
    first = _stage2_trainer(setup, tmp_path / "resumed", init / "final", stop_after_microbatches=6).fit()
    assert first["stopped"] and 0 < first["step"] < 12
    second = _stage2_trainer(setup, tmp_path / "resumed", init / "final").fit()
    assert second["resumed_from"] == first["step"] and second["step"] == straight["step"] == 12
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "resumed" / "final")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_stage1_refuses_to_resume_on_an_edited_frozen_llm(setup, tmp_path):
    """Stage I checkpoints leave the frozen LLM out; the same model.llm path holding other weights
    (re-downloaded, edited in place) is refused on resume instead of silently mixing models."""
    import shutil

    from safetensors.torch import save_file

    from cmpt.train.resume import ResumeError

    llm = tmp_path / "llm"
    shutil.copytree(setup["llm"], llm)
    run_recipe("tiny/comp_stage1", overrides(setup, tmp_path / "run", 2, **{"model.llm": llm}))
    state = load_file(llm / "model.safetensors")
    name = next(k for k in state if k.endswith("layers.0.mlp.down_proj.weight"))
    state[name] = state[name] * 1.01
    save_file(state, str(llm / "model.safetensors"), metadata={"format": "pt"})
    more = {"model.llm": llm, "train.allow_change": "[train.steps]"}
    with pytest.raises(
        ResumeError, match=r"frozen parameter\(s\) differ.*layers\.0\.mlp\.down_proj.*model\.llm"
    ):
        run_recipe("tiny/comp_stage1", overrides(setup, tmp_path / "run", 3, **more))
