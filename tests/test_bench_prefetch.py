"""``benchmarks/bench_prefetch.py`` runs end to end (``--quick``; docs/method.md §7 "Inference inputs
prepared ahead"): the last line is the JSON of figures, and ``Embedder.encode`` in its shipped form
holds fewer bytes of preprocessed patches at once than the old all-first rendering. Wall times are
printed, never checked."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_prefetch_benchmark_quick(monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_prefetch")
    import cmpt.embed.embedder as embedder

    window = embedder.RENDER_WINDOW
    figures = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == figures
    assert {
        "encode_speedup_w2",
        "embed_speedup",
        "embed_peak_bytes_ratio",
        "embed_data_check_speedup",
    } <= set(figures)
    assert all(figures[k] > 0 for k in ("encode_speedup_w2", "encode_speedup_w4", "embed_speedup"))
    # before: all 40 inputs' patches at once; now: at most two windows of 8 and the one in hand
    # (17 of 40 images of similar patch counts)
    assert 0 < figures["embed_peak_bytes_now"] < figures["embed_peak_bytes_before"]
    assert figures["embed_peak_bytes_ratio"] < 0.6
    assert "cmpt encode" in out and "Embedder.encode" in out
    assert window == embedder.RENDER_WINDOW  # restored


@pytest.mark.slow  # child processes, each importing torch and transformers
def test_caller_images_benchmark_runs(monkeypatch, capsys, tmp_path) -> None:
    """``benchmarks/bench_caller_images.py``: each variant measured in a child process of this
    checkout, the last line is its JSON; ``--before`` refuses a directory that is no cmpt checkout."""
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_caller_images")
    figures = bench.main(["--images", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == figures
    assert figures["opened_speedup_w2_now"] > 0 and figures["paths_speedup_w2_now"] > 0
    assert "opened, workers=2" in out
    with pytest.raises(SystemExit, match="not a cmpt checkout"):
        bench.main(["--before", str(tmp_path)])
