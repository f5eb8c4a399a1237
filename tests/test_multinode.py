"""Two "nodes" on one machine: two ``torchrun --nnodes 2 --nproc_per_node 1`` launches meeting through
a c10d rendezvous (gloo, CPU), training the tiny CoMP stage II (docs/method.md §6).

* The two-node run ends with the weights of one process with the same global batch (grad_accum 2),
  within 1e-5 relative.
* With ``--max-restarts 1``, one worker SIGKILLed mid-run (after the checkpoint of step 4): the
  elastic agents restart the group, the run resumes from that checkpoint and ends with the same
  weights as the uninterrupted run. The length index is built once (rank 0) and shared.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cmpt.recipes import run_recipe
from comp_fixtures import make_tiny_setup, overrides
from test_comp_recipe import weights

pytestmark = pytest.mark.slow
STEPS, SAVE_EVERY, KILL_AT = 6, 2, 4
WORKER = Path(__file__).resolve().parent / "multinode_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(name: str, sets: list[str], log: Path, *, restarts: int = 0, kill: Path | None = None):
    """Start the two node launches; each runs ``cmpt train`` (through the killing wrapper if
    ``kill``)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={name}"]
    cmd += [f"--max-restarts={restarts}", "--monitor-interval=0.2", "--local_addr=127.0.0.1"]
    entry = [str(WORKER), str(kill), str(KILL_AT)] if kill else ["-m", "cmpt"]
    entry += ["train", "tiny/comp_stage2", *[a for s in sets for a in ("--set", s)]]
    # a fresh worker store per rendezvous round: with the agent's shared store (torch's default), a
    # group restarted after a failure can read the previous round's gloo addresses
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    procs = []
    for node in (0, 1):
        out = open(log.with_suffix(f".node{node}.log"), "w")  # noqa: SIM115 - closed by _wait
        conf = [f"--rdzv_conf=is_host={1 - node}", f"--node_rank={node}"]
        proc = subprocess.Popen([*cmd, *conf, *entry], env=env, stdout=out, stderr=subprocess.STDOUT)
        procs.append((proc, out))
    return procs


def _wait(procs, timeout: float = 300) -> list[int]:
    codes = []
    for p, out in procs:
        try:
            codes.append(p.wait(timeout))
        finally:
            out.close()
    return codes


def _logs(log: Path) -> str:
    return "".join(log.with_suffix(f".node{n}.log").read_text() for n in (0, 1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    setup = make_tiny_setup(root / "tiny")
    lengths = {"data.length_cache": root / "lengths"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_recipe("tiny/comp_stage1", overrides(setup, root / "s1", steps=2, **lengths))
        common = {"model.init": root / "s1" / "final", "train.save_every": SAVE_EVERY, **lengths}
        sets = {**common, "train.grad_accum": 2}
        run_recipe("tiny/comp_stage2", overrides(setup, root / "single", STEPS, **sets))
    finally:
        torch.set_num_threads(threads)
    sets = overrides(setup, root / "nodes", STEPS, **common, **{"train.grad_accum": 1})
    codes = _wait(_launch("nodes", sets, root / "nodes"))
    assert codes == [0, 0], _logs(root / "nodes")[-6000:]
    marker = root / "killme"
    sets = overrides(setup, root / "killed", STEPS, **common, **{"train.grad_accum": 1})
    procs = _launch("killed", sets, root / "killed", restarts=1, kill=marker)
    deadline = time.monotonic() + 240
    while not marker.exists() and time.monotonic() < deadline and all(p.poll() is None for p, _ in procs):
        time.sleep(0.1)
    assert marker.exists(), _logs(root / "killed")[-6000:]
    time.sleep(0.2)  # the pid is written before the worker waits
    os.kill(int(marker.read_text()), signal.SIGKILL)
    codes = _wait(procs)
    assert codes == [0, 0], _logs(root / "killed")[-6000:]
    return root


def _assert_same_weights(a: Path, b: Path) -> None:
    ref, got = weights(a / "final"), weights(b / "final")
    assert ref.keys() == got.keys()
    for k in ref:
        rel = (got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)
        assert rel <= 1e-5, (k, float(rel))


def test_two_nodes_equal_one_process(runs):
    _assert_same_weights(runs / "single", runs / "nodes")


def test_killed_worker_restarts_and_resumes(runs):
    starts = sorted((runs / "killed" / "history").glob("*.yaml"))
    docs = [yaml.safe_load(p.read_text()) for p in starts]
    assert len(docs) == 2 and docs[0]["resumed_from"] is None, docs
    assert docs[1]["resumed_from"]["step"] == KILL_AT, docs[1]["resumed_from"]
    _assert_same_weights(runs / "nodes", runs / "killed")
    _assert_same_weights(runs / "single", runs / "killed")
