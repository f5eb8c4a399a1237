"""The GPU step benchmarks (``benchmarks/bench_comp_gpu.py``, ``benchmarks/bench_moca_gpu.py``; issue 14
item 3) run end to end with ``--smoke`` on tiny shapes: every variant that can run here is measured,
the others are listed with their reason, and the MoCa closed-form FLOP count agrees with the counter."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


def _check_common(figures: dict, out: str) -> None:
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(figures))  # last line: JSON
    assert "variant" in out and "baseline" in out
    ran = set(figures["step_ms"])
    assert {"padded", "baseline", "vision_per_segment", "text_per_sequence", "ckpt_full"} <= ran  # on the CPU
    assert all(t > 0 for t in figures["step_ms"].values())
    assert figures["speedup_vs_baseline"]["baseline"] == 1.0
    assert (
        "baseline vs padded" in figures["change_ratio"] and "ckpt_full vs baseline" in figures["change_ratio"]
    )
    assert figures["model_flop_per_microbatch"] > 0
    not_run = figures.get("not_run", {})
    assert set(not_run) | ran == {
        "padded",
        "baseline",
        "vision_per_segment",
        "text_per_sequence",
        "fused_ce",
        "compile",
        "fused_ce+compile",
        "ckpt_full",
        "fused_ce+compile+ckpt",
    }
    if not torch.cuda.is_available():
        assert "pip install 'cmpt[liger]'" in not_run["fused_ce"]
        assert "--variants" in not_run["compile"]


def test_comp_gpu_smoke(bench, capsys) -> None:
    figures = bench("bench_comp_gpu").main(["--smoke"])
    assert figures["bench"] == "comp_gpu" and figures["shapes"] == "tiny"
    _check_common(figures, capsys.readouterr().out)


def test_moca_gpu_smoke_and_closed_form(bench, capsys) -> None:
    figures = bench("bench_moca_gpu").main(["--smoke"])
    assert figures["bench"] == "moca_gpu"
    _check_common(figures, capsys.readouterr().out)
    counted, closed = figures["model_flop_per_microbatch"], figures["closed_form_flop_per_microbatch"]
    attention = figures["closed_form_attention_flop"]
    assert 0 < attention < closed
    # the counter's formulas know CUDA's attention kernels, not the CPU's: compare without it there
    expected = closed if torch.cuda.is_available() else closed - attention
    assert counted == pytest.approx(expected, rel=0.02)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the benchmark would run")
@pytest.mark.parametrize("name", ["bench_comp_gpu", "bench_moca_gpu"])
def test_without_cuda_says_so_and_exits_0(bench, capsys, name: str) -> None:
    with pytest.raises(SystemExit) as stop:
        bench(name).main([])
    assert stop.value.code == 0
    assert "no CUDA device here, nothing measured" in capsys.readouterr().out


@pytest.mark.slow
def test_comp_gpu_smoke_compiled_variant(bench, capsys) -> None:
    """A variant named in --variants runs compiled per block (the eager backend on the CPU)."""
    figures = bench("bench_comp_gpu").main(["--smoke", "--variants", "compile"])
    assert set(figures["step_ms"]) == {"baseline", "compile"}
    assert "compile vs baseline" in figures["change_ratio"]
    assert "compile" in capsys.readouterr().out


def test_budget_spent_skips_all_but_the_baseline_group(bench, capsys) -> None:
    figures = bench("bench_comp_gpu").main(["--smoke", "--budget-s", "1e-9"])
    assert set(figures["step_ms"]) == {"padded", "baseline", "vision_per_segment", "text_per_sequence"}
    assert figures["not_run"]["ckpt_full"] == "skipped: " + bench("bench_comp_gpu").BUDGET_SPENT
    assert "--budget-s" in capsys.readouterr().out


@pytest.mark.slow
def test_device_session_script_smoke(tmp_path) -> None:
    """``benchmarks/device_session.sh`` (one call on a lent GPU) runs its steps on the CPU with
    SMOKE=1 and writes one summary of both benchmarks."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    env["TESTS"] = "tests/test_cuda_train.py"
    done = subprocess.run(
        ["bash", str(BENCH / "device_session.sh")],
        cwd=BENCH.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["comp"]["bench"] == "comp_gpu" and summary["moca"]["bench"] == "moca_gpu"
    assert {"padded", "baseline"} <= set(summary["moca"]["step_ms"])
    assert {"env.log", "tests.log", "comp.log", "moca.log"} <= {p.name for p in tmp_path.iterdir()}
    assert "moca   baseline" in done.stdout
