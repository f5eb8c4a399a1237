"""Resume rules (cmpt.train.resume): which checkpoint a run continues from, which config changes it
refuses (listed old → new) or accepts (and then applies: the schedule is rebuilt from the config),
data fingerprints, the run history, and `--set key={cache}/x`. Single process, toy task."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cmpt.config import load_config, to_dict
from cmpt.recipes.comp import CompConfig
from cmpt.train import OptimConfig, RunConfig, TrainConfig, Trainer
from cmpt.train.config_diff import covered, diff_configs
from cmpt.train.optim import lr_factor
from cmpt.train.resume import ResumeError
from toy_task import ToyTask

OPTIM = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=2, schedule="cosine")


class DefaultLR(ToyTask):
    """The toy task with groups that take ``optim.lr`` (as a recipe part without its own lr)."""

    def param_groups(self) -> list[dict]:
        return [{k: v for k, v in g.items() if k != "lr"} for g in super().param_groups()]


pytestmark = pytest.mark.usefixtures("one_thread")


def fit(run_dir: Path, task=None, optim: OptimConfig = OPTIM, data: dict | None = None, **train_kw) -> dict:
    kw = {"steps": 8, "log_every": 1, "progress": False, "tensorboard": False, **train_kw}
    run, train = RunConfig(dir=str(run_dir), seed=1), TrainConfig(**kw)
    full = None
    if data is not None:  # a recipe-like config with a data section (fingerprinted)
        full = {"run": to_dict(run), "optim": to_dict(optim), "train": to_dict(train), "data": data}
    return Trainer(run, optim, train, task or DefaultLR(), full_config=full).fit()


def lrs(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["lr/body"] for r in map(json.loads, lines)}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def history(run_dir: Path) -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((run_dir / "history").glob("*.yaml"))]


def stopped_run(run_dir: Path, steps: int = 8, at: int = 4, **kw) -> dict:
    """A run stopped by SIGTERM after step ``at`` (checkpoint saved)."""
    s = fit(run_dir, DefaultLR(signal_at=at - 1), steps=steps, **kw)
    assert s["stopped"] and s["step"] == at and s["exit_code"] == 75
    return s


def test_changed_lr_is_refused_naming_the_key(tmp_path: Path) -> None:
    stopped_run(tmp_path)
    before = sorted(p.name for p in (tmp_path / "history").iterdir())
    with pytest.raises(ResumeError) as e:
        fit(tmp_path, optim=OptimConfig(lr=2e-3, weight_decay=0.01, warmup_steps=2, schedule="cosine"))
    msg = str(e.value)
    assert "optim.lr: 0.001 → 0.002" in msg and "--allow-change optim.lr" in msg and "step 4" in msg
    assert sorted(p.name for p in (tmp_path / "history").iterdir()) == before  # nothing recorded
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 1e-3  # not claimed
    with pytest.raises(ResumeError, match=r"match no change, mistyped\?: optim\.lrr"):
        fit(
            tmp_path,
            optim=OptimConfig(lr=2e-3, weight_decay=0.01, warmup_steps=2, schedule="cosine"),
            allow_change=["optim.lrr"],
        )


def test_allowed_lr_and_steps_take_effect(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stopped_run(tmp_path, steps=8, at=4)
    new = OptimConfig(lr=2e-3, weight_decay=0.01, warmup_steps=2, schedule="cosine")
    with caplog.at_level(logging.INFO, logger="cmpt.train"):
        s = fit(tmp_path, optim=new, steps=12, allow_change=["optim.lr", "train"])
    assert s["resumed_from"] == 4 and s["step"] == 12 and s["exit_code"] == 0
    assert "resuming from step 4 of" in caplog.text and "optim.lr, train.steps" in caplog.text
    got = lrs(tmp_path)
    for step in range(5, 13):  # the lr of step k is a fresh scheduler's (new lr, 12 steps) at k - 1
        assert got[step] == pytest.approx(2e-3 * lr_factor(step - 1, new, 12), rel=1e-12), step
    assert got[4] == pytest.approx(1e-3 * lr_factor(3, OPTIM, 8))  # before the change
    entry = history(tmp_path)[-1]
    assert entry["resumed_from"]["step"] == 4 and entry["resume"] == "auto"
    assert entry["allowed_changes"]["optim.lr"] == {"old": 1e-3, "new": 2e-3}
    assert entry["allowed_changes"]["train.steps"] == {"old": 8, "new": 12}
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 2e-3
    state = json.loads(next((tmp_path / "checkpoints").glob("step_000012/trainer_state.json")).read_text())
    assert state["config"]["optim"]["lr"] == 2e-3  # the next resume compares with the new config


def test_weight_decay_change_reaches_the_optimizer(tmp_path: Path) -> None:
    stopped_run(tmp_path)
    new = OptimConfig(lr=1e-3, weight_decay=0.2, warmup_steps=2, schedule="cosine")
    trainer = Trainer(
        RunConfig(dir=str(tmp_path), seed=1),
        new,
        TrainConfig(steps=8, progress=False, tensorboard=False, allow_change=["optim.weight_decay"]),
        DefaultLR(),
    )
    trainer.fit()
    decayed = {g["name"]: g["weight_decay"] for g in trainer.optimizer.param_groups}
    assert decayed["body"] == 0.2 and decayed["body.no_decay"] == 0.0


def test_copied_run_dir_resumes_silently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fit(tmp_path / "straight", DefaultLR())
    stopped_run(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        s = fit(tmp_path / "b")
    assert s["resumed_from"] == 4 and not caplog.records, caplog.text  # run.dir is not compared
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reordered_data_file_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    rows = [json.dumps({"id": i, "text": f"sample {i}"}) for i in range(6)]
    data.write_text("\n".join(rows) + "\n")
    spec = {"path": str(data), "max_text_tokens": 64}
    stopped_run(tmp_path / "run", data=spec)
    data.write_text(data.read_text())  # rewritten with the same content: accepted (no mtimes)
    s = fit(tmp_path / "run", DefaultLR(signal_at=5), data=spec)
    assert (s["resumed_from"], s["step"], s["stopped"]) == (4, 6, True)
    data.write_text("\n".join(reversed(rows)) + "\n")
    with pytest.raises(ResumeError, match=r"data\.path\[content\]: \"sha256 [0-9a-f]+, \d+ B\" → "):
        fit(tmp_path / "run", data=spec)
    s = fit(tmp_path / "run", data=spec, allow_change=["data"])
    assert s["step"] == 8 and "data.path[content]" in history(tmp_path / "run")[-1]["allowed_changes"]


def test_mixture_members_are_fingerprinted(tmp_path: Path) -> None:
    from cmpt.train.fingerprint import data_fingerprint

    (tmp_path / "a.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    (tmp_path / "mix.yaml").write_text("datasets:\n  - path: a.jsonl\n    weight: 2\n")
    fp = data_fingerprint({"data": {"path": str(tmp_path / "mix.yaml"), "oversize": "skip"}})
    assert sorted(fp) == ["data.path[a.jsonl]", "data.path[content]"]
    (tmp_path / "a.jsonl").write_text('{"id": 2}\n{"id": 1}\n')
    fp2 = data_fingerprint({"data": {"path": str(tmp_path / "mix.yaml")}})
    assert (
        fp2["data.path[a.jsonl]"] != fp["data.path[a.jsonl]"]
        and fp2["data.path[content]"] == fp["data.path[content]"]
    )


def test_resume_never(tmp_path: Path) -> None:
    s = fit(tmp_path / "fresh", steps=2, resume="never")
    assert s["resumed_from"] is None and s["exit_code"] == 0
    with pytest.raises(
        ResumeError, match=r"already has checkpoints \(step_000002\).*--resume auto.*run\.dir"
    ):
        fit(tmp_path / "fresh", steps=2, resume="never")


def test_resume_from_a_path(tmp_path: Path) -> None:
    fit(tmp_path / "straight", DefaultLR())
    stopped_run(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step_000004"
    s = fit(tmp_path / "b", resume=str(ckpt))
    assert s["resumed_from"] == 4 and s["resume"]["checkpoint"] == str(ckpt.resolve())
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = fit(tmp_path / "b", resume=str(ckpt))  # the same command rerun: b's own newest (finished)
    assert again["resume"]["step"] == 8 and again["nothing_to_do"] is True
    s = fit(tmp_path / "c", resume=str(tmp_path / "a"))  # a run directory: its newest checkpoint
    assert s["resumed_from"] == 4
    with pytest.raises(ResumeError, match="step_000099 does not exist"):
        fit(tmp_path / "d", resume=str(tmp_path / "a" / "checkpoints" / "step_000099"))
    with pytest.raises(ResumeError, match="is not a complete checkpoint"):  # there, but not one
        fit(tmp_path / "d", resume=str(tmp_path / "a" / "history"))
    fit(tmp_path / "e", steps=8)
    with pytest.raises(ResumeError, match="has newer checkpoints"):
        fit(tmp_path / "e", resume=str(ckpt))


def test_history_is_appended(tmp_path: Path) -> None:
    (tmp_path).mkdir(exist_ok=True)
    (tmp_path / "config.yaml").write_text("optim: {lr: 0.5}\n")  # a run from before the history
    stopped_run(tmp_path)
    fit(tmp_path)
    entries = history(tmp_path)
    assert len(entries) == 3 and entries[0]["config"] == {"optim": {"lr": 0.5}}
    assert entries[1]["resumed_from"] is None and entries[2]["resumed_from"]["step"] == 4
    assert entries[2]["config"] == yaml.safe_load((tmp_path / "config.yaml").read_text())


def test_diff_and_prefixes() -> None:
    old = {"stage": {"lr": {"vision": 1e-4}}, "run": {"dir": "a"}, "train": {"log_every": 1, "steps": 3}}
    new = {
        "stage": {"lr": {"vision": 2e-4, "merger": 1e-3}},
        "run": {"dir": "b"},
        "train": {"log_every": 5, "steps": 3},
    }
    assert diff_configs(old, new) == {
        "stage.lr.merger": ["(absent)", 1e-3],
        "stage.lr.vision": [1e-4, 2e-4],
    }
    assert covered("stage.lr.vision", ["stage.lr"]) and covered("data.path[a.jsonl]", ["data.path"])
    assert not covered("stage.lrx", ["stage.lr"])


def test_set_cache_path_needs_no_quotes() -> None:
    cfg = load_config(
        CompConfig, None, ["data.path={cache}/tiny/x.json", "train.resume={cache}/r/ckpt", "run.name=2024"]
    )
    assert (
        cfg.data.path == "{cache}/tiny/x.json"
        and cfg.train.resume == "{cache}/r/ckpt"
        and cfg.run.name == "2024"
    )
    cfg = load_config(CompConfig, None, ["train.allow_change=[optim.lr, stage.lr]", 'model.init="{cache}/q"'])
    assert cfg.train.allow_change == ["optim.lr", "stage.lr"] and cfg.model.init == "{cache}/q"


def test_hub_snapshot_and_split_paths_are_fingerprinted(tmp_path: Path) -> None:
    """A hub snapshot keeps its parquet files below the root (``data/train-*.parquet``) and a split is
    named as ``PATH#SPLIT``: an edited file below the root changes the digest."""
    from cmpt.train.fingerprint import data_fingerprint

    (tmp_path / "hub" / "data").mkdir(parents=True)
    part = tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"
    part.write_bytes(b"rows v1")
    (tmp_path / "hub" / "README.md").write_text("card")  # not data
    fp = data_fingerprint({"data": {"path": str(tmp_path / "hub") + "#train"}})
    assert fp["data.path[content]"].endswith("of 1 files")
    part.write_bytes(b"rows v2")
    assert data_fingerprint({"data": {"path": str(tmp_path / "hub") + "#train"}}) != fp


@pytest.mark.parametrize("recipe", ["tiny/comp_stage2", "tiny/moca_cpt", "tiny/moca_cl"])
def test_recipe_implementation_switches_never_block_a_resume(recipe: str) -> None:
    """Each recipe names its same-math switches (attention kernels, LM-loss implementation,
    GradCache chunking, the length cache's place) as ``Task.resume_ignored_keys``: every one is a
    key of its config, and changing them all leaves nothing for the resume rule to refuse."""
    from cmpt.recipes import load_recipe
    from cmpt.train.config_diff import IGNORED_KEYS, flatten

    cfg, task_cls = load_recipe(recipe)
    own = task_cls.resume_ignored_keys
    old = to_dict(cfg)
    keys = flatten(old)
    assert own and all(k in keys for k in own), [k for k in own if k not in keys]
    new = yaml.safe_load(yaml.safe_dump(old))
    for key in own:
        section, name = key.split(".")
        new[section][name] = {str: "changed", int: 7}.get(type(new[section][name]), "changed")
    assert diff_configs(old, new, (*IGNORED_KEYS, *own)) == {}
    assert set(diff_configs(old, new)) == set(own)  # the trainer's own keys do not cover them
