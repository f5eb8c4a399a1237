"""Output paths never destroy the user's data: `cmpt export`, `cmpt encode`, `cmpt data check` and
`cmpt data synth` refuse an `--out` that is an input, a training run, a user's file or folder, with
one error line naming the path and the fix (cmpt.io_atomic.check_replaceable).
The CLI runs on tiny local models and data (the atomic-directory and trainer cases call them
directly); every test checks that nothing of the user's was touched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import hf_tiny
from cmpt import NativeViT, NativeViTConfig, VisionLanguageModel
from cmpt.cli import main
from cmpt.demo.synthetic import SYNTH_MARKER, generate
from cmpt.demo.tiny_lm import build_tiny_causal_lm, default_corpus, train_tokenizer
from cmpt.io_atomic import COMPLETE_MARKER, atomic_directory
from cmpt.train import OptimConfig, RunConfig, TrainConfig, Trainer
from cmpt.train.resume import ResumeError
from toy_task import ToyTask


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (hidden ones too) with a hash of its bytes."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def refused(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    """Run the CLI, expect exit 2 with one `cmpt ...: error:` line containing ``needles``."""
    assert main(argv) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if ": error: " in x]
    assert all(n in line for n in needles), line
    return line


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run-like directory: ``final/`` (a tiny VLM saved by cmpt), logs, a user's notes."""
    root = tmp_path_factory.mktemp("safety") / "run"
    tok = train_tokenizer(default_corpus(200), vocab_size=300)
    torch.manual_seed(0)
    cfg = NativeViTConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, pos_grid=4)
    vlm = VisionLanguageModel.build(NativeViT(cfg), build_tiny_causal_lm(tok, hidden_size=32), tok)
    vlm.save_pretrained(root / "final")
    (root / "metrics.jsonl").write_text('{"step": 1}\n')
    (root / "notes.txt").write_text("precious\n")
    return root


def test_atomic_directory_replaces_only_what_cmpt_may_discard(tmp_path, monkeypatch) -> None:
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "user" / "sub").mkdir(parents=True)
    (tmp_path / "user" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    for target, why in (("afile", "is a file"), ("user", "did not write")):
        with pytest.raises(FileExistsError, match=why), atomic_directory(tmp_path / target) as d:
            (d / "x").write_text("new")
    monkeypatch.chdir(tmp_path / "user" / "sub")  # "." was: "PosixPath('.') has an empty name"
    for target in (".", "..", str(tmp_path / "user")):
        with pytest.raises(FileExistsError, match="current directory"), atomic_directory(target):
            pass
    assert snapshot(tmp_path) == before
    (tmp_path / "empty").mkdir()
    for target in ("new", "new", "empty"):  # absent, a previous cmpt output, an empty directory
        with atomic_directory(tmp_path / target, writer="test") as d:
            (d / "x").write_text(target)
        assert (tmp_path / target / COMPLETE_MARKER).is_file() and (tmp_path / target / "x").is_file()


def test_training_keeps_its_final_and_refuses_a_users(tmp_path) -> None:
    def fit(run_dir: Path) -> dict:
        train = TrainConfig(steps=2, progress=False, tensorboard=False)
        return Trainer(RunConfig(dir=str(run_dir)), OptimConfig(lr=1e-3), train, ToyTask()).fit()

    fit(tmp_path / "r")
    first = json.loads((tmp_path / "r" / "final" / COMPLETE_MARKER).read_text())
    fit(tmp_path / "r")  # a rerun of the finished run: nothing to do, its final/ kept as it is
    again = json.loads((tmp_path / "r" / "final" / COMPLETE_MARKER).read_text())
    assert again == first
    (tmp_path / "u" / "final").mkdir(parents=True)
    (tmp_path / "u" / "final" / "mine.txt").write_text("precious")
    with pytest.raises(ResumeError, match="did not write"):  # at the start, before any step
        fit(tmp_path / "u")
    assert (tmp_path / "u" / "final" / "mine.txt").read_text() == "precious"
    assert not (tmp_path / "u" / "checkpoints").exists()


def test_export_refuses_to_destroy_the_source_or_user_files(run, tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "user" / "sub").mkdir(parents=True)
    (tmp_path / "user" / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    final = str(run / "final")
    before, mine = snapshot(run), snapshot(tmp_path)
    cases = [
        (run, "holds the source"),  # the run that holds final/: was wiped with exit 0
        (run / "final", "is the source"),
        (run / "final" / "export", "lies inside the source"),
        (tmp_path / "user", "did not write"),
        (tmp_path / "afile", "is a file"),
    ]
    for out, why in cases:
        refused(["export", final, "--out", str(out)], capsys, str(out), why, "choose a new")
    monkeypatch.chdir(tmp_path / "user")
    refused(["export", final, "--out", "."], capsys, "current directory")
    assert snapshot(run) == before and snapshot(tmp_path) == mine
    (tmp_path / "empty").mkdir()
    for out in ("new", "new", "empty"):  # absent, a previous export, an empty directory
        assert main(["export", final, "--out", str(tmp_path / out)]) == 0
        VisionLanguageModel.from_pretrained(tmp_path / out)
    assert snapshot(run) == before


def test_export_names_missing_paths_and_run_directories(run, tmp_path, capsys) -> None:
    missing = tmp_path / "nope"
    refused(["export", str(missing), "--out", str(tmp_path / "o")], capsys, f"{missing} does not exist")
    ckpt = run / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(b"")
    (ckpt / "trainer_state.json").write_text("{}")
    line = refused(["export", str(run), "--out", str(tmp_path / "o")], capsys, "training run directory")
    assert f"export {run / 'final'} or {ckpt}" in line
    assert not (tmp_path / "o").exists()


def test_convert_refuses_before_reading_the_release(tmp_path, capsys) -> None:
    """``cmpt convert official SRC OUT``: a user's folder at OUT, or OUT inside SRC, is refused
    before the release is read (SRC here is no release at all)."""
    src, user = tmp_path / "release", tmp_path / "mine"
    src.mkdir()
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    refused(["convert", "official", str(src), str(user)], capsys, str(user))
    assert (user / "notes.txt").read_text() == "precious"
    refused(["convert", "official", str(src), str(src / "out")], capsys, str(src))
    assert list(src.iterdir()) == []


def test_encode_out_never_replaces_an_input(tmp_path, monkeypatch, capsys) -> None:
    model = hf_tiny.save("dinov2", tmp_path)
    image = tmp_path / "im.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    (tmp_path / "feats").mkdir()
    before = snapshot(tmp_path)
    args = ["encode", "--model", str(model), str(image), "--quiet", "--out"]
    refused([*args, str(image)], capsys, "is the input image", "choose another file")
    refused([*args, str(model / "model.safetensors")], capsys, "file of the model directory")
    refused([*args, str(tmp_path / "feats")], capsys, "is a directory", "feats/features.safetensors")
    assert snapshot(tmp_path) == before  # nothing replaced, no feats.tmp left behind

    def disk_full(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cmpt.encode.save_file", disk_full)
    refused([*args, str(tmp_path / "f.safetensors")], capsys, "No space left")
    assert snapshot(tmp_path) == before  # the temporary file is removed


def test_data_check_out_never_replaces_an_input(tmp_path, capsys) -> None:
    data = generate("scenes", 2, tmp_path / "d")
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"datasets:\n  - {{path: {data}}}\n")
    before = snapshot(tmp_path)
    for spec, out in ((data, data), (mix, mix), (mix, data)):  # the file checked, a mixture member
        refused(["data", "check", str(spec), "--out", str(out)], capsys, "is the input data file")
    refused(["data", "check", str(data), "--out", str(tmp_path / "d")], capsys, "is a directory")
    assert snapshot(tmp_path) == before
    assert main(["data", "check", str(data), "--out", str(tmp_path / "bad.jsonl")]) == 0


def test_synth_writes_only_its_own_directories(tmp_path, capsys) -> None:
    user = tmp_path / "userdata"
    user.mkdir()
    (user / "train.json").write_text('[{"id": "mine"}]')
    (user / "train.jsonl").write_text('{"id": "mine"}\n')
    before = snapshot(tmp_path)
    for kind in ("scenes", "passages", "retrieval", "moca"):
        refused(["data", "synth", "--kind", kind, "--n", "2", "--out", str(user)], capsys, "not written by")
    into_file = ["data", "synth", "--kind", "scenes", "--n", "1", "--out", str(user / "train.json")]
    refused(into_file, capsys, "is a file")
    assert snapshot(tmp_path) == before
    out = ["data", "synth", "--kind", "scenes", "--out", str(tmp_path / "gen")]
    assert main([*out, "--n", "1"]) == 0 and main([*out, "--n", "2"]) == 0  # a rerun rewrites its own
    assert (tmp_path / "gen" / SYNTH_MARKER).is_file()
    assert len(json.loads((tmp_path / "gen" / "train.json").read_text())) == 2
    cache = tmp_path / "cache"  # the demo's data cache (README: `cmpt data synth ... --out` it)
    cache.mkdir()
    (cache / COMPLETE_MARKER).write_text("{}")
    assert main(["data", "synth", "--kind", "passages", "--n", "2", "--out", str(cache)]) == 0


def test_nproc_per_node_must_be_positive(capsys) -> None:
    """``--nproc-per-node 0`` was silently a single-process run."""
    with pytest.raises(SystemExit) as e:
        main(["train", "tiny/comp_stage1", "--nproc-per-node", "0"])
    assert e.value.code == 2 and "expected an integer >= 1, got '0'" in capsys.readouterr().err
