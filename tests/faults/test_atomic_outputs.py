"""Atomic output directories (cmpt.io_atomic): a crash while writing `final/` or a model directory
leaves the old one intact and loadable; loaders refuse directories that are being written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cmpt.io_atomic as io_atomic
from cmpt.io_atomic import COMPLETE_MARKER, WRITING_MARKER, IncompleteOutputError, atomic_directory
from cmpt.train import OptimConfig, RunConfig, TrainConfig, Trainer
from cmpt.vision.vit import NativeViT, NativeViTConfig
from toy_task import ToyTask

pytestmark = pytest.mark.usefixtures("one_thread")


def fit(run_dir: Path, task: ToyTask, steps: int, **train_kw) -> dict:
    train = TrainConfig(steps=steps, progress=False, tensorboard=False, **train_kw)
    return Trainer(RunConfig(dir=str(run_dir)), OptimConfig(lr=1e-3), train, task).fit()


def tiny_vit() -> NativeViT:
    cfg = NativeViTConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, pos_grid=4)
    return NativeViT(cfg)


def test_final_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    fit(tmp_path, ToyTask(), steps=2)
    final = tmp_path / "final"
    before = load_file(str(final / "model.safetensors"))
    marker = json.loads((final / COMPLETE_MARKER).read_text())
    assert marker["complete"] and marker["writer"] == "cmpt.train.Trainer" and marker["step"] == 2

    class CrashWhileSaving(ToyTask):
        def save_final(self, model, out_dir, state_dict):
            (Path(out_dir) / "vision.safetensors").write_text("half of the new model")
            raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        # one more step, then final/ rewritten (a finished run started again has nothing to do)
        fit(tmp_path, CrashWhileSaving(), steps=3, allow_change=["train.steps"])
    after = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the old final/, untouched
    assert not (final / "vision.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("final")) == ["final"]


def test_killed_writer_leaves_old_dir_loadable(tmp_path: Path) -> None:
    vit, out = tiny_vit(), tmp_path / "vit"
    vit.save_pretrained(out)
    # a writer killed mid-write (SIGKILL: no clean-up) leaves its temporary sibling behind
    code = (
        "import os, sys; from cmpt.io_atomic import atomic_directory\n"
        "with atomic_directory(sys.argv[1]) as d:\n"
        "    (d / 'config.json').write_text('{}'); os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True)
    assert proc.returncode == -9
    [stale] = [p for p in tmp_path.iterdir() if p.name.startswith("vit.tmp-")]
    assert (stale / WRITING_MARKER).is_file()
    loaded = NativeViT.from_pretrained(out)  # the complete old one (the stale sibling: a warning)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vit.state_dict().values()))
    with pytest.raises(IncompleteOutputError, match="incomplete output directory"):
        NativeViT.from_pretrained(stale)
    vit.save_pretrained(out)  # the next write removes the dead writer's leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit"]


def test_live_writer_blocks_loading(tmp_path: Path) -> None:
    out = tmp_path / "vit"
    tiny_vit().save_pretrained(out)
    tmp = tmp_path / f"vit.tmp-{os.getppid()}-abc123"  # a live process on this host is writing
    tmp.mkdir()
    info = {"writer": "test", "host": os.uname().nodename, "pid": os.getppid()}
    (tmp / WRITING_MARKER).write_text(json.dumps(info))
    with pytest.raises(IncompleteOutputError, match="is being replaced"):
        NativeViT.from_pretrained(out)


def test_crash_inside_save_pretrained_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, vit = tmp_path / "vit", tiny_vit()
    vit.save_pretrained(out)
    old = (out / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("killed while writing the weights")

    monkeypatch.setattr("cmpt.vision.vit_io.save_file", boom)
    with pytest.raises(RuntimeError, match="killed"):
        tiny_vit().save_pretrained(out)
    assert (out / "model.safetensors").read_bytes() == old and (out / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit"]


def test_legacy_and_foreign_directories_load(tmp_path: Path) -> None:
    vit = tiny_vit()
    vit.save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / COMPLETE_MARKER).unlink()  # as written before this change
    NativeViT.from_pretrained(tmp_path / "vit")
    io_atomic.check_loadable(tmp_path / "does-not-exist")  # nothing to refuse


def test_replace_drops_old_files_and_nests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with atomic_directory(out) as d:
        (d / "old_only.txt").write_text("x")
    for exchange in (True, False):  # renameat2 exchange, and the two-rename fallback
        if not exchange:
            monkeypatch.setattr(io_atomic, "_exchange", lambda a, b: False)
        with atomic_directory(out, writer="outer", step=3) as d:
            (d / "new.txt").write_text("y")
            with atomic_directory(d, writer="inner") as inner:  # nested: written in place
                assert inner == d
                (inner / "inner.txt").write_text("z")
        assert sorted(p.name for p in out.iterdir()) == [COMPLETE_MARKER, "inner.txt", "new.txt"]
        assert json.loads((out / COMPLETE_MARKER).read_text())["writer"] == "outer"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_vlm_rewrite_killed_at_the_llm_keeps_the_old_model(tmp_path: Path) -> None:
    """The reproduced fault: a re-write killed while writing the LLM held new vision/merger weights
    with old LLM weights, and from_pretrained loaded the mix."""
    from cmpt.vlm.model import VisionLanguageModel
    from vlm_fixtures import build_dirs, build_vlm

    vlm = build_vlm(build_dirs(tmp_path / "parts"))
    out = tmp_path / "final"
    vlm.save_pretrained(out)
    old_vit = {k: v.clone() for k, v in vlm.vit.state_dict().items()}
    marker = json.loads((out / COMPLETE_MARKER).read_text())
    assert marker["writer"] == "VisionLanguageModel.save_pretrained"
    with torch.no_grad():
        for p in vlm.vit.parameters():
            p.add_(1.0)  # "step 10" vision weights

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing llm/")

    vlm.llm.save_pretrained = killed
    with pytest.raises(KeyboardInterrupt):
        vlm.save_pretrained(out)
    again = VisionLanguageModel.from_pretrained(out)
    assert all(torch.equal(again.vit.state_dict()[k], v) for k, v in old_vit.items())  # no mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "parts"]


def test_atomic_file_replaces_whole_or_leaves_the_old_file(tmp_path: Path) -> None:
    """``atomic_file``: a write that raises leaves the old content and no temporary; a finished one
    replaces it; the temporary is hidden and of this process while written."""
    target = tmp_path / "sub" / "summary.json"
    with io_atomic.atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".") and str(os.getpid()) in tmp.name
        tmp.write_text("old")
        assert not target.exists()
    assert target.read_text() == "old"
    with pytest.raises(KeyboardInterrupt), io_atomic.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]
    with io_atomic.atomic_file(target, durable=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and len(list(target.parent.iterdir())) == 1


def test_atomic_file_removes_only_dead_writers_temporaries(tmp_path: Path) -> None:
    """A writer killed inside ``atomic_file`` leaves ``.<name>.<host>.<pid>.tmp``; the next write of
    the same file removes it, but not a live writer's, another file's or another host's."""
    import socket

    from cmpt.io_atomic import atomic_file

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    host, dead_pid = socket.gethostname(), int(dead.stdout)
    target = tmp_path / "summary.json"
    left = {
        "dead": tmp_path / f".summary.json.{host}.{dead_pid}.tmp",
        "live": tmp_path / f".summary.json.{host}.{os.getppid()}.tmp",
        "other file": tmp_path / f".other.json.{host}.{dead_pid}.tmp",
        "other host": tmp_path / f".summary.json.elsewhere.{dead_pid}.tmp",
    }
    for path in left.values():
        path.write_text("partial")
    with atomic_file(target) as tmp:
        tmp.write_text("{}")
    assert target.read_text() == "{}"
    assert {k for k, p in left.items() if p.exists()} == {"live", "other file", "other host"}
