"""``cmpt.train.compile.compile_units`` (``train.compile``; docs/method.md §6 "Compiled blocks"):
transformers' layers of different classes share one ``__call__`` frame and so dynamo's recompile
budget; with the budget raised per class, none of them falls back to eager. And a packed stage-II
run compiles without reaching that budget (varlen attention as one operator)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch._dynamo
from transformers.modeling_layers import GradientCheckpointingLayer

from cmpt.recipes import run_recipe
from cmpt.train.compile import PER_CLASS, compile_units
from comp_fixtures import make_tiny_setup, overrides
from fsdp_runs import losses, stage2_sets


class Doubler(GradientCheckpointingLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Shifter(GradientCheckpointingLayer):
    def forward(self, x: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
        return x + shift


def _limit_warnings(caplog, compile_all) -> list[str]:
    """Compile one unit of each class, call each with 5 tensor ranks (a version each); the dynamo
    warnings that a frame hit its recompile limit."""
    torch._dynamo.reset()
    units = [Doubler(), Shifter()]
    compile_all(units)
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for rank in range(1, 6):
            x = torch.ones((2,) * rank)
            assert torch.equal(units[0](x), 2 * x) and torch.equal(units[1](x), x + 1)
    torch._dynamo.reset()
    return [r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage()]


@torch._dynamo.config.patch(recompile_limit=8)
def test_budget_per_class_keeps_every_version_compiled(caplog) -> None:
    # control: plain per-module compile shares the 8 versions of the one frame (10 needed)
    assert _limit_warnings(caplog, lambda us: [u.compile(backend="eager") for u in us])
    caplog.clear()
    assert _limit_warnings(caplog, lambda us: compile_units(us, backend="eager")) == []
    assert torch._dynamo.config.recompile_limit == 2 * PER_CLASS


@torch._dynamo.config.patch(recompile_limit=64)
def test_never_lowers_a_larger_limit() -> None:
    compile_units([Doubler(), Doubler()], backend="eager")
    assert torch._dynamo.config.recompile_limit == 64


@pytest.mark.slow
def test_packed_stage2_compiles_once_for_all_layouts(tmp_path: Path) -> None:
    """Tiny CoMP stage II with several sequences and images per micro-batch, ``train.compile``
    (inductor) for 24 steps: no block reaches dynamo's recompile limit (the per-segment loop did
    after ~20 steps: 26 recompilations) and the losses are eager's."""
    setup = make_tiny_setup(tmp_path / "setup")
    run_recipe("tiny/comp_stage1", overrides(setup, tmp_path / "s1", steps=2))
    once = {"train.save_every": 0}
    run_recipe("tiny/comp_stage2", stage2_sets(setup, tmp_path, "eager", 24, 1, **once))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        run_recipe(
            "tiny/comp_stage2",
            stage2_sets(setup, tmp_path, "compiled", 24, 1, **once, **{"train.compile": True}),
        )
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()
