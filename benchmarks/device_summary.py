"""One table of the GPU step benchmarks of a device session, and ``summary.json``
(``benchmarks/device_session.sh``'s last step; standard library only, no torch to import).

Each benchmark prints a JSON line after every variant (``"partial": true`` until the last) and its
final one at the end (``bench_comp_gpu.py``): the figures of a benchmark are those of the last
line of its log that parses — a run killed at its timeout keeps the variants it finished, and a
line cut off by the kill is passed over.

The host-device synchronisations per micro-batch (``sync_audit.py``, ``OUT/syncs.log``) are added
to ``summary.json`` and printed below the table.

Usage: python benchmarks/device_summary.py OUT   (reads OUT/comp.log, OUT/moca.log, OUT/syncs.log)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHES = ("comp", "moca")


def last_figures(lines: list[str]) -> dict | None:
    """The last line of ``lines`` that is a JSON object, or None."""
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                figures = json.loads(line)
            except json.JSONDecodeError:  # cut off by a kill
                continue
            if isinstance(figures, dict):
                return figures
    return None


def summarize(out: Path) -> dict[str, dict]:
    """Print the table of both benchmarks' figures and write ``out/summary.json``; returns them."""
    summary = {}
    for name in BENCHES:
        log = out / f"{name}.log"
        figures = last_figures(log.read_text(errors="replace").splitlines()) if log.exists() else None
        summary[name] = figures if figures is not None else {"missing": f"no JSON line in {log}"}
    print(f"{'bench':<6} {'variant':<22} {'step ms':>9} {'MFU':>7} {'MFU ds':>7} {'x base':>7} {'GiB':>6}")
    for name, fig in summary.items():
        for variant, ms in fig.get("step_ms", {}).items():
            mfu, sheet = fig["mfu"].get(variant), fig.get("mfu_vs_datasheet", {}).get(variant)
            ratio, gib = fig["speedup_vs_baseline"].get(variant), fig["peak_mem_gib"].get(variant)
            print(
                f"{name:<6} {variant:<22} {ms:9.1f} {_pct(mfu):>7} {_pct(sheet):>7} "
                f"{ratio or float('nan'):7.3f} {gib or float('nan'):6.1f}"
            )
        for variant, why in fig.get("not_run", {}).items():
            print(f"{name:<6} {variant:<22} {why}")
        if fig.get("partial"):
            print(
                f"{name:<6} stopped before it finished (killed at its timeout?): not reached {fig['pending']}"
            )
        if "flops_not_counted" in fig:
            print(f"{name:<6} FLOPs not counted: {fig['flops_not_counted']}")
        if "missing" in fig:
            print(f"{name:<6} {fig['missing']}")
    log = out / "syncs.log"
    syncs = last_figures(log.read_text(errors="replace").splitlines()) if log.exists() else None
    if syncs:
        summary["syncs"] = syncs
        per = ", ".join(f"{k.split('_')[0]} {v:.1f}" for k, v in syncs.items() if k.endswith("_microbatch"))
        old = ", ".join(f"{k.split('_')[0]} {v:.1f}" for k, v in syncs.items() if k.endswith("_on_device"))
        print(
            f"host-device synchronisations per micro-batch ({syncs.get('device')}): {per}"
            + (f" (whole batch on the device: {old})" if old else "")
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    summarize(Path(sys.argv[1]))
