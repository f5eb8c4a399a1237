"""Two processes (``torchrun``, gloo, CPU) equal one process with the same global batch (docs/method.md §6).

One launch of ``tests/dist_worker.py`` trains the toy task with DDP and FSDP2, each with
streaming (``loss_counts``) and deferred accumulation, plus an FSDP2 run stopped by SIGTERM and
resumed. The reference is a single process with ``grad_accum`` doubled, which consumes the same
micro-batches: losses and final weights must agree to 1e-5 (relative).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_worker import train

pytestmark = pytest.mark.slow

STEPS, ACCUM, WORLD = 6, 2, 2
RUNS = ("ddp_stream", "ddp_defer", "fsdp_stream", "fsdp_defer")
WORKER = Path(__file__).resolve().parent / "dist_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(out)]
    cmd += [str(STEPS), str(ACCUM)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(out, "single", "none", STEPS, WORLD * ACCUM, precount=False)
    finally:
        torch.set_num_threads(n)
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", RUNS)
def test_two_ranks_equal_one_rank_with_the_same_global_batch(runs: Path, name: str) -> None:
    ref, got = _weights(runs / "single"), _weights(runs / name)
    assert sorted(got) == sorted(ref)
    for k in ref:
        rel = (got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)
        assert rel <= 1e-5, (k, float(rel))
    ref_losses, losses = _losses(runs / "single"), _losses(runs / name)
    assert len(losses) == len(ref_losses) == STEPS
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert torch.equal(got["embed.weight"], ref["embed.weight"])  # frozen, identical on every rank


def test_fsdp_stop_and_resume_is_bitwise(runs: Path) -> None:
    a, b = _weights(runs / "fsdp_stop"), _weights(runs / "fsdp_defer")
    assert all(torch.equal(a[k], b[k]) for k in b)
    lines = (runs / "fsdp_stop" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(1, STEPS + 1))
