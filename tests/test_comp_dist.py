"""CoMP stage II under `torchrun --nproc_per_node=2` (gloo, CPU) with DDP and with FSDP2 equals one
process with the same global batch (grad_accum doubled): losses and weights within 1e-5 relative.
All runs use packed text (the default); one single-process run with `data.packing=false` (right-
padded rows) gives the same losses and weights (docs/method.md §7)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from cmpt.recipes import run_recipe
from comp_fixtures import make_tiny_setup, overrides
from test_comp_recipe import weights

pytestmark = pytest.mark.slow
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("comp_dist")
    setup = make_tiny_setup(root / "tiny")
    run_recipe("tiny/comp_stage1", overrides(setup, root / "s1", steps=2))
    common = {"model.init": root / "s1" / "final", "train.log_every": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, packing in (("single", "true"), ("padded", "false")):
            sets = {"train.grad_accum": 2, "data.packing": packing}
            run_recipe("tiny/comp_stage2", overrides(setup, root / name, STEPS, **common, **sets))
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for dist in ("ddp", "fsdp"):
        extra = {
            "train.grad_accum": 1,
            "train.dist": dist,
            "train.save_every": STEPS // 2,
        }  # + a mid-run step
        sets = overrides(setup, root / dist, STEPS, **common, **extra)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
        cmd += [f"--master_port={_free_port()}", "-m", "cmpt", "train", "tiny/comp_stage2"]
        cmd += [arg for s in sets for arg in ("--set", s)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("dist", ["ddp", "fsdp", "padded"])
def test_two_ranks_equal_one_rank(runs, dist):
    def losses(d):
        return [json.loads(line)["loss"] for line in (runs / d / "metrics.jsonl").read_text().splitlines()]

    assert losses(dist) == pytest.approx(losses("single"), rel=1e-5)
    ref, got = weights(runs / "single" / "final"), weights(runs / dist / "final")
    assert ref.keys() == got.keys()
    for k in ref:
        rel = (got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)
        # padded rows run other SDPA kernels than packed ones (a dense mask vs one call per sequence):
        # last-bit differences that 4 Adam steps amplify a little
        assert rel <= (5e-5 if dist == "padded" else 1e-5), (k, float(rel))


@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_export_of_a_checkpoint_step_equals_final(runs, dist, tmp_path):
    """`cmpt export RUN/checkpoints/step_N` in one process: the recipe's final output of that step."""
    from cmpt.cli import main

    ckpt = runs / dist / "checkpoints" / f"step_{STEPS:06d}"
    assert main(["export", str(ckpt), "--out", str(tmp_path / "exported")]) == 0
    ref, got = weights(runs / dist / "final"), weights(tmp_path / "exported")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert (tmp_path / "exported" / "vit" / "model.safetensors").is_file()  # CoMP-VFM too


def test_export_of_a_mid_run_fsdp_checkpoint_equals_that_steps_weights(runs, tmp_path):
    """`cmpt export` of step 2 of 4 (FSDP2, sharded DCP) equals the weights that checkpoint holds, read
    independently with torch's own DCP → torch.save converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from cmpt.cli import main
    from cmpt.vlm.model import VisionLanguageModel

    ckpt = runs / "fsdp" / "checkpoints" / f"step_{STEPS // 2:06d}"
    dcp_to_torch_save(ckpt, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=False)["model"]
    assert main(["export", str(ckpt), "--out", str(tmp_path / "exported")]) == 0
    got = {
        f"vlm.{k}": v
        for k, v in VisionLanguageModel.from_pretrained(tmp_path / "exported").state_dict().items()
    }
    assert saved and set(saved) <= set(got)
    assert [k for k in saved if not torch.equal(saved[k], got[k])] == []
    final = VisionLanguageModel.from_pretrained(runs / "fsdp" / "final").state_dict()
    assert any(not torch.equal(final[k[4:]], saved[k]) for k in saved)  # step 2 is not the last step
