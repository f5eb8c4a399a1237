"""``benchmarks/bench_meta_build.py`` runs end to end (``--smoke``): both variants load the same
model in fresh processes, the skeleton with every parameter on the meta device, and the last line
is the JSON of figures."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_meta_build_benchmark_smoke(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_meta_build")
    figures = bench.main(["--smoke", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == figures
    assert figures["skeleton_on_meta"] is True
    assert figures["params"] > 0 and figures["eager_load_s"] > 0 and figures["skeleton_load_s"] > 0
    assert "eager" in out and "skeleton" in out
