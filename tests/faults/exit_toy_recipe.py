"""A toy recipe behind the real `cmpt train` command line, for exit-code and resume tests.

``python tests/faults/exit_toy_recipe.py train RECIPE.yaml [cmpt train flags]`` is ``cmpt train``
with one more recipe, ``recipe: toy`` (the trainer's toy task, tests/toy_task.py); ``toy.sleep``
slows each micro-batch so that a test can signal a run while it trains. Under
``python -m cmpt.launch ... tests/faults/exit_toy_recipe.py train ...`` it is a torchrun worker.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmpt.train import OptimConfig, RunConfig, TrainConfig
from toy_task import ToyTask


@dataclass
class ToySection:
    seed: int = 0
    sleep: float = 0.0


@dataclass
class ToyData:
    path: str = ""


@dataclass
class ToyConfig:
    recipe: Literal["toy"] = "toy"
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    toy: ToySection = field(default_factory=ToySection)
    data: ToyData = field(default_factory=ToyData)


class ToyRecipeTask(ToyTask):
    """The toy task built from a :class:`ToyConfig` (group lrs: ``optim.lr``, head ×2)."""

    resume_ignored_keys = ("toy.sleep",)  # only slows the run down

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__(seed=cfg.toy.seed, lr=cfg.optim.lr)
        self.sleep = cfg.toy.sleep

    def compute_loss(self, model, batch):
        if self.sleep:
            time.sleep(self.sleep)
        return super().compute_loss(model, batch)


def register() -> None:
    """Add ``toy`` to :func:`cmpt.recipes.recipes` (in this process)."""
    import cmpt.recipes as recipes

    if "toy" not in recipes.recipes():
        base = recipes.recipes
        recipes.recipes = lambda: {**base(), "toy": (ToyConfig, ToyRecipeTask)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    register()
    from cmpt.cli import main

    sys.exit(main())
