"""Logs that never go silent: CLI logging, labelled loss, one ETA, the start-up summary."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch import nn

from cmpt.log_setup import configure_logging
from cmpt.train import logging as tlog
from cmpt.train.startup import parameter_table, startup_lines

ROOT = Path(__file__).resolve().parents[1]


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_skips_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _FakeClock()
    monkeypatch.setattr(tlog.time, "perf_counter", clock)
    eta = tlog.EtaClock(total_steps=100, start_step=0)
    clock.now = 30.0  # step 1: start-up and compilation
    assert eta.eta(1) == pytest.approx(99 * 30.0)  # the only estimate there is
    for step in range(2, 6):  # then 1 s per step
        clock.now += 1.0
        value = eta.eta(step)
    assert value == pytest.approx(95 * 1.0)  # the naive elapsed/steps would say 95 * 34/5 = 646 s


def test_eta_after_resume_counts_this_launch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _FakeClock()
    monkeypatch.setattr(tlog.time, "perf_counter", clock)
    eta = tlog.EtaClock(total_steps=50, start_step=40)
    clock.now = 5.0
    eta.eta(41)
    clock.now = 7.0
    assert eta.eta(42) == pytest.approx(8 * 2.0)


def test_step_line_labels_the_window_mean() -> None:
    meter = tlog.IntervalMeter()

    class R:
        tokens, samples, metrics, nonfinite, grad_norm, losses = 10, 2, {}, False, 1.0, {"lm": 1.0}

    for loss in (1.0, 3.0):
        r = R()
        r.loss = loss
        meter.add(r)
    rec = meter.record(2, {"all": 1e-3}, eta_s=10.0, elapsed_s=1.0)
    assert rec["loss_steps"] == 2 and rec["loss"] == pytest.approx(2.0)
    line = tlog.format_summary(rec, 10)
    assert "loss (mean of 2 steps) 2" in line and "eta 00:10" in line
    rec["loss_steps"] = 1
    assert "| loss 2 |" in tlog.format_summary(rec, 10)


def test_configure_logging_levels_and_rank_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    log = logging.getLogger("cmpt")
    saved = (list(log.handlers), log.level)
    try:
        stream = io.StringIO()
        for h in list(log.handlers):
            log.removeHandler(h)
        monkeypatch.setenv("RANK", "1")
        configure_logging("info", stream=stream)
        logging.getLogger("cmpt.train").info("quiet on rank 1")
        logging.getLogger("cmpt.train").warning("loud")
        configure_logging("debug", stream=stream)  # idempotent: no second handler
        assert len(log.handlers) == 1
        out = stream.getvalue()
        assert "quiet" not in out and "[rank 1] WARNING: loud" in out
        with pytest.raises(ValueError, match="unknown log level"):
            configure_logging("chatty")
    finally:
        log.handlers[:] = saved[0]
        log.setLevel(saved[1])


def test_parameter_table_and_startup_lines() -> None:
    model = nn.Sequential()
    model.add_module("vision", nn.Linear(10, 10))  # 110 parameters
    model.add_module("llm", nn.Linear(100, 20))  # 2020 parameters
    model.vision.requires_grad_(False)

    class Loader:
        def __init__(self) -> None:
            self.length_index = {"records": 1234, "how": "cached", "seconds": 0.1, "unreadable": 3}

    assert parameter_table(model) == [("vision", 0, 110), ("llm", 2020, 2020)]
    lines = startup_lines(
        model, world_size=2, mode="fsdp", precision="bf16 autocast", device="cpu", grad_accum=4,
        loader=Loader(), budgets=(8192, 4096),
    )  # fmt: skip
    text = "\n".join(lines)
    assert "world size 2 (fsdp), precision bf16 autocast" in text
    assert "trainable/total: 2.02k/2.13k (vision 0/110, llm 2.02k/2.02k)" in text
    assert "1234 records, 3 could not be indexed" in text
    assert "= 8 micro-batches, at most 65,536 text + 32,768 vision tokens" in text


SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from toy_task import ToyTask
    from cmpt.train import OptimConfig, RunConfig, TrainConfig, Trainer
    cfg = TrainConfig(steps=4, log_every=2, progress=True, tensorboard=False)
    Trainer(RunConfig(dir={run!r}, seed=1), OptimConfig(lr=1e-2), cfg, ToyTask()).fit()
    """
)


def test_step_lines_reach_a_non_tty_log(tmp_path: Path) -> None:
    """A script that configures no logging, output to a file (not a terminal), progress bar on:
    the start-up summary and every step line are in the log, and no bar (no carriage returns)."""
    script = SCRIPT.format(tests=str(ROOT / "tests"), run=str(tmp_path / "run"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    log_file = tmp_path / "log.txt"
    with open(log_file, "w") as fh:
        proc = subprocess.run([sys.executable, "-c", script], stdout=fh, stderr=fh, env=env, timeout=120)
    out = log_file.read_text()
    assert proc.returncode == 0, out
    assert "\r" not in out
    assert "start-up: world size 1 (none), precision fp32" in out
    assert "parameters trainable/total:" in out
    assert "time to first step:" in out
    assert "step 2/4 | loss (mean of 2 steps)" in out and "step 4/4 | loss (mean of 2 steps)" in out


def test_foreign_progress_bars_are_off_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from cmpt.log_setup import quiet_progress_bars_off_tty

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    transformers.utils.logging.enable_progress_bar()
    try:
        quiet_progress_bars_off_tty()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        transformers.utils.logging.enable_progress_bar()
        import huggingface_hub

        huggingface_hub.utils.enable_progress_bars()


# ----------------------------------------------------------------------------- metrics across crashes
class _Crash(Exception):
    pass


def _fit(run_dir: Path, crash_at: int | None = None, **train_kw) -> dict:
    """The toy task; ``crash_at``: the micro-batch (1-based) whose loss raises (a crash mid-run)."""
    from cmpt.train import OptimConfig, RunConfig, TrainConfig, Trainer
    from toy_task import ToyTask

    task, calls = ToyTask(**train_kw.pop("task_kw", {})), [0]
    compute = task.compute_loss

    def crashing(model, batch):
        calls[0] += 1
        if calls[0] == crash_at:
            raise _Crash("simulated crash")
        return compute(model, batch)

    task.compute_loss = crashing
    kw = {"steps": 8, "log_every": 4, "progress": False, "tensorboard": False, **train_kw}
    return Trainer(RunConfig(dir=str(run_dir), seed=1), OptimConfig(lr=1e-3), TrainConfig(**kw), task).fit()


def _records(run_dir: Path) -> list[dict]:
    def strict(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=strict) for line in lines]


@pytest.mark.usefixtures("one_thread")
def test_every_trained_step_is_logged_across_a_crash(tmp_path: Path) -> None:
    """A crash after a log line but before the next checkpoint: the steps the checkpoint kept are
    in metrics.jsonl (the trainer logs at every checkpoint step), none twice."""
    with pytest.raises(_Crash):
        _fit(tmp_path, crash_at=5, save_every=3)  # checkpoint at step 3, log line at step 4
    s = _fit(tmp_path, save_every=3)
    assert s["resumed_from"] == 3
    recs = _records(tmp_path)
    assert [r["step"] for r in recs] == [3, 4, 6, 8]
    assert sum(r["loss_steps"] for r in recs) == 8


@pytest.mark.usefixtures("one_thread")
def test_tensorboard_of_a_fresh_start_hides_a_crashed_launch(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with pytest.raises(_Crash):
        _fit(tmp_path, crash_at=7, log_every=2, tensorboard=True)  # no checkpoint: starts again
    _fit(tmp_path, log_every=2, tensorboard=True)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [2, 4, 6, 8]


@pytest.mark.usefixtures("one_thread")
def test_non_finite_values_are_null_in_metrics_and_summary(tmp_path: Path) -> None:
    s = _fit(tmp_path, steps=2, log_every=1, task_kw={"nan_at": frozenset({1})})
    assert s["skipped_steps"] == 1
    assert _records(tmp_path)[-1]["loss"] is None  # the last step: not finite
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert summary["loss"] is None
