"""The trainer's CUDA paths on one GPU, on the tiny CoMP and MoCa recipes (a few steps each):
``train.precision: auto`` (bf16 autocast on CUDA), ``train.compile``, resume, ``torchrun`` with
NCCL, FSDP2 with the bf16 ``MixedPrecisionPolicy`` and its sharded checkpoint, ``loss.lm_impl: liger``.

Every test skips without CUDA, and the suite hides CUDA unless asked (tests/conftest.py):

    CMPT_TEST_DEVICE=cuda python -m pytest -q tests/test_cuda_train.py

(``benchmarks/device_session.sh`` runs it so on a lent GPU machine). The runs are made once per
module; GPU kernels are not bit-deterministic and bf16 rounds, so losses are compared within 2 %.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from cmpt.cli import main as cli_main
from cmpt.demo.synth_documents import generate_documents
from cmpt.losses.fused_ce import liger_available
from cmpt.recipes import run_recipe
from cmpt.vlm.model import VisionLanguageModel
from comp_fixtures import make_tiny_setup, overrides
from fsdp_runs import _free_port, losses, moca_sets, stage2_sets
from test_comp_recipe import weights
from vlm_fixtures import TWO, make_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs CUDA: CMPT_TEST_DEVICE=cuda on a GPU machine (benchmarks/device_session.sh)",
    ),
]

WORKER = Path(__file__).resolve().parent / "cuda_train_worker.py"
STEPS = 24  # the eager run; the resumed run stops half-way
COMPILE_STEPS = DIST_STEPS = 8
FSDP2_STEPS = 3
RTOL = 2e-2
# what the runs report (the CPU values only where the file runs with its skip removed)
CUDA = torch.cuda.is_available()
DEVICE, PRECISION, BACKEND = ("cuda:0", "bf16 autocast", "cuda:nccl") if CUDA else ("cpu", "fp32", "cpu:gloo")
ON_DEVICE = f"precision {PRECISION}, device {DEVICE}"  # in the trainer's start-up line


@contextlib.contextmanager
def _trainer_log() -> Iterator[list[str]]:
    """The messages of the ``cmpt.train`` logger (INFO and up) while the block runs."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("cmpt.train")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _train(sets: list[str], recipe: str = "tiny/comp_stage2") -> tuple[dict, str]:
    """``cmpt train`` in this process: (the summary, the trainer's log)."""
    with _trainer_log() as lines:
        summary = run_recipe(recipe, sets)
    return summary, "\n".join(lines)


def _falls(curve: list[float], k: int = 3) -> bool:
    return sum(curve[-k:]) / k < sum(curve[:k]) / k


def _finite(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def root(setup: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runs' directory, with what fsdp_runs.stage2_sets and moca_sets start from: stage I's
    ``s1/final`` and MoCa documents."""
    root = tmp_path_factory.mktemp("cuda_train")
    run_recipe("tiny/comp_stage1", overrides(setup, root / "s1", steps=2))
    generate_documents(8, root / "moca_docs", seed=0, max_side=112)
    return root


@pytest.fixture(scope="module")
def stage2(setup: dict[str, Path], root: Path) -> Callable[..., list[str]]:
    """``stage2(name, steps, **extra)``: the ``--set``s of a stage-II run ``root/name`` from
    ``s1/final`` (fsdp_runs.stage2_sets: constant lr, a record per step), checkpoints at the end."""

    def sets(name: str, steps: int, **extra: object) -> list[str]:
        return stage2_sets(setup, root, name, steps, 1, **{"train.save_every": 0, **extra})

    return sets


@pytest.fixture(scope="module")
def eager(stage2: Callable[..., list[str]]) -> tuple[dict, str]:
    return _train(stage2("eager", STEPS))


def test_bf16_run_trains_and_writes_a_model_that_loads_on_the_cpu(
    root: Path, eager: tuple[dict, str]
) -> None:
    summary, log = eager
    assert ON_DEVICE in log
    assert summary["status"] == "finished" and summary["step"] == STEPS
    curve = losses(root / "eager")
    assert len(curve) == STEPS and _finite(curve) and _falls(curve), curve
    vlm = VisionLanguageModel.from_pretrained(root / "eager" / "final")
    assert {p.device.type for p in vlm.parameters()} == {"cpu"}
    batch = make_batch(vlm, TWO)
    keys = ("patches", "grid_hw", "images_per_sample")
    with torch.no_grad():
        out = vlm(batch["input_ids"], batch["cu_seqlens"], **{k: batch[k] for k in keys})
        logits = vlm.lm_head(out.hidden)
    assert out.hidden.shape[0] == batch["input_ids"].numel() and torch.isfinite(logits).all()


def test_compiled_blocks_train_like_eager_ones(root: Path, stage2: Callable[..., list[str]]) -> None:
    """``train.compile`` against the same run uncompiled, several sequences packed per micro-batch
    (text on the varlen kernel, docs/method.md §6 "Compiled blocks"): dynamo may not give up on
    any block (no silent fallback to eager)."""
    _train(stage2("uncompiled", COMPILE_STEPS))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        summary, log = _train(stage2("compiled", COMPILE_STEPS, **{"train.compile": True}))
    assert ON_DEVICE in log and summary["step"] == COMPILE_STEPS
    curve = losses(root / "compiled")
    assert _finite(curve) and _falls(curve), curve
    assert curve == pytest.approx(losses(root / "uncompiled"), rel=RTOL)


def test_loader_workers_hand_pinned_batches_to_the_same_steps(
    root: Path, stage2: Callable[..., list[str]], eager: tuple[dict, str]
) -> None:
    """``data.num_workers=2`` on CUDA: the workers' batches arrive in pinned memory (their copy to
    the GPU is asynchronous) and train the same steps as the in-process loader."""
    summary, log = _train(stage2("workers", 2, **{"data.num_workers": 2}))
    assert ON_DEVICE in log and summary["status"] == "finished"
    assert losses(root / "workers") == pytest.approx(losses(root / "eager")[:2], rel=RTOL)


def test_resumed_run_continues_like_an_uninterrupted_one(
    root: Path, stage2: Callable[..., list[str]], eager: tuple[dict, str]
) -> None:
    """Half the steps, then the same command to ``STEPS`` (``--allow-change train.steps``): the same
    losses as the uninterrupted eager run, every step (metrics.jsonl keeps the first half)."""
    _train(stage2("resumed", STEPS // 2))
    more = {"train.allow_change": "[train.steps]"}
    summary, log = _train(stage2("resumed", STEPS, **more))
    assert ON_DEVICE in log
    assert summary["resumed_from"] == STEPS // 2 and summary["step"] == STEPS
    assert losses(root / "resumed") == pytest.approx(losses(root / "eager"), rel=RTOL)


@pytest.fixture(scope="module")
def launched(root: Path, stage2: Callable[..., list[str]]) -> tuple[dict, str]:
    """One ``torchrun --nproc_per_node=1`` of tests/cuda_train_worker.py: a run with
    ``train.dist=ddp``, one with ``fsdp``, the FSDP2 check; (its report, its output)."""
    runs = [{"name": d, "sets": stage2(d, DIST_STEPS, **{"train.dist": d})} for d in ("ddp", "fsdp")]
    check = {"sets": stage2("fsdp2", FSDP2_STEPS), "steps": FSDP2_STEPS}
    spec = root / "spec.json"
    spec.write_text(json.dumps({"runs": runs, "fsdp2": check}, default=str))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={_free_port()}", str(WORKER), str(spec), str(root / "report.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return json.loads((root / "report.json").read_text()), output


def test_torchrun_starts_nccl_on_cuda(launched: tuple[dict, str]) -> None:
    report, _ = launched
    assert BACKEND in report["backend"] and report["device"] == DEVICE


@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_torchrun_run_trains_and_its_last_checkpoint_exports_to_final(
    root: Path, launched: tuple[dict, str], dist: str, tmp_path: Path
) -> None:
    """Finite falling losses, ``final/`` = ``cmpt export`` of the last checkpoint. One process runs
    unwrapped whatever ``train.dist`` says (start-up line ``(none)``): FSDP2 is the next test's."""
    report, output = launched
    assert f"start-up: world size 1 (none), {ON_DEVICE}" in output
    assert report[dist]["status"] == "finished" and report[dist]["step"] == DIST_STEPS
    curve = losses(root / dist)
    assert _finite(curve) and _falls(curve), curve
    ckpt = root / dist / "checkpoints" / f"step_{DIST_STEPS:06d}"
    assert cli_main(["export", str(ckpt), "--out", str(tmp_path / "exported")]) == 0
    ref, got = weights(root / dist / "final"), weights(tmp_path / "exported")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_fsdp2_with_bf16_mixed_precision_steps_like_the_unsharded_model(launched: tuple[dict, str]) -> None:
    """FSDP2 (``shard_fsdp``, bf16 ``MixedPrecisionPolicy``) under NCCL: fp32 DTensor parameters,
    bf16 weights in the forward, the same losses as the unsharded model under bf16 autocast."""
    fsdp, plain = launched[0]["fsdp2"]["fsdp"], launched[0]["fsdp2"]["none"]
    assert fsdp["params"] == ["DTensor:torch.float32"] and plain["params"] == ["Parameter:torch.float32"]
    assert fsdp["forward_dtypes"] == ["torch.bfloat16"] and plain["forward_dtypes"] == ["torch.float32"]
    assert len(fsdp["losses"]) == FSDP2_STEPS and _finite(fsdp["losses"])
    assert fsdp["losses"] == pytest.approx(plain["losses"], rel=RTOL)


def test_fsdp2_checkpoint_round_trips_through_the_trainers_manager(launched: tuple[dict, str]) -> None:
    """The sharded model + optimizer after the FSDP2 steps, saved by the trainer's
    ``CheckpointManager`` (DCP of the DTensors, verified manifest) and loaded by a second one (as on
    resume) into a fresh sharded model + optimizer: every full tensor and optimizer state equal, and
    one more step from each (the continued original, the restored one) gives the same loss."""
    ckpt = launched[0]["fsdp2"]["fsdp"]["checkpoint"]
    assert ckpt["manifest"] and ckpt["found"] == ckpt["saved"]
    assert Path(ckpt["saved"]).name == f"step_{FSDP2_STEPS:06d}" and ckpt["step"] == FSDP2_STEPS
    assert ckpt["world_size"] == 1 and ckpt["loader_state"]
    assert f"DTensor:{DEVICE.split(':')[0]}:torch.float32" in ckpt["model_kinds"]
    assert ckpt["differed_before_load"] > 0  # the fresh model holds the initial weights
    assert ckpt["tensors"] > 0 and ckpt["model_diff"] == []
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(ckpt["optim_keys"]) and ckpt["optim_params"] > 0
    assert ckpt["optim_diff"] == [] and ckpt["same_groups"]
    assert math.isfinite(ckpt["continued_loss"]) and ckpt["rel_diff"] <= 1e-6, ckpt


def test_moca_cpt_runs_with_finite_mlm_and_mae_losses(root: Path) -> None:
    """MoCa CPT (fsdp_runs.moca_sets: from ``s1/final``, LoRA when peft is installed), 4 steps."""
    sets = moca_sets(root, "moca", 1, **{"train.steps": 4})
    summary, log = _train(sets, "tiny/moca_cpt")
    assert ON_DEVICE in log and summary["status"] == "finished" and summary["step"] == 4
    records = [json.loads(line) for line in (root / "moca" / "metrics.jsonl").read_text().splitlines()]
    assert _finite([r["loss/mlm"] for r in records])
    assert _finite([r["loss/mae"] for r in records if "loss/mae" in r])
    assert (root / "moca" / "final" / "embedder_config.json").is_file()


@pytest.mark.skipif(not liger_available(), reason="liger-kernel is not installed (pip install 'cmpt[liger]')")
def test_liger_lm_loss_equals_the_chunked_one(root: Path, stage2: Callable[..., list[str]]) -> None:
    """The first step's loss (same seed, same batch) with Liger's fused CE and with cmpt's own."""
    first: dict[str, float] = {}
    for impl in ("liger", "chunked"):
        _train(stage2(f"lm_{impl}", 1, **{"loss.lm_impl": impl}))
        first[impl] = losses(root / f"lm_{impl}")[0]
    assert first["liger"] == pytest.approx(first["chunked"], rel=1e-2)
