"""kill -9 at random moments (inside saves too), over several seeds: rerunning the same `cmpt train`
command until it finishes ends bitwise equal to an uninterrupted run, and nothing half-written is
ever loaded."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parent / "exit_toy_recipe.py"
STEPS = 12


def _recipe(tmp: Path, name: str) -> Path:
    cfg = {
        "recipe": "toy",
        "run": {"dir": str(tmp / name), "seed": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": STEPS, "save_every": 1, "keep_last": 2, "log_every": 1, "progress": False},
        "toy": {"sleep": 0.02},
    }
    cfg["train"]["tensorboard"] = False
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cmd(recipe: Path) -> list[str]:
    return [sys.executable, str(WORKER), "train", str(recipe)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 240) -> None:
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= step):
        if proc.poll() is not None or time.monotonic() > deadline:
            return
        time.sleep(0.005)


def _weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_kills_end_bitwise_equal(tmp_path: Path, seed: int) -> None:
    straight = subprocess.run(_cmd(_recipe(tmp_path, "straight")), env=_env(), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    rng = random.Random(seed)
    recipe, run, kills = _recipe(tmp_path, "killed"), tmp_path / "killed", 0
    targets = sorted(rng.sample(range(1, STEPS), 3))  # kill once past these steps (a save each step)
    for target in [*targets, None]:
        cmd = _cmd(recipe)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if target is not None:
            _wait_for_step(proc, run, target)
            time.sleep(rng.uniform(0.0, 0.03))  # anywhere in the next step or its save
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        err = proc.communicate(timeout=300)[1]
        if target is None or proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert proc.returncode == 0 and kills >= 1
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
