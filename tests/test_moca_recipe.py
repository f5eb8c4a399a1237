"""MoCa stage 1 (recipe `moca`, `tiny/moca_cpt`) through the generic trainer (docs/method.md §3):
the loss falls on both backbone kinds (a cmpt VLM and a Hugging Face Qwen2-VL), the output is an
Embedder directory (`cmpt export` too), resume after a stop is bitwise, and 2 ranks (DDP, FSDP2)
equal one rank with the same global batch."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmpt.cli import main as cli_main
from cmpt.demo.synth_documents import generate_documents, generate_passages
from cmpt.embed.embedder import Embedder
from cmpt.recipes import load_recipe, run_recipe
from cmpt.train.loop import Trainer
from test_comp_dist import _free_port
from test_comp_recipe import losses, weights
from test_qwen_vl_backbone import build_checkpoint
from vlm_fixtures import build_dirs, build_vlm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moca_recipe")
    build_vlm(build_dirs(root / "models"), "qwen2").save_pretrained(root / "vlm")
    docs = generate_documents(16, root / "data" / "documents", seed=0, max_side=112)
    passages = generate_passages(16, root / "data" / "passages", seed=0)
    mix = root / "data" / "train.yaml"
    mix.write_text(json.dumps({"datasets": [{"path": str(docs)}, {"path": str(passages)}]}))
    return {"cmpt": root / "vlm", "qwen_vl": build_checkpoint("qwen2_vl", root / "qwen2vl"), "data": mix}


def _sets(setup, run_dir: Path, init: str, steps: int, **extra) -> list[str]:
    items = {
        "run.dir": run_dir,
        "model.init": setup[init],
        "data.path": setup["data"],
        "data.vision_budget": 96,
        "data.text_budget": 768,
        "data.max_text_tokens": 384,
        "stage.resolution.min_pixels": 28 * 28,
        "stage.resolution.max_pixels": 112 * 112,
        "optim.lr": 1e-3,
        "optim.warmup_ratio": 0.0,
        "train.steps": steps,
        "train.log_every": 1,
        "train.progress": False,
        "train.tensorboard": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


@pytest.mark.parametrize("init", ["cmpt", "qwen_vl"])
def test_cpt_loss_falls_and_writes_an_embedder(setup, tmp_path, init):
    run_recipe("tiny/moca_cpt", _sets(setup, tmp_path / "run", init, 24))
    curve = losses(tmp_path / "run")
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4, curve
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/mlm" in r for r in records) and sum("loss/mae" in r for r in records) > 0
    final = tmp_path / "run" / "final"
    assert (final / "embedder_config.json").is_file()
    emb = Embedder.from_pretrained(final)
    assert emb.encode(["a chart"], instructions="Represent the text.").shape[0] == 1
    assert cli_main(["export", str(final), "--out", str(tmp_path / "exported")]) == 0
    again = Embedder.from_pretrained(tmp_path / "exported")
    torch.testing.assert_close(again.encode(["a chart"]), emb.encode(["a chart"]), rtol=0, atol=0)


def _trainer(setup, run_dir, stop_after_microbatches=None) -> Trainer:
    cfg, task_cls = load_recipe("tiny/moca_cpt", _sets(setup, run_dir, "cmpt", 8, **{"train.save_every": 3}))
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


def test_resume_is_bitwise_exact(setup, tmp_path):
    straight = _trainer(setup, tmp_path / "straight").fit()
    first = _trainer(setup, tmp_path / "resumed", stop_after_microbatches=4).fit()
    assert first["stopped"] and 0 < first["step"] < 8
    second = _trainer(setup, tmp_path / "resumed").fit()
    assert second["resumed_from"] == first["step"] and second["step"] == straight["step"] == 8
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "resumed" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def dist_runs(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("moca_dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_recipe("tiny/moca_cpt", _sets(setup, root / "single", "cmpt", 4, **{"train.grad_accum": 2}))
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for dist in ("ddp", "fsdp"):
        sets = _sets(setup, root / dist, "cmpt", 4, **{"train.grad_accum": 1, "train.dist": dist})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
        cmd += [f"--master_port={_free_port()}", "-m", "cmpt", "train", "tiny/moca_cpt"]
        cmd += [arg for s in sets for arg in ("--set", s)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank(dist_runs, dist):
    assert losses(dist_runs / dist) == pytest.approx(losses(dist_runs / "single"), rel=1e-5)
    ref, got = weights(dist_runs / "single" / "final"), weights(dist_runs / dist / "final")
    assert ref.keys() == got.keys()
    for k in ref:
        # a key bias has an exactly-zero true gradient (softmax is shift invariant): Adam turns its
        # rounding noise into full-size steps, so it is compared loosely
        tol = 1e-4 if k.endswith("k_proj.bias") else 1e-5
        rel = (got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)
        assert rel <= tol, (k, float(rel))


def _cl_sets(root: Path, run: str, batch: int, **extra) -> list[str]:
    data = root / "pairs" / "train.jsonl"
    items = {"run.dir": root / run, "model.init": root / "vlm", "data.path": data,
             "stage.batch_size": batch, "stage.trainable": "[vision, merger, llm, lm_head]",
             "stage.resolution.min_pixels": 28 * 28, "stage.resolution.max_pixels": 112 * 112,
             "optim.lr": 1e-4, "optim.warmup_ratio": 0.0, "train.steps": 3, "train.log_every": 1,
             "train.progress": False, "train.tensorboard": False, **extra}  # fmt: skip
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="module")
def cl_runs(setup, tmp_path_factory):
    """MoCa stage 2 from a VLM with an untied LM head: one process with 4 pairs per micro-batch,
    and 2 DDP ranks with 2 each (the same global batches)."""
    from cmpt.demo.synth_retrieval import synth_retrieval_main
    from vlm_fixtures import build_dirs, build_vlm

    root = tmp_path_factory.mktemp("moca_cl_dist")
    build_vlm(build_dirs(root / "models"), "llama").save_pretrained(root / "vlm")
    synth_retrieval_main(48, root / "pairs", seed=0, n_eval=4, max_side=112)
    sets = functools.partial(_cl_sets, root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_recipe("tiny/moca_cl", sets("single", 4))
    finally:
        torch.set_num_threads(threads)
    _two_ranks(sets("ddp", 2, **{"train.dist": "ddp"}))
    return root


def _two_ranks(sets: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={_free_port()}", "-m", "cmpt", "train", "tiny/moca_cl"]
    cmd += [arg for s in sets for arg in ("--set", s)]
    proc = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_cl_two_ranks_equal_one_rank_with_an_untied_head(cl_runs):
    """Stage 2 under DDP: the untied LM head asked for by ``stage.trainable`` stays frozen (DDP failed
    at step 2 on its missing gradient), and 2 ranks × 2 pairs equal 1 rank × 4 (gathered targets)."""
    assert losses(cl_runs / "ddp") == pytest.approx(losses(cl_runs / "single"), rel=1e-5)
    # the losses of steps 2 and 3 already agree to 1e-5 (the updates were the same); in the weights,
    # τ = 0.03 and Adam turn reduction-order noise of near-zero gradient entries into full steps
    ref, got = weights(cl_runs / "single" / "final"), weights(cl_runs / "ddp" / "final")
    assert ref.keys() == got.keys()
    for k in ref:
        rel = (got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)
        assert rel <= 1e-3, (k, float(rel))


def test_cl_resumes_at_another_world_size_with_the_same_global_batch(cl_runs):
    """The 2-rank DDP run (2 pairs per rank, saved at step 3) continues in one process with 4 pairs:
    the same global contrastive batches, so no --allow-change for the world size, and steps 4-5
    equal the run continued on its 2 ranks. Another global batch is refused naming the fix."""
    from cmpt.train.resume import ResumeError

    more = {"train.steps": 5, "train.resume": cl_runs / "ddp", "train.allow_change": "[train.steps]"}
    _two_ranks(_cl_sets(cl_runs, "ddp5", 2, **more, **{"train.dist": "ddp"}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = run_recipe("tiny/moca_cl", _cl_sets(cl_runs, "resumed", 4, **more))
        assert s["resumed_from"] == 3 and s["step"] == 5
        assert losses(cl_runs / "resumed") == pytest.approx(losses(cl_runs / "ddp5"), rel=1e-5)
        with pytest.raises(ResumeError, match=r"2 per global batch \(--set stage\.batch_size=4 keeps it\)"):
            run_recipe("tiny/moca_cl", _cl_sets(cl_runs, "other", 2, **more))
        more["train.allow_change"] = "[train.steps, train.world_size]"
        with pytest.raises(ResumeError, match=r"saved at world size 2.*--set stage\.batch_size="):
            run_recipe("tiny/moca_cl", _cl_sets(cl_runs, "other2", 2, **more))
    finally:
        torch.set_num_threads(threads)
