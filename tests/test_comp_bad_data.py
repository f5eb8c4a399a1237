"""A CoMP training run over a corpus of broken inputs completes and counts exactly the bad samples
its loader skipped (docs/method.md §4: skip, count, fail only above the configured fraction)."""

from __future__ import annotations

import itertools

import pytest

from broken_corpus import build_broken_corpus
from cmpt.recipes import load_recipe
from cmpt.recipes.comp import CompTask
from cmpt.train.loop import Trainer
from comp_fixtures import make_tiny_setup, overrides

pytestmark = pytest.mark.slow
STEPS = 8


def test_training_over_broken_corpus_counts_skips(tmp_path):
    setup = make_tiny_setup(tmp_path / "tiny", n=4)
    corpus = build_broken_corpus(tmp_path)
    sets = overrides(setup, tmp_path / "run", STEPS)
    sets += [f"data.path={corpus.path}", "train.max_bad_fraction=0.95"]
    cfg, _ = load_recipe("tiny/comp_stage1", sets)
    summary = Trainer(cfg.run, cfg.optim, cfg.train, CompTask(cfg), full_config=cfg).fit()
    assert summary["step"] == STEPS and not summary["stopped"]
    # the same loader, replayed: the trainer's count equals the skips in the micro-batches it consumed
    loader = CompTask(cfg).build_loader(0, 1)
    expected = sum(b["num_bad"] for b in itertools.islice(iter(loader), STEPS))
    assert summary["bad_samples"] == expected > 0
