"""Shared pieces of the fault tests: the toy task of ``tests/toy_task.py`` through the real Trainer
(CPU, one thread), and ways to damage a checkpoint on disk (docs/method.md §4 "Verified checkpoints")."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: toy_task

from cmpt.train import OptimConfig, RunConfig, TrainConfig, Trainer
from cmpt.train.verify import MARKER, checksum_files, write_manifest
from toy_task import ToyTask

__all__ = ["MARKER", "ToyTask", "assert_same", "ckpt_dirs", "evil_pickle", "fit", "flip_byte", "reseal"]
__all__ += ["weights", "zero_block"]

OPTIM = OptimConfig(lr=3e-3, weight_decay=0.01, warmup_steps=2)


def fit(run_dir: Path, task: ToyTask | None = None, **train_kw) -> dict:
    """The toy task through the real Trainer: 8 steps, a checkpoint every 2, all kept."""
    kw = {
        "steps": 8,
        "save_every": 2,
        "keep_last": 0,
        "log_every": 4,
        "progress": False,
        "tensorboard": False,
    }
    kw.update(train_kw)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Trainer(RunConfig(dir=str(run_dir), seed=1), OPTIM, TrainConfig(**kw), task or ToyTask()).fit()
    finally:
        torch.set_num_threads(n)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def ckpt_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def flip_byte(path: Path, offset: int | None = None) -> int:
    """Flip every bit of one byte (the middle one by default): the size does not change."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return offset


def zero_block(path: Path, offset: int = 64 << 10, size: int = 4096) -> None:
    """Zero ``size`` bytes at ``offset`` (a lost 4 KiB disk block); the size does not change."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)


def reseal(ckpt: Path) -> None:
    """Rewrite the manifest to match the files as they are now (a tamperer who can write the run
    directory can do this too: the safe loaders must hold without the checksums)."""
    names = [p.name for p in ckpt.iterdir() if p.name != MARKER]
    write_manifest(ckpt, int(ckpt.name.split("_")[1]), 1, checksum_files(ckpt, names))


class _Payload:
    """Unpickling this runs ``open(path, "w")``: the file appears iff the pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_pickle(path: Path) -> bytes:
    """A pickle whose loading creates ``path``."""
    return pickle.dumps(_Payload(path))
