"""Exit codes of `cmpt train` (cmpt.launch): 0 finished, 75 stopped on a signal with a checkpoint,
2 user/config/data errors, 1 other failures — recorded in run.dir/summary.json, and the same for one
process and for two processes under `python -m cmpt.launch` (torchrun's launcher)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exit_toy_recipe import register

from cmpt import cli
from cmpt.launch import combine_codes, exit_code_for
from cmpt.train import BadDataError, NonFiniteError, OptimConfig, RunConfig, TrainConfig, Trainer
from toy_task import ToyTask

WORKER = Path(__file__).resolve().parent / "exit_toy_recipe.py"


pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(tmp: Path, steps: int = 6, sleep: float = 0.0) -> Path:
    cfg = {
        "recipe": "toy",
        "run": {"dir": str(tmp / "run"), "seed": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": steps, "log_every": 1, "progress": False, "tensorboard": False},
        "toy": {"sleep": sleep},
    }
    path = tmp / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def summary(tmp: Path) -> dict:
    return json.loads((tmp / "run" / "summary.json").read_text())


def test_code_rules() -> None:
    assert combine_codes([0, 0]) == 0 and combine_codes([75, 75]) == 75 and combine_codes([0, 75]) == 75
    assert combine_codes([75, 2]) == 2 and combine_codes([2, 1]) == 1 and combine_codes([75, None]) == 1
    assert exit_code_for(ValueError("x")) == 2 and exit_code_for(FileNotFoundError("x")) == 2
    assert exit_code_for(BadDataError("x")) == 2 and exit_code_for(NonFiniteError("x")) == 2
    assert exit_code_for(RuntimeError("x")) == 1 and exit_code_for(KeyboardInterrupt()) == 1


def test_cli_codes_and_resume_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    register()
    yml = str(recipe(tmp_path, steps=3))
    assert cli.main(["train", yml]) == 0
    assert summary(tmp_path)["status"] == "finished" and summary(tmp_path)["exit_code"] == 0
    capsys.readouterr()
    assert cli.main(["train", yml, "--resume", "never"]) == 2
    assert "already has checkpoints (step_000003)" in capsys.readouterr().err
    assert cli.main(["train", yml, "--set", "optim.lr=0.01", "--set", "train.steps=5"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.001 → 0.01" in err and "train.steps: 3 → 5" in err
    assert summary(tmp_path)["status"] == "finished"  # a refused start leaves the run's record alone
    args = ["train", yml, "--set", "optim.lr=0.01", "--set", "train.steps=5"]
    assert cli.main([*args, "--allow-change", "optim.lr", "--allow-change", "train.steps"]) == 0
    s = summary(tmp_path)
    assert s["step"] == 5 and s["resume"]["changes"]["optim.lr"] == [0.001, 0.01]
    assert cli.main(["train", yml, "--resume", str(tmp_path / "nowhere")]) == 2


def test_launcher_argv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = []
    monkeypatch.setattr("cmpt.launch.main", lambda argv: seen.append(argv) or 75)
    argv = [
        "train",
        "x.yaml",
        "--nproc-per-node",
        "2",
        "--set",
        "a.b={cache}/y",
        "--allow-change",
        "optim.lr",
    ]
    assert cli.main(argv) == 75
    sets = ["--set", "a.b={cache}/y", "--set", 'train.allow_change=["optim.lr"]']
    assert seen == [["--standalone", "--nproc_per_node=2", "-m", "cmpt", "train", "x.yaml", *sets]]


@pytest.mark.parametrize("torch_bug", [False, True])
def test_a_signalled_launcher_reports_its_workers_code(
    monkeypatch: pytest.MonkeyPatch, torch_bug: bool
) -> None:
    """SIGTERM to ``python -m cmpt.launch``: torchrun raises SignalException — or, when the signal
    lands on the first line of torch's elastic metrics wrapper, an UnboundLocalError raised while
    handling it (seen in CI) — and the exit code is still the workers' (75: stopped, resumable)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from cmpt import launch

    def signalled_run(args) -> None:
        for rank in range(2):  # what each worker's report_exit leaves
            Path(os.environ[launch.EXIT_DIR_ENV], f"rank_{rank:05d}").write_text("75\n")
        try:
            raise SignalException("Process 1 got signal: 15", sigval=signal.SIGTERM)
        except SignalException:
            if not torch_bug:
                raise
            raise UnboundLocalError("cannot access local variable 'start'") from None

    monkeypatch.setattr("torch.distributed.run.run", signalled_run)
    assert launch.main(["--standalone", "--nproc_per_node=2", "worker.py"]) == 75


def test_failure_is_recorded(tmp_path: Path) -> None:
    train = TrainConfig(steps=6, max_nonfinite=0, progress=False, tensorboard=False)
    with pytest.raises(NonFiniteError):
        Trainer(RunConfig(dir=str(tmp_path / "run")), OptimConfig(), train, ToyTask(nan_at={1})).fit()
    s = summary(tmp_path)
    assert s["status"] == "failed" and s["exit_code"] == 2 and "NonFiniteError" in s["error"]


def _signal_when_training(cmd: list[str], run: Path, timeout: float = 300) -> tuple[int, str]:
    """Start ``cmd``, send SIGTERM to it once two steps are logged; its exit code and output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the run did not start training in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check_stopped_then_resumed(tmp_path: Path, cmd: list[str]) -> None:
    s = summary(tmp_path)
    assert s["status"] == "stopped" and s["exit_code"] == 75 and 2 <= s["step"] < s["steps"]
    assert (tmp_path / "run" / "checkpoints" / f"step_{s['step']:06d}").is_dir()
    # the same command without the slowdown finishes (toy.sleep is a resume_ignored_keys entry)
    proc = subprocess.run([*cmd, "--set", "toy.sleep=0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary(tmp_path)["status"] == "finished" and summary(tmp_path)["resumed_from"] == s["step"]


def test_sigterm_single_process_exits_75(tmp_path: Path) -> None:
    cmd = [sys.executable, str(WORKER), "train", str(recipe(tmp_path, steps=400, sleep=0.05))]
    code, out = _signal_when_training(cmd, tmp_path / "run")
    assert code == 75, out[-3000:]
    _check_stopped_then_resumed(tmp_path, cmd)


@pytest.mark.slow
def test_sigterm_two_processes_exits_75(tmp_path: Path) -> None:
    launch = [sys.executable, "-m", "cmpt.launch", "--standalone", "--nproc_per_node=2"]
    cmd = [*launch, str(WORKER), "train", str(recipe(tmp_path, steps=400, sleep=0.05))]
    code, out = _signal_when_training(cmd, tmp_path / "run")
    assert code == 75, out[-3000:]
    _check_stopped_then_resumed(tmp_path, cmd)
