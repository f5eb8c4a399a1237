"""Frozen-weight digests (cmpt.train.frozen): checkpoints leave frozen parameters out, so a resume
whose config now loads other frozen weights is refused (naming them and the fix) instead of
continuing on a different model; only a start that loaded its checkpoint is recorded in history/."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from cmpt import weights_digest as D
from cmpt.train import OptimConfig, RunConfig, TrainConfig, Trainer
from cmpt.train import frozen as F
from cmpt.train.resume import ResumeError
from toy_task import ToyTask

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIM = OptimConfig(lr=1e-3, warmup_steps=2)


class Task(ToyTask):
    """The toy task whose frozen embedding is shifted by ``shift`` in one entry (another source)."""

    def __init__(self, shift: float = 0.0, **kw) -> None:
        super().__init__(**kw)
        with torch.no_grad():
            self.model.embed.weight[3, 5] += shift


def fit(run_dir: Path, task: Task, **kw) -> dict:
    train = TrainConfig(steps=6, log_every=1, progress=False, tensorboard=False, **kw)
    return Trainer(RunConfig(dir=str(run_dir), seed=1), OPTIM, train, task).fit()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_digest_matches_a_copy_and_tells_small_changes_apart() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    base = D._stats(w)
    assert F.frozen_mismatch({"w": base}, {"w": D._stats(w.clone())}) == []
    changed = {
        "one entry +1e-4": w.clone().index_put_((torch.tensor(7), torch.tensor(9)), w[7, 9] + 1e-4),
        "rows swapped": w[torch.cat([torch.tensor([1, 0]), torch.arange(2, 64)])],
        "transposed": w.t().contiguous(),
        "bf16 round trip": w.bfloat16().float(),
        "other shape": w[:32],
    }
    for what, other in changed.items():
        assert F.frozen_mismatch({"w": base}, {"w": D._stats(other)}) == ["w"], what
    assert F.frozen_mismatch({"w": base}, {}) == ["w"] and F.frozen_mismatch({}, {"v": base}) == ["v"]


def test_chunked_sums_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(1000, 37)
    whole = D._stats(w)
    monkeypatch.setattr(D, "_ROWS", 2)  # 5 passes of 8186 elements, the last one short
    chunked = D._stats(w)
    assert F.frozen_mismatch({"w": whole}, {"w": chunked}) == []
    x = w.reshape(-1).double()
    weights = D._weights(D._PERIOD, x.device).repeat(x.numel() // D._PERIOD + 1)[: x.numel()]
    reference = [float(x.numel()), float(x.sum()), float(x @ x), float(x @ weights)]
    for a, b in zip(chunked, reference):
        assert a == pytest.approx(b, rel=1e-12)


def test_digest_covers_only_frozen_parameters() -> None:
    task = Task()
    assert set(F.frozen_digest(task.model)) == {"embed.weight"}


def test_resume_on_other_frozen_weights_is_refused_and_not_recorded(tmp_path: Path) -> None:
    s = fit(tmp_path, Task(signal_at=2))
    assert s["stopped"] and s["step"] == 3
    state = json.loads(next((tmp_path / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert list(state[F.FROZEN_KEY]) == ["embed.weight"]
    history = sorted(p.name for p in (tmp_path / "history").iterdir())
    with pytest.raises(ResumeError) as e:
        fit(tmp_path, Task(shift=1e-3))
    msg = str(e.value)
    assert "embed.weight" in msg and "--allow-change frozen_weights" in msg and "step_000003" in msg
    assert sorted(p.name for p in (tmp_path / "history").iterdir()) == history  # a refused start
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 2


def test_same_frozen_weights_resume_exactly(tmp_path: Path) -> None:
    fit(tmp_path / "whole", Task())
    fit(tmp_path / "split", Task(signal_at=2))
    s = fit(tmp_path / "split", Task())
    assert s["resumed_from"] == 3 and s["step"] == 6
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    entries = [yaml.safe_load(p.read_text()) for p in sorted((tmp_path / "split" / "history").glob("*.yaml"))]
    assert [e["resumed_from"] and e["resumed_from"]["step"] for e in entries] == [None, 3]


def test_allow_change_continues_on_the_new_frozen_weights(tmp_path: Path, caplog) -> None:
    fit(tmp_path, Task(signal_at=2))
    with caplog.at_level(logging.WARNING, logger="cmpt.train"):
        s = fit(tmp_path, Task(shift=1e-3), allow_change=["frozen_weights"])
    assert s["resumed_from"] == 3 and s["step"] == 6
    assert "1 frozen parameter(s) differ" in caplog.text and "match no change" not in caplog.text
    assert final_weights(tmp_path)["embed.weight"][3, 5] == pytest.approx(
        Task().model.embed.weight[3, 5] + 1e-3
    )
