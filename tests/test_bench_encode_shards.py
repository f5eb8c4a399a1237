"""``benchmarks/bench_encode_shards.py --quick`` runs end to end (docs/method.md §7 "Sharded,
resumable encoding"): the last line is its JSON, and a rerun with every shard present encodes
nothing, so it holds far less memory than the first run. Wall times are printed, never checked."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow  # four child processes, each importing torch and transformers
def test_encode_shards_benchmark_quick(monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    figures = importlib.import_module("bench_encode_shards").main(["--quick"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == figures
    assert figures["images"] == 6 and figures["shard_size"] == 2
    assert all(figures[k] > 0 for k in ("peak_rss_ratio_shards_vs_one", "wall_ratio_rerun_all_present"))
    assert "rerun, half the shards missing" in out
