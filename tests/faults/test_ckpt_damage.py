"""Damaged checkpoints (docs/method.md §4 "Verified checkpoints"): a flipped byte or a zeroed 4 KiB
block in a weight file, a truncated ``trainer_state.json``, a missing rank file — each is reported
by path and reason, set aside as ``.damaged``, and the run resumes from the previous checkpoint,
ending bitwise equal to an uninterrupted run. When nothing usable is left, the run stops before
loading anything. ``cmpt ckpt verify`` reports the same offline."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from fault_helpers import MARKER, ToyTask, assert_same, ckpt_dirs, fit, flip_byte, weights, zero_block

from cmpt.cli import main as cli
from cmpt.train.checkpoint import CheckpointError, CheckpointManager
from cmpt.train.distributed import world_info
from cmpt.train.verify import verify_checkpoint


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: 8 steps, checkpoints 2, 4, 6, 8 (all kept), final weights."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    fit(run, ToyTask(dropout=0.1))
    assert ckpt_dirs(run) == ["step_000002", "step_000004", "step_000006", "step_000008"]
    return run


@pytest.fixture
def run(reference: Path, tmp_path: Path) -> Path:
    """A copy of the reference run without its final weights (as if about to resume)."""
    dst = tmp_path / "run"
    shutil.copytree(reference, dst)
    shutil.rmtree(dst / "final")
    return dst


def _resume(run: Path, caplog: pytest.LogCaptureFixture) -> dict:
    with caplog.at_level(logging.WARNING, logger="cmpt.train"):
        return fit(run, ToyTask(dropout=0.1))


def _legacy(ckpt: Path) -> None:
    """Make a checkpoint look like one written before manifests (marker = the step number)."""
    (ckpt / MARKER).write_text(f"{int(ckpt.name.split('_')[1])}\n")


@pytest.mark.parametrize("damage", ["flipped_byte", "zeroed_4k_block"])
def test_damaged_weights_fall_back_bitwise(run: Path, reference: Path, damage: str, caplog) -> None:
    newest = run / "checkpoints" / "step_000008"
    data = newest / "__0_0.distcp"
    flip_byte(data) if damage == "flipped_byte" else zero_block(data)
    s = _resume(run, caplog)
    assert s["resumed_from"] == 6 and s["step"] == 8
    assert f"checkpoint {newest} is DAMAGED" in caplog.text
    assert "checksum mismatch in __0_0.distcp" in caplog.text
    assert "step_000008.damaged" in ckpt_dirs(run) and "step_000008" in ckpt_dirs(run)  # set aside, redone
    assert_same(weights(run), weights(reference))


@pytest.mark.parametrize("legacy", [False, True], ids=["manifest", "legacy"])
@pytest.mark.parametrize("damage", ["truncated_trainer_state", "missing_rank_file"])
def test_structural_damage_is_named_and_falls_back(
    run: Path, reference: Path, damage: str, legacy: bool, caplog
) -> None:
    newest = run / "checkpoints" / "step_000008"
    if legacy:
        for p in (run / "checkpoints").iterdir():
            _legacy(p)
    if damage == "truncated_trainer_state":
        path = newest / "trainer_state.json"
        path.write_bytes(path.read_bytes()[:40])
        named = "trainer_state.json"
    else:
        (newest / "rank_00000.pt").unlink()
        named = "missing file rank_00000.pt"
    s = _resume(run, caplog)
    assert s["resumed_from"] == 6
    assert str(newest) in caplog.text and named in caplog.text
    if legacy:
        assert "has no manifest" in caplog.text  # step 6 accepted on its structure, with a warning
    assert_same(weights(run), weights(reference))


def test_all_damaged_stops_before_loading(run: Path, caplog) -> None:
    for p in (run / "checkpoints").iterdir():
        flip_byte(p / "__0_0.distcp")
    metrics = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step_000008: checksum mismatch"):
        _resume(run, caplog)
    assert ckpt_dirs(run) == [f"step_00000{i}.damaged" for i in (2, 4, 6, 8)]
    assert not (run / "final").exists() and (run / "metrics.jsonl").read_bytes() == metrics
    with pytest.raises(CheckpointError, match="only quarantined ones"):  # a rerun does not start over
        _resume(run, caplog)


def test_legacy_checkpoint_is_accepted_with_a_warning(run: Path, reference: Path, caplog) -> None:
    _legacy(run / "checkpoints" / "step_000008")
    s = _resume(run, caplog)
    assert s["resumed_from"] == 8 and "has no manifest" in caplog.text
    assert_same(weights(run), weights(reference))


def test_explicit_load_verifies_first(run: Path) -> None:
    """A checkpoint handed straight to ``load`` (e.g. ``--resume PATH``) is verified too."""
    path = run / "checkpoints" / "step_000004"
    flip_byte(path / "__0_0.distcp", 1000)
    task = ToyTask()
    opt = torch.optim.AdamW(task.model.parameters())
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    mgr = CheckpointManager(run / "checkpoints", world_info())
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is damaged .*checksum mismatch"):
        mgr.load(path, task.model, opt)
    assert_same(task.model.state_dict(), before)  # nothing was loaded


def test_verify_reasons(run: Path) -> None:
    ck = run / "checkpoints"
    zero_block(ck / "step_000002" / "__0_0.distcp")
    (ck / "step_000004" / "trainer_state.json").write_text("{")
    (ck / "step_000006" / MARKER).write_text('{"format": "cmpt-checkpoint-manifest/1", "fi')
    assert verify_checkpoint(ck / "step_000008").ok
    reasons = [verify_checkpoint(ck / f"step_00000{i}").reason for i in (2, 4, 6)]
    assert reasons[0].startswith("checksum mismatch in __0_0.distcp: crc32 ")
    assert reasons[1].startswith("size mismatch in trainer_state.json: 1 bytes, the manifest says ")
    assert reasons[2].startswith("COMPLETE manifest is not valid JSON")


def test_legacy_checkpoint_with_a_short_data_file_is_damaged(run: Path) -> None:
    """Without a manifest the sizes come from DCP's metadata: a data file one byte short of the
    last stored item is named as truncated."""
    ckpt = run / "checkpoints" / "step_000008"
    _legacy(ckpt)
    data = ckpt / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-1])
    v = verify_checkpoint(ckpt)
    assert not v.ok and "truncated" in v.reason and "__0_0.distcp" in v.reason


def test_cli_verify_exit_codes(run: Path, tmp_path: Path, capsys) -> None:
    assert cli(["ckpt", "verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step_000008: ok (4 files" in out and out.count(": ok (") == 4
    flip_byte(run / "checkpoints" / "step_000004" / "rank_00000.pt")  # an older one: still usable
    assert cli(["ckpt", "verify", str(run)]) == 0
    assert "step_000004: DAMAGED (checksum mismatch in rank_00000.pt" in capsys.readouterr().out
    (run / "checkpoints" / "step_000008" / "rank_00000.pt").unlink()
    assert cli(["ckpt", "verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "step_000008: DAMAGED (missing file rank_00000.pt" in out and "NOT usable" in out
    (run / "checkpoints" / "step_000010").mkdir()  # an interrupted save: ignored for the verdict
    (run / "checkpoints" / "step_000008" / MARKER).unlink()
    assert cli(["ckpt", "verify", str(run)]) == 0
    assert "step_000010: incomplete" in capsys.readouterr().out
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert cli(["ckpt", "verify", str(tmp_path / "empty")]) == 1
    assert cli(["ckpt", "verify", str(tmp_path / "nowhere")]) == 1
