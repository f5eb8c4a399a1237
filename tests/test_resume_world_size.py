"""Resuming at another world size (docs/method.md §6 "Distributed training"; :mod:`cmpt.train.reshard`).

Fast: the resume rule (the same global batch at another world size needs no ``--allow-change``,
another global batch does) and how the saved ranks' states map onto the new ranks. Slow: tiny CoMP
stage-II runs (tests/fsdp_runs.py) checkpointed at world size 2 (FSDP2 and DDP) and continued in one
process, and checkpointed in one process and continued on 2 (FSDP2 and DDP), each with
``grad_accum`` adjusted: they continue the same global sample stream and equal the uninterrupted
run within 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cmpt.train.checkpoint import get_rng_state
from cmpt.train.distributed import WorldInfo
from cmpt.train.reshard import load_rank_state
from cmpt.train.resume import ResumeError, plan_resume
from fsdp_runs import losses, make_runs
from test_comp_recipe import weights


def _checkpoint(root: Path, world: int, accum: int) -> Path:
    ckpt = root / "old" / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    config = {"train": {"grad_accum": accum, "steps": 4}}
    state = {"world_size": world, "config": config, "data_fingerprint": {}}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return ckpt


def _plan(tmp_path: Path, saved: tuple[int, int], now: tuple[int, int], allow: list[str] = ()):
    ckpt = _checkpoint(tmp_path, *saved)
    config = {"train": {"grad_accum": now[1], "steps": 4}}

    def complete_in(root: Path) -> list[tuple[int, Path]]:
        return [(2, ckpt)] if root == ckpt.parent else []

    run_dir = tmp_path / "new"
    return plan_resume(str(ckpt), run_dir, complete_in, config, {}, allow, world_size=now[0])


def test_the_same_global_batch_at_another_world_size_resumes(tmp_path: Path) -> None:
    plan = _plan(tmp_path, saved=(2, 1), now=(1, 2))
    assert set(plan.changes) == {"train.world_size", "train.grad_accum"}
    assert any("global batch (2 micro-batches per step) is unchanged" in n for n in plan.notes)


def test_another_global_batch_needs_allow_change(tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match=r"train\.world_size.*2 rank\(s\) x grad_accum 1") as e:
        _plan(tmp_path / "a", saved=(2, 1), now=(1, 1))
    assert "--allow-change train.world_size" in str(e.value)
    plan = _plan(tmp_path / "b", saved=(2, 1), now=(1, 1), allow=["train.world_size"])
    assert plan.changes["train.world_size"][1].startswith("1 rank(s) x grad_accum 1")
    assert _plan(tmp_path / "c", saved=(2, 2), now=(2, 2)).changes == {}  # same world: nothing to say


def test_a_task_names_the_key_of_its_global_batch(tmp_path: Path) -> None:
    """MoCa CL: the global batch is world size × stage.batch_size pairs (Task.world_batch_key)."""
    ckpt = tmp_path / "old" / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    saved = {"stage": {"batch_size": 2}, "train": {"grad_accum": 1}}
    (ckpt / "trainer_state.json").write_text(json.dumps({"world_size": 2, "config": saved}))

    def plan(batch: int, allow=()):
        config = {"stage": {"batch_size": batch}, "train": {"grad_accum": 1}}
        args = (config, {}, allow)
        kw = {"world_size": 1, "batch_key": "stage.batch_size"}
        return plan_resume(
            str(ckpt), tmp_path / "new", lambda r: [(2, ckpt)] if r == ckpt.parent else [], *args, **kw
        )

    assert set(plan(4).changes) == {"train.world_size", "stage.batch_size"}
    assert any("stage.batch_size 2 → 4: the global batch (4 per global batch)" in n for n in plan(4).notes)
    with pytest.raises(ResumeError, match=r"= 2 per global batch \(--set stage\.batch_size=4 keeps it\)"):
        plan(2)
    with pytest.raises(ResumeError, match=r"stage\.batch_size: 2 → 3"):  # another global batch, allowed world
        plan(3, allow=["train.world_size"])


def _rank_files(ckpt: Path, world: int) -> list[dict]:
    states = []
    for r in range(world):
        torch.manual_seed(100 + r)
        state = {
            "rng": get_rng_state(),
            "loader": {"epoch": 1, "position": 8, "samples_seen": 10 + r, "bad_seen": r},
            "bad_data": {"local_bad": r, "local_seen": 10 + r},
        }
        torch.save(state, ckpt / f"rank_{r:05d}.pt")
        states.append(state)
    return states


def test_rank_states_map_onto_another_world_size(tmp_path: Path) -> None:
    saved = _rank_files(tmp_path, 2)
    cpu = torch.device("cpu")
    one = load_rank_state(tmp_path, WorldInfo(0, 0, 1, cpu), 2)
    assert one["loader"] == {"epoch": 1, "position": 8, "samples_seen": 21, "bad_seen": 1}  # totals kept
    assert one["bad_data"] == {"local_bad": 1, "local_seen": 21}
    assert torch.equal(one["rng"]["torch"], saved[0]["rng"]["torch"])
    three = [load_rank_state(tmp_path, WorldInfo(r, r, 3, cpu), 2) for r in range(3)]
    assert [s["loader"]["position"] for s in three] == [8, 8, 8]  # one global stream position
    assert [s["loader"]["samples_seen"] for s in three] == [21, 0, 0]
    assert torch.equal(three[1]["rng"]["torch"], saved[1]["rng"]["torch"])
    torch.manual_seed(7)
    fresh = torch.get_rng_state()
    assert torch.equal(load_rank_state(tmp_path, WorldInfo(2, 2, 3, cpu), 2)["rng"]["torch"], fresh)
    same = load_rank_state(tmp_path, WorldInfo(1, 1, 2, cpu), 2)  # same world size: the rank's own
    assert same["loader"]["samples_seen"] == 11


# ----------------------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_runs(tmp_path_factory.mktemp("fsdp_runs"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp_to_one", "ddp_to_one", "one_to_fsdp", "one_to_ddp"])
def test_resume_at_another_world_size_equals_the_uninterrupted_run(runs: Path, name: str) -> None:
    ref, got = weights(runs / "ref" / "final"), weights(runs / name / "final")
    assert ref.keys() == got.keys()
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst <= 1e-6, (name, worst)
    assert losses(runs / name) == pytest.approx(losses(runs / "ref")[2:], rel=1e-6, abs=0)
    summary = json.loads((runs / name / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["step"] == 4
    # the same global stream: samples and tokens of steps 3-4 equal the uninterrupted run's
    ref_summary = json.loads((runs / "ref" / "summary.json").read_text())
    assert (summary["samples"], summary["tokens"]) == (ref_summary["samples"], ref_summary["tokens"])
    (entry,) = sorted((runs / name / "history").glob("*.yaml"))
    changes = yaml.safe_load(entry.read_text())["allowed_changes"]
    assert {"train.world_size", "train.grad_accum", "train.steps"} <= set(changes)
