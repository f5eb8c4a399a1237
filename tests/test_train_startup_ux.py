"""What `cmpt train` says at start when run.dir or --resume is not what the user meant
(docs/method.md §4 "Verified checkpoints"; cmpt.train.resume, cmpt.train.loop):

* a run.dir holding the user's files and no cmpt run is refused when the trainer is made, naming
  the folder and a few of its entries; an empty one, or one holding an earlier run, is accepted;
* a run.dir (or --resume checkpoint) of another recipe or stage is refused with one line naming
  both, not a key-by-key diff;
* --resume of a path that does not exist says so, and names the ``.damaged`` copy when a start set
  the checkpoint aside (as ``cmpt.export.export_checkpoint`` does);
* a finished run started again does nothing (one line, exit 0, final/ and history/ untouched),
  unless its final/ is missing or of another step; raising train.steps continues it;
* the last log line names the last step's loss as summary.json's ``loss``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "faults"))

from cmpt.cli import main
from cmpt.io_atomic import COMPLETE_MARKER
from cmpt.train import OptimConfig, RunConfig, TrainConfig, Trainer
from cmpt.train.checkpoint import MARKER
from cmpt.train.resume import ResumeError
from toy_task import ToyLoader, ToyTask

pytestmark = pytest.mark.usefixtures("one_thread")


def fit(run_dir: Path, task: ToyTask | None = None, full: dict | None = None, **train_kw) -> dict:
    kw = {"steps": 4, "save_every": 2, "log_every": 2, "progress": False, "tensorboard": False, **train_kw}
    run, optim, train = RunConfig(dir=str(run_dir), seed=1), OptimConfig(lr=1e-3), TrainConfig(**kw)
    if full is not None:  # a recipe-like config: recipe and stage name as the recipes have them
        full = {"run": {"dir": str(run_dir)}, "optim": {"lr": 1e-3}, "train": kw, **full}
    return Trainer(run, optim, train, task or ToyTask(), full_config=full).fit()


class CountingTask(ToyTask):
    """Counts the loaders it builds (a launch with nothing to do builds none)."""

    loaders = 0

    def build_loader(self, rank: int, world_size: int) -> ToyLoader:
        CountingTask.loaders += 1
        return super().build_loader(rank, world_size)


# ----------------------------------------------------------------------------- whose run.dir
def test_a_users_folder_is_refused_when_the_trainer_is_made(tmp_path: Path) -> None:
    user = tmp_path / "userdir"
    (user / "photos").mkdir(parents=True)
    for name in ("notes.txt", "a.csv", "b.csv", "c.csv"):
        (user / name).write_text("mine")
    before = sorted(p.name for p in user.iterdir())
    with pytest.raises(ResumeError) as e:
        Trainer(RunConfig(dir=str(user)), OptimConfig(), TrainConfig(), ToyTask())
    assert str(e.value) == (
        f"run.dir {user} holds files cmpt did not write and no cmpt run (a.csv, b.csv, c.csv, notes.txt, "
        "... (5 entries)): training would put its checkpoints and logs among them; choose a new or "
        "empty run.dir (--set run.dir=...)"
    )
    assert sorted(p.name for p in user.iterdir()) == before  # no lock, no checkpoints/
    (tmp_path / "empty").mkdir()
    assert fit(tmp_path / "empty", steps=2)["status"] == "finished"  # an empty folder is fine
    (tmp_path / "empty" / "notes.txt").write_text("written after the run")  # an earlier run + notes
    s = fit(tmp_path / "empty", steps=4, allow_change=["train.steps"])
    assert s["resumed_from"] == 2 and s["step"] == 4


def test_cli_refuses_a_users_folder_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from exit_toy_recipe import register

    from cmpt import cli

    register()
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    cfg = {"recipe": "toy", "run": {"dir": str(user)}, "train": {"steps": 2, "progress": False}}
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(tmp_path / "toy.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"cmpt train: error: run.dir {user} holds files cmpt did not write and no cmpt run (notes.txt): "
        "training would put its checkpoints and logs among them; choose a new or empty run.dir "
        "(--set run.dir=...)"
    ), err
    assert len(err) == 2 and [p.name for p in user.iterdir()] == ["notes.txt"]


# ----------------------------------------------------------------------------- another recipe or stage
def test_another_recipe_or_stage_is_refused_in_one_line(tmp_path: Path) -> None:
    run = tmp_path / "s1"
    comp1 = {"recipe": "comp", "stage": {"name": "stage1", "lr": 1e-3}, "data": {"budget": 256}}
    fit(run, full=comp1, steps=2)
    moca = {"recipe": "moca", "stage": {"name": "cpt", "mae": 0.5}, "data": {"budget": 512}}
    comp2 = {**comp1, "stage": {"name": "stage2", "lr": 3e-4}}
    for full, what in ((moca, "a moca run (cpt)"), (comp2, "a comp run (stage2)")):
        with pytest.raises(ResumeError) as e:
            fit(run, full=full, steps=2)
        fix = "use a new run.dir (--set run.dir=...)"
        assert str(e.value) == f"{run} holds a comp run (stage1); this is {what}: {fix}"
    ckpt = run / "checkpoints" / "step_000002"
    with pytest.raises(ResumeError) as e:  # another run's checkpoint, by path
        fit(tmp_path / "s2", full=comp2, steps=2, resume=str(ckpt))
    assert str(e.value).startswith(
        f"--resume {ckpt}: {ckpt} is a checkpoint of a comp run (stage1); this is a comp run (stage2): "
    ) and "\n" not in str(e.value)
    diff = r"differs from the checkpoint's in 1 key\(s\).*\n  data\.budget: 256 → 512"
    with pytest.raises(ResumeError, match=diff):
        fit(run, full={**comp1, "data": {"budget": 512}}, steps=2)  # the same stage: the key diff


# ----------------------------------------------------------------------------- --resume PATH
def test_resume_of_a_missing_or_set_aside_checkpoint_says_so(tmp_path: Path, capsys) -> None:
    from cmpt.export import export_checkpoint

    nope = tmp_path / "nope"
    with pytest.raises(ResumeError) as e:
        fit(tmp_path / "b", resume=str(nope))
    assert str(e.value) == (
        f"--resume {nope}: {nope} does not exist (--resume takes auto, never, a checkpoint directory "
        "RUN/checkpoints/step_NNNNNN, or a run directory RUN)"
    )
    run = tmp_path / "a"
    fit(run, steps=4)
    newest = run / "checkpoints" / "step_000004"
    (newest / MARKER).unlink()  # the next start sets it aside as step_000004.damaged
    shutil.rmtree(run / "final")
    assert fit(run, steps=4)["resumed_from"] == 2
    (run / "checkpoints" / "step_000004").rename(run / "checkpoints" / "step_000004.redone")
    note = (
        rf"{re.escape(str(newest))} was set aside as step_000004\.damaged by a training start that found "
        rf"it damaged or incomplete \(renamed \S+\); `cmpt ckpt verify {re.escape(str(run))}` says why"
    )
    with pytest.raises(ResumeError, match=rf"^--resume {re.escape(str(newest))}: {note} \(--resume takes"):
        fit(tmp_path / "c", resume=str(newest))
    with pytest.raises(FileNotFoundError, match=f"^{note}$"):
        export_checkpoint(newest, tmp_path / "out")
    assert main(["export", str(newest), "--out", str(tmp_path / "out")]) == 2  # the command says it too
    assert re.search(note, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- a finished run again
def test_a_finished_run_started_again_does_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    first = fit(run, steps=4)
    marker = run / "final" / COMPLETE_MARKER
    stamp = (os.stat(marker).st_ino, os.stat(marker).st_mtime_ns)
    history = sorted(p.name for p in (run / "history").iterdir())
    metrics = (run / "metrics.jsonl").read_bytes()
    CountingTask.loaders = 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cmpt.train"):
        again = fit(run, CountingTask(), steps=4)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "run.dir already finished (step 4/4, final/ complete): nothing to do; raise train.steps to "
        "continue or use a new run.dir"
    ], lines
    assert CountingTask.loaders == 0  # nothing built: no loader, no checkpoint loaded
    assert (os.stat(marker).st_ino, os.stat(marker).st_mtime_ns) == stamp  # final/ not rewritten
    assert sorted(p.name for p in (run / "history").iterdir()) == history  # no start recorded
    assert (run / "metrics.jsonl").read_bytes() == metrics
    on_disk = json.loads((run / "summary.json").read_text())
    for s in (again, on_disk):
        assert s["nothing_to_do"] is True and s["resumed_from"] is None and s["resume"]["nothing_to_do"]
        assert (s["status"], s["exit_code"], s["step"], s["steps"]) == ("finished", 0, 4, 4)
        for key in ("loss", "losses", "grad_norm", "samples", "tokens", "elapsed_s", "checkpoint", "final"):
            assert s[key] == first[key], key

    json.dump({**json.loads(marker.read_text()), "step": 2}, marker.open("w"))  # final/ of another step
    s = fit(run, steps=4)
    assert s["resumed_from"] == 4 and "nothing_to_do" not in s
    assert json.loads(marker.read_text())["step"] == 4  # written again
    shutil.rmtree(run / "final")
    s = fit(run, steps=4)
    assert s["resumed_from"] == 4 and json.loads(marker.read_text())["step"] == 4
    s = fit(run, steps=6, allow_change=["train.steps"])  # raising train.steps continues
    assert (s["resumed_from"], s["step"], s["status"]) == (4, 6, "finished") and "nothing_to_do" not in s


def test_the_last_line_names_the_loss_of_summary_json(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="cmpt.train"):
        s = fit(tmp_path / "run", steps=4)
    last = caplog.records[-1].getMessage()
    assert last.startswith(f"finished at step 4/4; last step: loss {s['loss']:.4g} "), last
    assert last.endswith('= summary.json "loss" (the step lines show means over their interval)'), last
