"""Resuming never runs code from a checkpoint (docs/method.md §4 "Verified checkpoints"): a crafted
DCP ``.metadata`` (a pickle whose ``__reduce__`` opens a file for writing) is refused by the
restricted unpickler — even with a manifest that matches it — and the file is never created; the
run falls back to the previous checkpoint. Non-tensor items are unpickled ``weights_only``."""

from __future__ import annotations

import io
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from fault_helpers import ToyTask, assert_same, ckpt_dirs, evil_pickle, fit, reseal, weights
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from cmpt.train.checkpoint import CheckpointError
from cmpt.train.safe_load import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
    load_dcp_metadata,
)
from cmpt.train.verify import verify_checkpoint


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("safe") / "reference"
    fit(run, ToyTask(), steps=4)
    return run


def _crafted(reference: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run whose newest checkpoint has a crafted ``.metadata`` and a manifest that
    matches it; returns (run, the file the payload would create)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final")
    newest, marker = run / "checkpoints" / "step_000004", tmp_path / "PWNED"
    (newest / ".metadata").write_bytes(evil_pickle(marker))
    reseal(newest)
    return run, marker


def test_crafted_metadata_is_refused_and_the_run_falls_back(reference: Path, tmp_path: Path, caplog) -> None:
    run, marker = _crafted(reference, tmp_path)
    with caplog.at_level(logging.WARNING, logger="cmpt.train"):
        s = fit(run, ToyTask(), steps=4)
    assert not marker.exists()
    assert s["resumed_from"] == 2 and "step_000004.damaged" in ckpt_dirs(run)
    newest = run / "checkpoints" / "step_000004"
    assert f"{newest}/.metadata: refused to unpickle io.open" in caplog.text
    assert_same(weights(run), weights(reference))


def test_crafted_metadata_alone_stops_the_run(reference: Path, tmp_path: Path) -> None:
    run, marker = _crafted(reference, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_000002")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*refused to unpickle io\.open"):
        fit(run, ToyTask(), steps=4)
    assert not marker.exists() and not (run / "final").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_safe_reader_refuses_what_the_stock_reader_executes(reference: Path, tmp_path: Path) -> None:
    run, marker = _crafted(reference, tmp_path)
    ckpt = run / "checkpoints" / "step_000004"
    assert not verify_checkpoint(ckpt).ok
    with pytest.raises(UnsafeCheckpointError, match=rf"{ckpt}/\.metadata: refused .*io\.open"):
        load_dcp_metadata(ckpt / ".metadata")
    task = ToyTask()
    state = {"model": task.model.state_dict()}
    with pytest.raises(CheckpointException) as e:  # DCP wraps the reader's error
        dcp.load(state, storage_reader=SafeFileSystemReader(ckpt), planner=SafeLoadPlanner())
    assert f"{ckpt}/.metadata: refused to unpickle io.open" in str(e.value)
    assert not marker.exists()
    # the payload is live: torch's own reader runs it (why cmpt never uses that reader)
    FileSystemReader(ckpt).read_metadata()
    assert marker.exists()


def test_real_metadata_loads(reference: Path) -> None:
    md = load_dcp_metadata(reference / "checkpoints" / "step_000004" / ".metadata")
    assert isinstance(md, Metadata) and any(k.startswith("optim.") for k in md.state_dict_metadata)


@pytest.mark.parametrize("garbage", [b"", b"\x80\x04K", b"not a pickle"])
def test_corrupt_metadata_is_named(tmp_path: Path, garbage: bytes) -> None:
    (tmp_path / ".metadata").write_bytes(garbage)
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata is corrupt"):
        load_dcp_metadata(tmp_path / ".metadata")
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeCheckpointError, match="holds a dict, not a Metadata"):
        load_dcp_metadata(tmp_path / ".metadata")


def test_planner_unpickles_items_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        SafeLoadPlanner().load_bytes(None, buf)
    assert not marker.exists()


class _Evil:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))
