"""The generic trainer, single process on CPU: learning, exact resumption, faults, schedule, groups."""

from __future__ import annotations

import json
import logging
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from cmpt.config import ConfigError, load_config
from cmpt.train import BadDataError, LossTerms, NonFiniteError, OptimConfig, RunConfig, TrainConfig, Trainer
from cmpt.train.checkpoint import MARKER, get_rng_state, set_rng_state
from cmpt.train.optim import build_optimizer, group_names, lr_factor, resolve_groups
from cmpt.train.step import StepRunner
from toy_task import ToyModel, ToyTask, ToyTaskPrecount

pytestmark = pytest.mark.usefixtures("one_thread")


def fit(run_dir: Path, task: ToyTask | None = None, optim: OptimConfig | None = None, **train_kw) -> dict:
    kw = {"steps": 12, "log_every": 4, "progress": False, "tensorboard": False, **train_kw}
    optim = optim or OptimConfig(lr=3e-3, weight_decay=0.01, warmup_steps=2)
    return Trainer(RunConfig(dir=str(run_dir), seed=1), optim, TrainConfig(**kw), task or ToyTask()).fit()


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_falls_and_outputs(tmp_path: Path) -> None:
    s = fit(tmp_path, steps=40, log_every=10, grad_accum=2, save_every=20)
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [10, 20, 30, 40]
    assert recs[-1]["loss"] < 0.7 * recs[0]["loss"]
    assert s["step"] == 40 and not s["stopped"] and s["skipped_steps"] == 0 and s["resumed_from"] is None
    r = recs[-1]
    assert {"loss/mse", "loss/aux", "lr/body", "lr/head.no_decay", "grad_norm", "metric/pred_mean"} <= set(r)
    assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["samples"] > 0 and r["eta_s"] == 0.0
    assert r["loss"] == pytest.approx(r["loss/mse"] + 0.5 * r["loss/aux"], rel=0.2)  # interval means
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 40 and cfg["optim"]["betas"] == [0.9, 0.999]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_000020", "step_000040"]
    assert (tmp_path / "checkpoints/step_000040" / MARKER).is_file()
    w = weights(tmp_path)
    assert "embed.weight" in w and "blocks.1.fc2.weight" in w  # full model, frozen part included
    assert torch.equal(w["embed.weight"], ToyTask().model.embed.weight)  # frozen: untouched


def test_resume_is_bitwise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    optim = OptimConfig(lr=3e-3, weight_decay=0.01, schedule="constant")
    fit(tmp_path / "straight", ToyTask(dropout=0.2), optim, steps=12, log_every=3)
    fit(tmp_path / "resumed", ToyTask(dropout=0.2), optim, steps=7, log_every=3)
    with caplog.at_level(logging.INFO, logger="cmpt.train"):
        s = fit(
            tmp_path / "resumed",
            ToyTask(dropout=0.2),
            optim,
            steps=12,
            log_every=3,
            allow_change=["train.steps"],
        )
    assert s["resumed_from"] == 7 and s["step"] == 12
    assert "allowed changes: train.steps" in caplog.text  # train.steps changed: refused unless allowed
    assert_same(weights(tmp_path / "resumed"), weights(tmp_path / "straight"))
    steps = [r["step"] for r in records(tmp_path / "resumed")]
    assert steps == [3, 6, 7, 9, 12]
    straight = {r["step"]: r for r in records(tmp_path / "straight")}
    assert records(tmp_path / "resumed")[-1]["loss"] == straight[12]["loss"]


def test_streaming_and_deferred_accumulation_agree(tmp_path: Path) -> None:
    fit(tmp_path / "a", ToyTask(), steps=5, grad_accum=3)
    fit(tmp_path / "b", ToyTaskPrecount(), steps=5, grad_accum=3)
    assert_same(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_incomplete_checkpoints_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fit(tmp_path / "ref", steps=6)
    run = tmp_path / "run"
    fit(run, steps=6, save_every=3, keep_last=0)
    assert [r["step"] for r in records(run)] == [3, 4, 6]  # a checkpoint step is logged too
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1')  # a line cut by a crash
    ckpts = run / "checkpoints"
    (ckpts / "step_000006" / MARKER).unlink()  # its marker removed: set aside, never loaded
    (ckpts / "step_000009.tmp").mkdir()  # as if killed while writing
    (ckpts / "step_000009.tmp" / "junk").write_text("x")
    with caplog.at_level(logging.WARNING, logger="cmpt.train"):
        s = fit(run, steps=6, save_every=3, keep_last=0)
    assert s["resumed_from"] == 3
    assert caplog.text.count("removing incomplete checkpoint") == 1
    assert "step_000006 has no COMPLETE marker" in caplog.text
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000003", "step_000006", "step_000006.damaged"]
    assert_same(weights(run), weights(tmp_path / "ref"))
    assert [r["step"] for r in records(run)] == [3, 4, 6]  # steps 4 and 6 were logged again, once


def test_keep_last_prunes(tmp_path: Path) -> None:
    fit(tmp_path, steps=8, save_every=2, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000006", "step_000008"]


def test_nonfinite_step_is_skipped(tmp_path: Path) -> None:
    optim = OptimConfig(lr=3e-3, schedule="constant")
    fit(tmp_path / "three", ToyTask(), optim, steps=3)
    s = fit(tmp_path / "four", ToyTask(nan_at=frozenset({3})), optim, steps=4, log_every=1)
    assert s["skipped_steps"] == 1
    assert_same(weights(tmp_path / "four"), weights(tmp_path / "three"))  # step 4 changed nothing
    rec = records(tmp_path / "four")[-1]
    assert rec["step"] == 4 and rec["skipped_steps"] == 1


def test_nonfinite_aborts_after_max(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match="max_nonfinite = 1"):
        fit(tmp_path, ToyTask(nan_at=frozenset({1, 3})), steps=6, max_nonfinite=1)


def test_sigterm_saves_and_resume_matches(tmp_path: Path) -> None:
    optim = OptimConfig(lr=3e-3, weight_decay=0.01, warmup_steps=3, schedule="cosine")
    fit(tmp_path / "straight", ToyTask(dropout=0.1), optim, steps=10)
    previous = signal.getsignal(signal.SIGTERM)
    first = fit(tmp_path / "run", ToyTask(dropout=0.1, signal_at=8), optim, steps=10, grad_accum=2)
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert first["stopped"] and first["step"] == 5  # micro-batch 8 belongs to step 5
    assert first["final"] is None and (tmp_path / "run/checkpoints/step_000005" / MARKER).is_file()
    assert not (tmp_path / "run/final").exists()
    second = fit(tmp_path / "run", ToyTask(dropout=0.1), optim, steps=10, grad_accum=2)
    assert second["resumed_from"] == 5 and not second["stopped"]
    fit(tmp_path / "straight2", ToyTask(dropout=0.1), optim, steps=10, grad_accum=2)
    assert_same(weights(tmp_path / "run"), weights(tmp_path / "straight2"))


def test_second_sigint_aborts(tmp_path: Path) -> None:
    trainer = Trainer(RunConfig(dir=str(tmp_path)), OptimConfig(), TrainConfig(), ToyTask())
    trainer._on_signal(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        trainer._on_signal(signal.SIGINT, None)


def test_bad_sample_fraction(tmp_path: Path) -> None:
    strict = {"max_bad_fraction": 0.05, "bad_check_min_samples": 50}
    with pytest.raises(BadDataError, match=r"> train\.max_bad_fraction = 5\.00%.*cmpt data check"):
        fit(tmp_path / "strict", ToyTask(bad_every=3), steps=40, **strict)
    s = fit(tmp_path / "lenient", ToyTask(bad_every=3), steps=12, max_bad_fraction=0.5)
    assert s["bad_samples"] == 4  # micro-batches 0, 3, 6, 9
    s = fit(tmp_path / "early", ToyTask(bad_every=3), steps=12, max_bad_fraction=0.05)
    assert s["bad_samples"] == 4  # 13% bad, but fewer than train.bad_check_min_samples read


def test_weight_decay_groups() -> None:
    model = ToyModel()
    task = ToyTask()
    task.model = model
    named = group_names(model, task.param_groups())
    groups = resolve_groups(model, named, OptimConfig(weight_decay=0.1))
    by_name = {g["name"]: g for g in groups}
    assert sorted(by_name) == ["body", "body.no_decay", "head", "head.no_decay"]
    ids = {id(p): n for n, p in model.named_parameters()}
    names = {g: sorted(ids[id(p)] for p in by_name[g]["params"]) for g in by_name}
    decayed = [f"blocks.{i}.fc{j}.weight" for i in (0, 1) for j in (1, 2)]
    assert names["body"] == [*decayed, "proj.weight"]
    assert "pos_embed" in names["body.no_decay"] and "blocks.0.norm.weight" in names["body.no_decay"]
    assert names["head"] == ["head.weight"] and names["head.no_decay"] == ["head.bias"]
    assert by_name["body"]["weight_decay"] == 0.1 and by_name["body.no_decay"]["weight_decay"] == 0.0
    assert by_name["head"]["lr"] == by_name["head.no_decay"]["lr"] == 2 * task.lr
    assert all("embed.weight" not in v for v in names.values())  # frozen
    opt = build_optimizer(groups, OptimConfig(weight_decay=0.1))
    assert [g["name"] for g in opt.param_groups] == [g["name"] for g in groups]


def test_param_group_errors() -> None:
    model = ToyModel()
    with pytest.raises(ValueError, match="is in param groups"):
        group_names(model, [{"params": [model.head.weight]}, {"params": [model.head.weight]}])
    with pytest.raises(ValueError, match="not a parameter"):
        group_names(model, [{"params": [torch.zeros(2)]}])


def test_schedule_values() -> None:
    cos = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cos, 14) for s in (0, 2, 4)] == [0.0, 0.5, 1.0]
    assert lr_factor(9, cos, 14) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(14, cos, 14) == pytest.approx(0.1)
    lin = OptimConfig(warmup_ratio=0.2, schedule="linear")  # 2 of 10 steps
    assert [lr_factor(s, lin, 10) for s in (1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 0.5, 0.0])
    const = OptimConfig(warmup_steps=2, schedule="constant")
    assert [lr_factor(s, const, 10) for s in (0, 1, 5)] == [0.0, 0.5, 1.0]


def test_schedule_reaches_the_optimizer(tmp_path: Path) -> None:
    optim = OptimConfig(lr=1e-3, warmup_steps=3, schedule="cosine")
    fit(tmp_path, ToyTask(lr=1e-3), optim, steps=8, log_every=1)
    for r in records(tmp_path):
        expected = 1e-3 * lr_factor(r["step"] - 1, optim, 8)  # the lr used by that step
        assert r["lr/body"] == pytest.approx(expected) and r["lr/head"] == pytest.approx(2 * expected)


def test_activation_checkpointing_matches(tmp_path: Path) -> None:
    fit(tmp_path / "plain", ToyTask(dropout=0.1), steps=4)
    fit(tmp_path / "ac", ToyTask(dropout=0.1), steps=4, activation_checkpointing=True)
    assert_same(weights(tmp_path / "ac"), weights(tmp_path / "plain"))


def test_save_final_hook(tmp_path: Path) -> None:
    calls = []

    class WithHook(ToyTask):
        def save_final(self, model, out_dir, state_dict):
            calls.append((model, Path(out_dir), sorted(state_dict)))

    task = WithHook()
    fit(tmp_path, task, steps=2)
    [(model, out, keys)] = calls
    assert model is task.model and "embed.weight" in keys
    assert out.parent == tmp_path and out.name.startswith("final.tmp-")  # swapped in once complete
    assert not (tmp_path / "final" / "model.safetensors").exists()


def test_tensorboard_events(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    fit(tmp_path, steps=2, log_every=1, tensorboard=True)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    s = fit(tmp_path, steps=3, precision="bf16")
    assert s["loss"] == s["loss"] and weights(tmp_path)["head.weight"].dtype == torch.float32


def test_config_sections_load_and_validate() -> None:
    cfg = load_config(TrainConfig, {"steps": "1e3", "dist": "fsdp"})
    assert cfg.steps == 1000 and cfg.dist == "fsdp"
    assert load_config(OptimConfig, {"clip_grad": None}).clip_grad is None
    with pytest.raises(ConfigError, match="grad_accum"):
        load_config(TrainConfig, {"grad_accum": 0})
    with pytest.raises(ConfigError, match="schedule"):
        load_config(OptimConfig, {"schedule": "step"})


@pytest.mark.slow
def test_compile_and_checkpointing_match(tmp_path: Path) -> None:
    # fp32 on every device: under bf16 autocast (the CUDA default) fusion legitimately moves roundings
    fit(tmp_path / "plain", steps=3, precision="fp32")
    fit(tmp_path / "compiled", steps=3, precision="fp32", compile=True, activation_checkpointing=True)
    a, b = weights(tmp_path / "compiled"), weights(tmp_path / "plain")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_wandb_without_the_package_is_an_error_at_start(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="wandb is not installed"):
        load_config(TrainConfig, {"wandb": True})
    assert load_config(TrainConfig, {"wandb": False}).wandb is False


class _HalfAuxInTheSum(ToyTask):
    """ToyTask with its ``aux`` weight 0.5 moved into the term's sum (weight 1.0)."""

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        t = super().compute_loss(model, batch)
        sums = {"mse": t.sums["mse"], "aux": 0.5 * t.sums["aux"]}
        return LossTerms(sums=sums, counts=t.counts, weights={"mse": 1.0, "aux": 1.0}, metrics=t.metrics)


def test_term_weights_scale_the_gradient(tmp_path: Path) -> None:
    """A term's weight reaches the gradient, not only the logged loss: weight 0.5 trains as the
    term's sum halved (the runs differ when the weights are left out of the backward)."""
    optim = OptimConfig(lr=3e-3, schedule="constant")
    fit(tmp_path / "a", ToyTask(), optim, steps=4)
    fit(tmp_path / "b", _HalfAuxInTheSum(), optim, steps=4)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_rng_state_round_trips_every_generator() -> None:
    """Python's, numpy's and torch's global generators draw the same after a restore (a task may
    draw from any of them)."""
    state = get_rng_state()
    draws = (np.random.rand(3).tolist(), random.random(), torch.rand(3).tolist())
    set_rng_state(state)
    assert (np.random.rand(3).tolist(), random.random(), torch.rand(3).tolist()) == draws


@pytest.mark.parametrize("clip", [None, 1e-4])
def test_step_grad_norm_is_the_norm_and_clipping_uses_it(clip) -> None:
    """The step's one read-back gives the gradient norm itself, and clipping scales by it."""
    task = ToyTask()
    params = [p for p in task.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    seen = []
    opt.register_step_pre_hook(
        lambda *_: seen.append(
            float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        )
    )
    runner = StepRunner(
        task, task.model, opt, mode="none", device=torch.device("cpu"), world_size=1,
        grad_accum=1, clip_grad=clip, amp=None,
    )  # fmt: skip
    res = runner.run([next(iter(task.build_loader(0, 1)))], 0, 0, lambda: False)
    assert res.grad_norm > 1e-2 and not res.nonfinite
    assert seen[0] == pytest.approx(res.grad_norm if clip is None else clip, rel=1e-3)
