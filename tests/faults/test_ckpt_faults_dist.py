"""Checkpoint faults under 2 ranks (``torchrun``, gloo, CPU; docs/method.md §4 "Verified
checkpoints"): every rank takes the same decision — both fall back from a checkpoint whose rank-1
shard is damaged (and end bitwise equal to the undamaged run), both stop with the same error when
rank 1 alone cannot write (no rank waits forever), both refuse when nothing usable is left."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
WORKER = Path(__file__).resolve().parent / "fault_dist_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults_dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={_free_port()}", str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def _reports(out: Path) -> list[dict]:
    return [json.loads((out / f"report_{r}.json").read_text()) for r in (0, 1)]


def test_both_ranks_fall_back_from_a_damaged_shard(out: Path) -> None:
    for rep in _reports(out):
        assert rep["fallback"] == {"ok": True, "resumed_from": 4, "step": 6}
    ck = out / "fallback" / "checkpoints"
    assert (ck / "step_000006.damaged").is_dir() and (ck / "step_000006").is_dir()
    a = load_file(str(out / "fallback" / "final" / "model.safetensors"))
    b = load_file(str(out / "reference.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)


def test_a_failed_write_on_one_rank_stops_every_rank(out: Path) -> None:
    reports = [rep["enospc"] for rep in _reports(out)]
    assert all(r["error"] == "CheckpointSaveError" for r in reports)
    assert reports[0]["message"] == reports[1]["message"]
    msg, ck = reports[0]["message"], out / "enospc" / "checkpoints"
    assert f"could not write checkpoint {ck / 'step_000004'} (the disk is full)" in msg
    assert "(rank 1)" in msg and "simulated" in msg and "step_000002 is intact" in msg
    assert sorted(p.name for p in ck.iterdir()) == ["step_000002.damaged"]  # then damaged on purpose


def test_every_rank_refuses_when_nothing_is_usable(out: Path) -> None:
    for rep in _reports(out):
        assert rep["all_damaged"]["error"] == "CheckpointError"
        assert "no usable checkpoint" in rep["all_damaged"]["message"]


def test_a_bug_on_one_rank_stops_every_rank(out: Path) -> None:
    r0, r1 = (rep["bug"] for rep in _reports(out))
    assert r1 == {"ok": False, "error": "TypeError", "message": "cannot pickle the loader state"}
    assert r0["error"] == "RuntimeError" and "step_000002.tmp failed on rank 1: TypeError" in r0["message"]
    assert not (out / "bug" / "checkpoints" / "step_000002.tmp").exists()
