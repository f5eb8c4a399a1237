"""The tiny CoMP stage-II and MoCa CPT runs that tests/test_fsdp_full.py and
tests/test_resume_world_size.py check, made once per test session (one ``torchrun`` launch of
tests/fsdp_full_worker.py, 2 processes, gloo).

All runs share one config (constant LR, so a run of 2 steps continued to 4 with
``--allow-change train.steps`` follows the schedule of an uninterrupted 4-step run) and one global
batch of 2 micro-batches per step:

* ``ref``: 1 process, ``grad_accum`` 2, 4 steps, uninterrupted; ``single2``: its first 2 steps;
* ``fsdp``: 2 processes FSDP2 (meta build, probed, rank 1's weight-file reads guarded), 2 steps;
  ``ddp``: the same with DDP;
* ``bf16``: FSDP2 with ``train.precision=bf16`` (probed, guarded), 1 step;
* ``moca_ref`` / ``moca_fsdp``: MoCa CPT (``tiny/moca_cpt``) from ``s1``'s ``final/``, 1 step with
  LoRA adapters when ``peft`` is installed: 1 process with ``grad_accum`` 2, and 2 processes FSDP2
  (probed, guarded);
* ``one_to_fsdp`` / ``one_to_ddp``: ``single2``'s checkpoint continued to step 4 on 2 processes;
* ``fsdp_to_one`` / ``ddp_to_one``: ``fsdp`` / ``ddp`` continued to step 4 in 1 process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from cmpt.demo.synth_documents import generate_documents
from cmpt.recipes import run_recipe
from comp_fixtures import make_tiny_setup, overrides

WORKER = Path(__file__).resolve().parent / "fsdp_full_worker.py"
_DONE: dict[str, Path] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage2_sets(setup: dict, root: Path, name: str, steps: int, accum: int, **extra) -> list[str]:
    common = {
        "model.init": root / "s1" / "final",
        "optim.schedule": "constant",
        "optim.warmup_ratio": 0.0,
        "train.log_every": 1,
        "train.save_every": 2,
        "train.grad_accum": accum,
    }
    return overrides(setup, root / name, steps, **{**common, **extra})


def moca_sets(root: Path, name: str, accum: int, **extra) -> list[str]:
    """MoCa CPT from ``s1``'s ``final/`` on ``root/moca_docs`` (made by :func:`make_runs`), 1 step."""
    items = {
        "run.dir": root / name,
        "model.init": root / "s1" / "final",
        "model.lora_r": 4 if importlib.util.find_spec("peft") else 0,
        "data.path": root / "moca_docs" / "train.jsonl",
        "data.vision_budget": 96,
        "data.text_budget": 512,
        "data.max_text_tokens": 256,
        "stage.resolution.min_pixels": 28 * 28,
        "stage.resolution.max_pixels": 112 * 112,
        "optim.warmup_ratio": 0.0,
        "train.steps": 1,
        "train.grad_accum": accum,
        "train.log_every": 1,
        "train.save_every": 0,
        "train.progress": False,
        "train.tensorboard": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def _single(sets: list[str], recipe: str = "tiny/comp_stage2") -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_recipe(recipe, sets)["status"] == "finished"
    finally:
        torch.set_num_threads(threads)


def make_runs(root: Path) -> Path:
    """Every run above under ``root`` (made once per session; later calls return the first root)."""
    if "root" in _DONE:
        return _DONE["root"]
    setup = make_tiny_setup(root / "tiny")
    run_recipe("tiny/comp_stage1", overrides(setup, root / "s1", steps=2))
    generate_documents(8, root / "moca_docs", seed=0, max_side=112)
    _single(moca_sets(root, "moca_ref", 2), "tiny/moca_cpt")
    _single(stage2_sets(setup, root, "ref", 4, 2))
    _single(stage2_sets(setup, root, "single2", 2, 2))
    more = {"train.allow_change": "[train.steps]"}
    resume_single = {**more, "train.resume": root / "single2" / "checkpoints" / "step_000002"}
    fsdp, bf16 = {"train.dist": "fsdp"}, {"train.dist": "fsdp", "train.precision": "bf16"}
    guarded = {"probe": True, "guard": True}
    runs = [
        {"name": "fsdp", **guarded, "sets": stage2_sets(setup, root, "fsdp", 2, 1, **fsdp)},
        {"name": "ddp", "sets": stage2_sets(setup, root, "ddp", 2, 1, **{"train.dist": "ddp"})},
        {"name": "bf16", **guarded, "sets": stage2_sets(setup, root, "bf16", 1, 1, **bf16)},
        {
            "name": "moca_fsdp",
            **guarded,
            "recipe": "tiny/moca_cpt",
            "sets": moca_sets(root, "moca_fsdp", 1, **fsdp),
        },
    ]
    for dist in ("fsdp", "ddp"):
        sets = stage2_sets(setup, root, f"one_to_{dist}", 4, 1, **{"train.dist": dist}, **resume_single)
        runs.append({"name": f"one_to_{dist}", "sets": sets})
    spec = root / "spec.json"
    spec.write_text(json.dumps({"runs": [{**r, "sets": [str(s) for s in r["sets"]]} for r in runs]}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={_free_port()}", str(WORKER), str(root), str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    for dist in ("fsdp", "ddp"):
        resume = {**more, "train.resume": root / dist / "checkpoints" / "step_000002"}
        _single(stage2_sets(setup, root, f"{dist}_to_one", 4, 2, **resume))
    _DONE["root"] = root
    return root


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
