"""The report of a GPU step benchmark (``gpu_harness.py``'s ``run_bench``): the datasheet peaks and the
reporter that prints a table row and a cumulative JSON line after every variant, then the whole table
and the final JSON figures."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gpu_harness import Run, Setup
    from gpu_options import Variant

#: dense (no sparsity) bf16 tensor-core peaks of NVIDIA's datasheets, TFLOP/s: the first key found
#: in the device's name (half the "with sparsity" figures the datasheets headline).
DATASHEET_BF16_TFLOPS = {
    "H200 NVL": 835.0,
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
}


def datasheet_tflops(device_name: str) -> float | None:
    """The datasheet's dense bf16 peak of a device named ``device_name`` (None: not in the table)."""
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in device_name), None)


COLUMNS = ("step ms", "tok/s", "patch/s", "TFLOP/s", "MFU", "MFU ds", "× base", "GiB")
WIDTHS = (9, 9, 9, 8, 6, 6, 7, 6)


class Reporter:
    """The table and the JSON figures of a run, printed as it goes (flushed): the header first;
    after each variant its row and a cumulative JSON line (``"partial": true``, ``"pending"``: the
    variants to come), so that a run killed at its timeout keeps what it measured; at the end the
    whole table and the final JSON line. ``meta`` opens every JSON line, ``more`` closes it."""

    def __init__(
        self,
        setup: Setup,
        variants: list[Variant],
        peak: float,
        device: torch.device,
        meta: dict[str, Any],
        extra: dict[str, str],
        more: dict[str, Any],
    ) -> None:
        self.setup, self.variants, self.peak, self.device = setup, variants, peak, device
        self.meta, self.extra, self.more = meta, extra, more
        n = len(setup.batches)
        self.patches = sum(_patches(b) for b in setup.batches) / n
        self.text = sum(int(b["num_tokens"]) for b in setup.batches) / n
        self.where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        self.datasheet = datasheet_tflops(self.where) if device.type == "cuda" else None
        self.count_shown = False

    def header(self) -> None:
        dtype = "bf16" if self.device.type == "cuda" else "float32"
        sheet = f"; datasheet dense bf16 peak {self.datasheet:.0f} TFLOP/s" if self.datasheet else ""
        print(self.setup.title)
        print(f"  {self.where}; {dtype} matmul measured now: {self.peak:.1f} TFLOP/s{sheet}")
        n = len(self.setup.batches)
        print(f"  micro-batch (mean of {n}): {self.patches:.0f} patches, {self.text:.0f} text tokens")
        accum = self.setup.grad_accum
        every = f"{accum} micro-batches" if accum > 1 else "micro-batch"
        print(f"  an optimizer step every {every} (its share in each micro-batch's time)")
        for k, v in self.extra.items():
            print(f"  {k}: {v}")
        self._columns()

    def _columns(self) -> None:
        cols = " ".join(f"{c:>{w}}" for c, w in zip(COLUMNS, WIDTHS))
        print(f"  {'variant':<22} {cols}  change (× throughput)", flush=True)

    def _count_line(self, run: Run) -> str:
        what = f"{run.flops / 1e12:.3f} T" if run.flops is not None else f"not counted ({run.flops_note})"
        return f"  model FLOPs per micro-batch (counted on the eager baseline): {what}"

    def progress(self, run: Run, name: str) -> None:
        """``Run.on_done``: the row of the variant just recorded and the figures so far."""
        if not self.count_shown and (run.flops is not None or run.flops_note):
            print(self._count_line(run))
            self.count_shown = True
        print(self._row(next(v for v in self.variants if v.name == name), run))
        print(json.dumps(self.figures(run, partial=True)), flush=True)

    def final(self, run: Run) -> dict[str, Any]:
        """The whole table, then the final JSON line; returns its figures."""
        print(f"{self.setup.title}: all variants")
        print(
            f"  {self.where}; matmul {self.peak:.1f} TFLOP/s"
            + (f", datasheet {self.datasheet:.0f}" if self.datasheet else "")
        )
        print(self._count_line(run))
        self._columns()
        for v in self.variants:
            print(self._row(v, run))
        figures = self.figures(run)
        print(json.dumps(figures), flush=True)
        return figures

    def _row(self, v: Variant, run: Run) -> str:
        r = run.results.get(v.name, {})
        if "step_s" not in r:
            return f"  {v.name:<22} {_not_run(r)}"
        t, base = r["step_s"], run.results.get("baseline", {}).get("step_s")
        tflops = run.flops / t / 1e12 if run.flops is not None else float("nan")
        ratio = base / t if base else float("nan")
        prev = run.results.get(v.before, {}).get("step_s")
        change = f"{v.change} vs {v.before}: ×{prev / t:.3f}" if prev else (v.change or "")
        sheet = f"{100 * tflops / self.datasheet:5.1f}%" if self.datasheet else ""
        return (
            f"  {v.name:<22} {t * 1e3:9.1f} {self.text / t:9,.0f} {self.patches / t:9,.0f} {tflops:8.1f} "
            f"{100 * tflops / self.peak:5.1f}% {sheet:>6} {ratio:7.3f} "
            f"{r['peak_mem_gib'] or float('nan'):6.1f}  {change}"
        )

    def figures(self, run: Run, partial: bool = False) -> dict[str, Any]:
        """The JSON figures of what ``run`` has measured (``partial``: more to come)."""
        flops, base = run.flops, run.results.get("baseline", {}).get("step_s")
        out: dict[str, Any] = {
            **self.meta,
            "device": self.where,
            "matmul_peak_tflops": round(self.peak, 1),
            "datasheet_peak_tflops": self.datasheet,
            "model_flop_per_microbatch": flops,
            "patches_per_microbatch": round(self.patches),
            "text_tokens_per_microbatch": round(self.text),
            "step_ms": {},
            "mfu": {},
            "mfu_vs_datasheet": {},
            "speedup_vs_baseline": {},
            "change_ratio": {},
            "peak_mem_gib": {},
        }
        if run.flops_note:
            out["flops_not_counted"] = run.flops_note
        for v in self.variants:
            r = run.results.get(v.name)
            if r is None:
                continue
            if "step_s" not in r:
                out.setdefault("not_run", {})[v.name] = _not_run(r)
                continue
            t = r["step_s"]
            tflops = None if flops is None else flops / t / 1e12
            out["step_ms"][v.name] = round(t * 1e3, 2)
            out["mfu"][v.name] = None if tflops is None else round(tflops / self.peak, 4)
            out["mfu_vs_datasheet"][v.name] = (
                None if tflops is None or not self.datasheet else round(tflops / self.datasheet, 4)
            )
            out["speedup_vs_baseline"][v.name] = round(base / t, 4) if base else None
            out["peak_mem_gib"][v.name] = r["peak_mem_gib"] and round(r["peak_mem_gib"], 2)
            prev = run.results.get(v.before, {}).get("step_s")
            if prev:
                out["change_ratio"][f"{v.name} vs {v.before}"] = round(prev / t, 4)
        out.update(self.more)
        if partial:
            out["partial"] = True
            out["pending"] = [v.name for v in self.variants if v.name not in run.results]
        return out


def _patches(batch: dict) -> int:
    return int(batch["patches"].shape[0]) if batch.get("patches") is not None else 0


def _not_run(r: dict) -> str:
    return f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED: {r.get('failed')}"
