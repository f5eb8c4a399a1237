"""The GPU step benchmarks (``benchmarks/bench_comp_gpu.py``, ``benchmarks/bench_moca_gpu.py``; issue 14
item 3) run end to end with ``--smoke`` on tiny shapes: every variant that can run here is measured,
the others are listed with their reason, the figures are printed after every variant (a killed run
keeps them; ``benchmarks/device_summary.py`` reads the last complete line), and the MoCa closed-form
FLOP count agrees with the counter. The FLOP count takes grouped key/value heads on a torch whose
formulas reject them (torch < 2.13), and a failed count never stops the timing."""

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


def _check_common(figures: dict, out: str, vision: str) -> None:
    """``vision``: the benchmark's vision-attention variant."""
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(figures))  # last line: JSON
    assert "variant" in out and "baseline" in out
    # after every variant a cumulative JSON line, flushed: what a killed run leaves
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    partial, final = lines[:-1], lines[-1]
    assert len(partial) == 10 and all(p["partial"] for p in partial) and "partial" not in final
    assert partial[-1]["pending"] == [] and len(partial[0]["pending"]) == 9
    assert partial[-1]["step_ms"] == final["step_ms"] and partial[-1]["bench"] == final["bench"]
    ran = set(figures["step_ms"])
    assert {"padded", "baseline", vision, "text_per_sequence", "batch_on_device", "ckpt_full"} <= ran  # CPU
    assert "batch_on_device vs baseline" in figures["change_ratio"]
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
        vision,
        "text_per_sequence",
        "batch_on_device",
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
    assert figures["grad_accum"] == 2  # stage II pass 1's train.grad_accum
    _check_common(figures, capsys.readouterr().out, "vision_sdpa_batched")


def test_an_optimizer_step_every_grad_accum_micro_batches(bench) -> None:
    """The timed micro-batches carry the optimizer as training does: once per ``grad_accum``."""
    updates: list[bool] = []
    bench("gpu_harness")._measure(
        lambda batch, update=True: updates.append(update), [{}, {}], 6, torch.device("cpu"), True, 3
    )
    assert updates == [True, True] + [False, False, True] * 2  # warm-up over both batches, then 6


def test_moca_gpu_smoke_and_closed_form(bench, capsys) -> None:
    figures = bench("bench_moca_gpu").main(["--smoke"])
    assert figures["bench"] == "moca_gpu"
    _check_common(figures, capsys.readouterr().out, "vision_per_segment")
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
    eager = {"padded", "baseline", "vision_sdpa_batched", "text_per_sequence", "batch_on_device"}
    assert set(figures["step_ms"]) == eager
    assert figures["not_run"]["ckpt_full"] == "skipped: " + bench("gpu_harness").BUDGET_SPENT
    assert "--budget-s" in capsys.readouterr().out


def _as_on_torch_2_11(formula, at: int, axis: int):
    """``formula`` behind torch 2.11's check: query, key and value must have equal head counts
    (``sdpa_flop_count``'s assertion, lifted in torch 2.13)."""

    def strict(*args, out_val=None, **kwargs):
        q, k, v = args[at : at + 3]
        if not q.shape[axis] == k.shape[axis] == v.shape[axis]:
            raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")
        return formula(*args, out_val=out_val, **kwargs)

    return strict


def test_flop_count_of_grouped_kv_heads_where_torchs_formula_rejects_them(bench, monkeypatch) -> None:
    """CUDA's SDPA with ``enable_gqa`` (the LLMs' packed text on SDPA, while counting) hands the flash
    kernels fewer key/value heads than query heads; torch 2.11's formulas assert equal ones. Here
    torch's formulas are made that strict: the count of grouped heads still equals that of the heads
    repeated (and the closed form 4·b·h·s²·d forward, 10·b·h·s²·d backward; causal counted whole),
    for both kernels;
    without the widening the error is kept and the ops still run."""
    from torch.utils.flop_counter import flop_registry

    measure = bench("gpu_measure")
    for packet, (at, axis) in measure._ATTENTION_ARGS.items():
        if packet in flop_registry:
            monkeypatch.setitem(flop_registry, packet, _as_on_torch_2_11(flop_registry[packet], at, axis))
    aten = torch.ops.aten
    b, heads, kv, s, d = 2, 8, 2, 64, 16

    def attention(k: torch.Tensor, v: torch.Tensor) -> None:
        """Forward and backward of CUDA's SDPA (flash, ``(b, h, s, d)``) and of the varlen flash
        kernel (``(b·s, h, d)`` with cumulative lengths) on shape-only tensors."""
        q = torch.empty(b, heads, s, d, device="meta")
        r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)
        aten._scaled_dot_product_flash_attention_backward(
            r[0], q, k, v, r[0], r[1], *r[2:6], 0.0, True, *r[6:8]
        )
        q, k, v = (t.transpose(1, 2).flatten(0, 1) for t in (q, k, v))
        cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device="meta")
        r = aten._flash_attention_forward(q, k, v, cu, cu, s, s, 0.0, True, False)
        aten._flash_attention_backward(r[0], q, k, v, r[0], r[1], cu, cu, s, s, 0.0, True, r[2], r[3])

    def count(kv_heads: int) -> tuple[int, dict]:
        k, v = (torch.empty(b, kv_heads, s, d, device="meta") for _ in range(2))
        with measure.FlopCount() as counter:
            attention(k, v)
        return counter.total, counter.errors

    with pytest.raises(AssertionError, match="incompatible"):  # the strict formula, as on torch 2.11
        flop_registry[aten._scaled_dot_product_flash_attention](
            *(torch.empty(b, h, s, d, device="meta") for h in (heads, kv, kv)), out_val=None
        )
    grouped, errors = count(kv)
    assert errors == {}
    assert grouped == count(heads)[0] == 2 * (4 + 10) * b * heads * s * s * d
    monkeypatch.setattr(measure, "_ATTENTION_ARGS", {})  # no widening: torch 2.11's failure, kept
    total, errors = count(kv)
    assert "sdpa_flop_count" in errors["aten._scaled_dot_product_flash_attention"] and total < grouped


def test_failed_count_and_short_timeout_never_stop_the_timing(bench, capsys, monkeypatch) -> None:
    """Every FLOP formula failing leaves the FLOPs uncounted, with the reason, and the variants timed;
    with less than COMPILE_MIN_S before --timeout-s the compiled group is skipped, saying why."""
    from torch.utils.flop_counter import flop_registry

    def broken(*args, **kwargs):
        raise RuntimeError("formula broke")

    for packet in list(flop_registry):
        monkeypatch.setitem(flop_registry, packet, broken)
    figures = bench("bench_comp_gpu").main(["--smoke", "--variants", "compile", "--timeout-s", "60"])
    assert set(figures["step_ms"]) == {"baseline"} and figures["step_ms"]["baseline"] > 0
    assert figures["model_flop_per_microbatch"] is None and figures["mfu"]["baseline"] is None
    assert (
        "a FLOP formula failed" in figures["flops_not_counted"]
        and "formula broke" in figures["flops_not_counted"]
    )
    assert "compilation needs ≥ 120 s" in figures["not_run"]["compile"]
    assert "not counted (a FLOP formula failed" in capsys.readouterr().out


def test_datasheet_peaks(bench) -> None:
    datasheet_tflops = bench("gpu_report").datasheet_tflops
    assert datasheet_tflops("NVIDIA H200") == 989.0 and datasheet_tflops("NVIDIA H100 PCIe") == 756.0
    assert datasheet_tflops("NVIDIA H100 80GB HBM3") == 989.0 and datasheet_tflops("cpu") is None


def test_device_summary_reads_the_last_complete_json_line(bench, tmp_path, capsys) -> None:
    """A benchmark killed at its timeout: its log ends in a cut-off line after cumulative ones; the
    summary takes the last complete one and says what was not reached."""
    partial = {
        "bench": "comp_gpu",
        "step_ms": {"baseline": 600.0},
        "mfu": {"baseline": 0.25},
        "mfu_vs_datasheet": {"baseline": 0.2},
        "speedup_vs_baseline": {"baseline": 1.0},
        "peak_mem_gib": {"baseline": 50.0},
        "partial": True,
        "pending": ["compile"],
    }
    early = {**partial, "step_ms": {}, "mfu": {}, "pending": ["baseline", "compile"]}
    log = [
        "setup ...",
        json.dumps(early),
        "  baseline  600.0 ...",
        json.dumps(partial),
        '{"bench": "comp_gpu", "st',
    ]
    (tmp_path / "comp.log").write_text("\n".join(log))
    summary = bench("device_summary").summarize(tmp_path)
    assert summary["comp"] == partial and "missing" in summary["moca"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    out = capsys.readouterr().out
    assert "comp   baseline" in out and "25.0%" in out and "not reached ['compile']" in out


@pytest.mark.slow
def test_device_session_script_smoke(tmp_path) -> None:
    """``benchmarks/device_session.sh`` (one call on a lent GPU) runs its steps on the CPU with
    SMOKE=1 and writes one summary of both benchmarks."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    env["TESTS"] = "tests/test_cuda_train.py"
    env["SYNC_TIMEOUT"] = "120"  # a GPU's budget, not a loaded 2-core CPU's: both placements, uncounted
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
    logs = {"env.log", "tests.log", "comp.log", "moca.log", "syncs.log"}
    assert logs <= {p.name for p in tmp_path.iterdir()}
    assert "moca   baseline" in done.stdout
    syncs = summary["syncs"]  # on the CPU the steps run uncounted: zero
    assert syncs["bench"] == "sync_audit" and syncs["comp_syncs_per_microbatch"] == 0.0
    assert "host-device synchronisations per micro-batch (cpu): comp 0.0, moca 0.0" in done.stdout
    assert "(whole batch on the device: comp 0.0, moca 0.0)" in done.stdout
