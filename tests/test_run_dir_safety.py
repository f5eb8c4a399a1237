"""One run per run.dir, and nothing of the user's lost to it (docs/method.md §4 "Verified checkpoints").

* A second trainer on a run.dir in use stops at once with one message naming the holder, before it
  touches the run (another process or another open of the lock file; under ``torchrun`` every rank
  stops); a dead holder's lock, or a forked child of it, does not block.
* At start, only the checkpoint manager's own names under ``checkpoints/`` are touched: user
  folders stay, a ``step_N`` directory without its marker is set aside, not deleted.
* A checkpoint write error that is not a full disk is named as it is, not blamed on disk space.
* A run too short for ``train.bad_check_min_samples`` but above ``train.max_bad_fraction`` ends
  with a warning recorded in summary.json; rerunning a finished run does nothing and keeps its results.
* A run.dir that is a file is refused when the trainer is made, with one line naming run.dir.

Run as a script under ``torch.distributed.run`` (``... test_run_dir_safety.py worker RUN OUT``) this
file is the two-rank worker of :func:`test_every_rank_refuses_a_locked_run_dir`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "faults"))

from cmpt.train import OptimConfig, RunConfig, TrainConfig, Trainer
from cmpt.train.bad_data import BadDataPolicy
from cmpt.train.checkpoint import MARKER
from cmpt.train.disk import LOCK_NAME, RunDirLock
from cmpt.train.resume import ResumeError
from cmpt.train.verify import CheckpointSaveError
from toy_task import ToyLoader, ToyTask

HOST = re.escape(socket.gethostname())

#: holds the lock of run.dir (argv[1]) and forks a child that outlives it; prints the child's pid
HOLDER = """
import os, sys, time
from pathlib import Path
from cmpt.train.disk import RunDirLock
assert RunDirLock(Path(sys.argv[1])).acquire() is None
child = os.fork()
if child == 0:
    time.sleep(300)
    os._exit(0)
print(child, flush=True)
time.sleep(300)
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def fit(run_dir: Path, task: ToyTask | None = None, **train_kw) -> dict:
    kw = {"steps": 4, "save_every": 2, "log_every": 2, "progress": False, "tensorboard": False, **train_kw}
    return Trainer(
        RunConfig(dir=str(run_dir), seed=1), OptimConfig(lr=1e-3), TrainConfig(**kw), task or ToyTask()
    ).fit()


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of ``run`` but the lock file, with its bytes."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


# ----------------------------------------------------------------------------- one process per run.dir
def test_a_second_trainer_on_a_locked_run_dir_stops_before_touching_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(run, steps=2)
    (run / "checkpoints" / "step_000003.tmp").mkdir()  # the holder's save in progress
    (run / "checkpoints" / "step_000003.tmp" / "part").write_text("half written")
    before = snapshot(run)
    holder = RunDirLock(run)  # another open of the lock file conflicts, even in this process
    assert holder.acquire() is None
    try:
        pattern = rf"run\.dir {re.escape(str(run))} is in use by pid {os.getpid()} on host {HOST} since \S+: "
        with pytest.raises(ResumeError, match=pattern + "wait for it, or use another run.dir"):
            fit(run, allow_change=["train.steps"])
        assert snapshot(run) == before  # no cleanup, no summary, no history, no metrics
    finally:
        holder.release()
    s = fit(run, allow_change=["train.steps"])  # released: the run continues
    assert s["resumed_from"] == 2 and s["step"] == 4
    assert not (run / "checkpoints" / "step_000003.tmp").exists()  # now an interrupted save


def test_a_dead_holder_or_its_forked_child_does_not_block(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env
    )
    child = None
    try:
        child = int(proc.stdout.readline())
        with pytest.raises(ResumeError, match=rf"is in use by pid {proc.pid} on host {HOST} since "):
            fit(run)
        proc.kill()  # as kill -9: no cleanup; its forked child (a data-loader worker) lives on
        proc.wait()
        os.kill(child, 0)  # still alive
        assert fit(run)["status"] == "finished"
    finally:
        proc.kill()
        proc.wait()
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def test_cli_refuses_a_locked_run_dir_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from exit_toy_recipe import register

    from cmpt import cli

    register()
    run = tmp_path / "run"
    cfg = {
        "recipe": "toy",
        "run": {"dir": str(run)},
        "train": {"steps": 2, "progress": False, "tensorboard": False},
    }
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(tmp_path / "toy.yaml")]) == 0
    before = snapshot(run)
    holder = RunDirLock(run)
    assert holder.acquire() is None
    try:
        capsys.readouterr()
        assert cli.main(["train", str(tmp_path / "toy.yaml")]) == 2
        err = capsys.readouterr().err
        assert f"cmpt train: error: run.dir {run} is in use by pid {os.getpid()}" in err, err
        assert "Traceback" not in err and snapshot(run) == before
    finally:
        holder.release()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_rank_refuses_a_locked_run_dir(tmp_path: Path) -> None:
    """Two ranks (torchrun, gloo): both stop with rank 0's message, none hangs; once the lock is
    free the same ranks train (only rank 0 locks)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={_free_port()}", __file__, "worker", str(tmp_path / "run"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["refused"][0] == "ResumeError", rep
        assert f"is in use by pid {reports[0]['holder']} on host " in rep["refused"][1], rep
        assert "wait for it, or use another run.dir" in rep["refused"][1]
        assert rep["then"] == "finished"


def _worker(run: Path, out: Path) -> None:
    """The two-rank worker: rank 0 holds the lock while every rank tries to train, then frees it."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # the trainer uses this group: both fits run on it
    rank = dist.get_rank()
    holder = RunDirLock(run)
    if rank == 0:
        run.mkdir(parents=True)
        assert holder.acquire() is None
    report: dict = {"holder": os.getpid() if rank == 0 else None}
    try:
        fit(run)
    except Exception as e:
        report["refused"] = [type(e).__name__, str(e)]
    holder.release()
    dist.barrier()
    report["then"] = fit(run)["status"]
    (out / f"rank_{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- checkpoints/ at start
def test_only_the_managers_own_names_are_touched(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    fit(run, steps=2, save_every=1, keep_last=0)
    ck = run / "checkpoints"
    for name in ("my_best_export", "step_000002_backup", "notes.tmp"):  # the user's, no marker
        (ck / name).mkdir()
        (ck / name / "weights.bin").write_text(f"precious {name}")
    (ck / "step_000002" / MARKER).unlink()  # a real checkpoint whose marker was deleted
    (ck / "step_000009.tmp").mkdir()  # an interrupted save
    with caplog.at_level(logging.INFO, logger="cmpt.train"):
        s = fit(run, steps=4, save_every=1, keep_last=0, allow_change=["train.steps"])
    assert s["resumed_from"] == 1 and s["status"] == "finished"
    for name in ("my_best_export", "step_000002_backup", "notes.tmp"):
        assert (ck / name / "weights.bin").read_text() == f"precious {name}"
        assert f"leaving {ck / name} alone" in caplog.text
    assert (ck / "step_000002.damaged" / "trainer_state.json").is_file()  # set aside, data kept
    assert (
        "step_000002 has no COMPLETE marker" in caplog.text
        and "set aside as step_000002.damaged" in caplog.text
    )
    assert not (ck / "step_000009.tmp").exists() and "removing incomplete checkpoint" in caplog.text
    steps = ["step_000001", "step_000002", "step_000002.damaged", "step_000002_backup", "step_000003"]
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_0")) == [*steps, "step_000004"]


def test_a_write_error_is_not_blamed_on_disk_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As when run.dir is changed under a running save: ENOENT is named, no space advice."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and Path(f).parent.name == "step_000004.tmp":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory (simulated)", str(f))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointSaveError) as e:
        fit(tmp_path / "run")
    msg = str(e.value)
    assert "(write error): FileNotFoundError: [Errno 2] No such file or directory (simulated)" in msg, msg
    assert "The previous checkpoint step_000002 is intact. The disk is not full" in msg, msg
    assert "Free disk space" not in msg and "needs ~" not in msg, msg


# ----------------------------------------------------------------------------- the summary
class MostlyBadLoader(ToyLoader):
    """Every micro-batch also reports 8 skipped samples (a truncated shard, say)."""

    def __iter__(self):
        for batch in super().__iter__():
            yield {**batch, "num_bad": 8}


class MostlyBadToyTask(ToyTask):
    def build_loader(self, rank: int, world_size: int) -> MostlyBadLoader:
        return MostlyBadLoader(self.seed, rank, world_size)


def test_end_of_run_bad_fraction() -> None:
    p = BadDataPolicy(max_fraction=0.1, min_samples=200)
    assert p.at_end(0, 0) == ({"bad_fraction": None, "bad_fraction_exceeded": False}, None)
    assert p.at_end(10, 100) == ({"bad_fraction": 0.1, "bad_fraction_exceeded": False}, None)
    fields, warning = p.at_end(130, 136)
    assert fields == {"bad_fraction": 130 / 136, "bad_fraction_exceeded": True}
    for part in ("130 of the 136 samples read were bad", "95.59% > train.max_bad_fraction = 10.00%",
                 "read only 136 (< train.bad_check_min_samples = 200)", "cmpt data check"):  # fmt: skip
        assert part in warning, (part, warning)


def test_a_short_mostly_bad_run_ends_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cmpt.train"):
        s = fit(tmp_path / "bad", MostlyBadToyTask())
    seen = s["bad_samples"] + s["samples"]
    assert s["status"] == "finished" and s["exit_code"] == 0 and seen < 200  # never checked
    assert s["bad_fraction"] == pytest.approx(s["bad_samples"] / seen) and s["bad_fraction"] > 0.5
    assert s["bad_fraction_exceeded"] is True
    assert json.loads((tmp_path / "bad" / "summary.json").read_text())["bad_fraction_exceeded"] is True
    warnings = [r.getMessage() for r in caplog.records if "samples read were bad" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert f"{s['bad_samples']} of the {seen} samples read were bad" in warnings[0]
    assert "> train.max_bad_fraction = 1.00%" in warnings[0] and "cmpt data check" in warnings[0]
    clean = fit(tmp_path / "clean")
    assert clean["bad_fraction"] == 0.0 and clean["bad_fraction_exceeded"] is False


def test_rerunning_a_finished_run_keeps_its_results(tmp_path: Path) -> None:
    first = fit(tmp_path)
    again = fit(tmp_path)  # nothing to do (cmpt.train.resume): no checkpoint loaded, final/ kept
    assert again["nothing_to_do"] is True and again["resumed_from"] is None and again["status"] == "finished"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for s in (again, on_disk):
        assert s["loss"] == first["loss"] is not None and s["losses"] == first["losses"] != {}
        assert s["grad_norm"] == first["grad_norm"] and s["elapsed_s"] == first["elapsed_s"]


# ----------------------------------------------------------------------------- run.dir is a file
def test_a_file_as_run_dir_is_refused_when_the_trainer_is_made(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("hi\n")

    class Untouchable(ToyTask):
        def build_loader(self, rank: int, world_size: int) -> ToyLoader:
            raise AssertionError("built a loader for a refused run")

    for run, what in ((afile, "is not a directory"), (afile / "sub", f"cannot be created ({afile} is not")):
        with pytest.raises(ResumeError, match=rf"^run\.dir {re.escape(f'{run} {what}')}.*--set run\.dir="):
            Trainer(RunConfig(dir=str(run)), OptimConfig(), TrainConfig(), Untouchable())
    assert afile.read_text() == "hi\n"


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(Path(sys.argv[2]), Path(sys.argv[3]))
