"""Full disks and failed writes during a checkpoint save (docs/method.md §4 "Verified checkpoints").

Two kinds of tests. *Simulated* (always run): ``torch.save`` of the rank file raises
``OSError(ENOSPC)`` — clearly not a real disk. *Real* (root only, else skipped with the reason):
``run.dir/checkpoints`` is a small tmpfs, so DCP's writer hits a genuinely full file system
(PyTorch's ``inline_container`` RuntimeError). Either way the run stops with a message naming the
checkpoint, the bytes needed and free; ``step_N.tmp/`` is gone and the previous checkpoint
verifies — or, when ``train.keep_last`` lets an old checkpoint go, it is deleted early and the run
finishes bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from fault_helpers import ToyTask, assert_same, ckpt_dirs, fit, weights
from torch.distributed.checkpoint import CheckpointException

from cmpt.train.disk import SpaceGuard, describe_failure, free_bytes, out_of_space
from cmpt.train.verify import CheckpointSaveError, read_manifest, verify_checkpoint


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("disk") / "reference"
    fit(run, ToyTask(dropout=0.1))
    return run


def _simulate_enospc(monkeypatch: pytest.MonkeyPatch, at: str, times: int = 1_000) -> None:
    """SIMULATED full disk: ``torch.save`` of the rank file inside ``at`` raises ENOSPC ``times``."""
    real, left = torch.save, [times]

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and Path(f).parent.name == at and left[0] > 0:
            left[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device (simulated)", str(f))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _stopped_cleanly(run: Path, err: CheckpointSaveError, step: int) -> None:
    ck, prev = run / "checkpoints", f"step_{step - 2:06d}"
    msg = str(err)
    assert str(ck / f"step_{step:06d}") in msg and "needs ~" in msg and " free on " in msg, msg
    assert f"The previous checkpoint {prev} is intact" in msg, msg
    assert not (ck / f"step_{step:06d}.tmp").exists() and not (ck / f"step_{step:06d}").exists()
    assert verify_checkpoint(ck / prev).ok and not (run / "final").exists()


def test_simulated_enospc_stops_with_a_clear_message(tmp_path: Path, monkeypatch) -> None:
    _simulate_enospc(monkeypatch, "step_000004.tmp")
    with pytest.raises(CheckpointSaveError, match=r"\(the disk is full\): OSError: .*simulated") as e:
        fit(tmp_path)
    _stopped_cleanly(tmp_path, e.value, 4)


def test_simulated_enospc_prunes_early_and_retries(
    tmp_path: Path, reference: Path, monkeypatch, caplog
) -> None:
    _simulate_enospc(monkeypatch, "step_000006.tmp", times=1)
    with caplog.at_level(logging.WARNING, logger="cmpt.train"):
        fit(tmp_path, ToyTask(dropout=0.1), keep_last=2)
    assert "the disk is full" in caplog.text and "retrying once" in caplog.text
    assert f"deleting {tmp_path / 'checkpoints' / 'step_000002'} now" in caplog.text
    assert ckpt_dirs(tmp_path) == ["step_000006", "step_000008"]
    assert_same(weights(tmp_path), weights(reference))


# ----------------------------------------------------------------------------- a real full disk
@contextlib.contextmanager
def _tmpfs(path: Path, size: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small tmpfs")
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _room_for(reference: Path, n: float) -> int:
    """tmpfs bytes for ``n`` checkpoints of the reference run (whole pages)."""
    files = read_manifest(reference / "checkpoints" / "step_000008")["files"]
    pages = sum(math.ceil(size / 4096) for size, _ in files.values())
    return math.ceil(pages * n) * 4096


def test_full_tmpfs_stops_before_writing(tmp_path: Path, reference: Path) -> None:
    with _tmpfs(tmp_path / "checkpoints", _room_for(reference, 2.5)):
        with pytest.raises(CheckpointSaveError, match=r"not enough free space .* Nothing was written") as e:
            fit(tmp_path)
        _stopped_cleanly(tmp_path, e.value, 6)


def test_full_tmpfs_write_error_is_reported(tmp_path: Path, reference: Path, monkeypatch) -> None:
    monkeypatch.setattr(SpaceGuard, "make_room", lambda self, final, needed: [])  # let the write hit it
    with _tmpfs(tmp_path / "checkpoints", _room_for(reference, 2.5)):
        with pytest.raises(CheckpointSaveError, match=r"could not write .* \(the disk is full\)") as e:
            fit(tmp_path)
        _stopped_cleanly(tmp_path, e.value, 6)


@pytest.mark.parametrize("when", ["before", "after_a_failed_write"])
def test_full_tmpfs_keep_last_makes_room(
    tmp_path: Path, reference: Path, when: str, monkeypatch, caplog
) -> None:
    if when != "before":
        monkeypatch.setattr(SpaceGuard, "make_room", lambda self, final, needed: [])
    with _tmpfs(tmp_path / "checkpoints", _room_for(reference, 2.5)):
        with caplog.at_level(logging.WARNING, logger="cmpt.train"):
            s = fit(tmp_path, ToyTask(dropout=0.1), keep_last=2)
        assert s["step"] == 8 and ckpt_dirs(tmp_path) == ["step_000006", "step_000008"]
        assert "low disk space" in caplog.text
        assert ("retrying once" in caplog.text) == (when != "before")
        assert_same(weights(tmp_path), weights(reference))


def test_pytorch_zip_writer_errors_count_as_full(tmp_path: Path) -> None:
    """On a full disk DCP and ``torch.save`` may fail without an errno (``inline_container.cc``
    "unexpected pos"): the free space at the failure classifies it (no message text is read)."""
    with _tmpfs(tmp_path / "small", 64 << 10) as d:
        failures = []
        try:
            with pytest.warns(UserWarning):
                dcp.save({"w": torch.randn(100_000)}, checkpoint_id=str(d / "dcp"))
        except CheckpointException as e:
            failures.append(describe_failure(e, 0))
        try:
            torch.save({"w": torch.randn(100_000)}, d / "a.pt")
        except (RuntimeError, OSError) as e:
            failures.append(describe_failure(e, 0))
        assert len(failures) == 2
        for f in failures:
            assert out_of_space(f, free_bytes(d), 400_000), f
            assert not out_of_space(f, 1 << 30, 400_000) or f["errno"] is not None, f
