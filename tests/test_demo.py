"""`cmpt demo --quick` end to end (prepare → CoMP stages I → II → III → evaluation → report), then
`--recipe moca` on its output (CPT → CL, the no-CPT ablation, embedding evaluation)."""

from __future__ import annotations

import json

import pytest
import yaml

from cmpt.demo.report import format_results_table, read_metrics, write_report

pytestmark = pytest.mark.slow  # trains the tiny starting points and runs the demo


def test_quick_demo_runs_end_to_end(tmp_path):
    from cmpt.demo import run_demo

    out = tmp_path / "out"
    summary = run_demo(out, quick=True, cache=tmp_path / "cache")

    assert summary["errors"] == {}
    assert set(summary["wall_s"]) == {"prepare", "stage1", "stage2", "stage3", "eval", "total"}
    for name, stage in summary["stages"].items():
        assert stage["steps"] == 4 and (out / name / "final" / "vlm_config.json").is_file()
        assert read_metrics(out / name), name
    # the stages are chained through model.init, with the stage structure of docs/method.md §2.1
    cfgs = {n: yaml.safe_load((out / n / "config.yaml").read_text()) for n in ("stage1", "stage2", "stage3")}
    assert cfgs["stage2"]["model"]["init"] == str(out / "stage1" / "final")
    assert cfgs["stage3"]["model"]["init"] == str(out / "stage2" / "final")
    assert cfgs["stage1"]["stage"]["trainable"] == ["merger"] and not cfgs["stage1"]["stage"]["rope"]
    assert cfgs["stage1"]["stage"]["resolution"]["policy"] == "fixed"
    assert cfgs["stage2"]["stage"]["rope"] and cfgs["stage2"]["stage"]["resolution"]["policy"] == "native"
    assert cfgs["stage2"]["loss"]["align"] and not cfgs["stage3"]["loss"]["align"]
    prior = str(out / "vocab_prior.safetensors")  # counted from the training captions
    assert cfgs["stage1"]["loss"]["vocab_prior"] == cfgs["stage2"]["loss"]["vocab_prior"] == prior

    rows = summary["results"]["rows"]
    metrics = [r["metric"] for r in rows]
    assert any("VQA" in m for m in metrics) and "segmentation probe mIoU" in metrics
    assert all(isinstance(r["before"], float) and isinstance(r["after"], float) for r in rows), rows

    report = (out / "report.md").read_text()
    assert "## Results" in report and "| metric |" in report and "linear probe" in report
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "loss_stage1.png" in pngs and "resolution_sweep.png" in pngs
    assert all(f"({p})" in report for p in ["plots/loss_stage1.png", "plots/resolution_sweep.png"])
    assert json.loads((out / "summary.json").read_text())["report"] == str(out / "report.md")

    # CoMP → MoCa on the same output: reuses the stage-III VLM, CPT → CL and the no-CPT ablation
    from cmpt.demo.moca_run import run_moca_demo
    from cmpt.embed.embedder import Embedder

    moca = run_moca_demo(out, quick=True, cache=tmp_path / "cache")
    assert set(moca["wall_s"]) == {"prepare", "moca_cpt", "moca_cl", "moca_cl_no_cpt", "eval", "total"}
    cfg = yaml.safe_load((out / "moca" / "moca_cl" / "config.yaml").read_text())
    assert cfg["model"]["init"] == str(out / "moca" / "moca_cpt" / "final") and cfg["stage"]["name"] == "cl"
    cpt = yaml.safe_load((out / "moca" / "moca_cpt" / "config.yaml").read_text())
    assert cpt["model"]["init"] == str(out / "stage3" / "final")
    labels = ["start (CoMP VLM, causal)", "after CPT", "after CPT → CL", "CL without CPT"]
    assert set(moca["evaluations"]) == set(labels)
    for row in moca["rows"]:
        assert all(0.0 <= row[lab] <= 1.0 for lab in labels), row
    assert Embedder.from_pretrained(out / "moca" / "moca_cl" / "final").encode(["a chart"]).shape[0] == 1
    assert "## CoMP → MoCa" in (out / "report.md").read_text()
    assert "| mean P@1" in (out / "moca" / "report.md").read_text()


def test_write_report_table_and_curves(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": s, "loss": 5.0 - s / 10, "loss/lm": 4.0 - s / 10, "loss/align": 20.0} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"broken\n')
    assert read_metrics(run) == recs
    results = {
        "title": "t",
        "before_label": "B",
        "after_label": "A",
        "rows": [
            {"metric": "acc", "data": "d", "before": 0.5, "after": 0.75},
            {"metric": "loss", "data": "d", "before": 2.0, "after": 2.5, "higher_is_better": False},
            {"metric": "missing", "data": "d", "before": None, "after": 1.0},
        ],
        "notes": ["a note"],
    }
    path = write_report(tmp_path / "out", {"s1": {"dir": run, "seconds": 1.5, "description": "x"}}, results)
    text = path.read_text()
    assert (tmp_path / "out" / "plots" / "loss_s1.png").stat().st_size > 1000
    assert "| acc ↑ | d | 0.500 | 0.750 | +0.250 | better |" in text
    assert "| loss ↓ | d | 2.000 | 2.500 | +0.500 | worse |" in text
    assert "| missing ↑ | d | n/a | 1.000 | n/a |  |" in text
    assert "| s1 | x | 3 | 1.5 | 4.900 | 4.700 |" in text and "- a note" in text
    plain = format_results_table(results, markdown=False)
    assert plain.splitlines()[0].split() == ["metric", "data", "B", "A", "Δ", "after", "is"]
