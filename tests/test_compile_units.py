"""``cmpt.train.compile.compile_units`` (``train.compile``; docs/method.md §6 "Compiled blocks"):
transformers' layers of different classes share one ``__call__`` frame and so dynamo's recompile
budget; with the budget raised per class, none of them falls back to eager."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from transformers.modeling_layers import GradientCheckpointingLayer

from cmpt.train.compile import PER_CLASS, compile_units


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


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()
