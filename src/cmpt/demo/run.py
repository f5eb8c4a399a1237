"""`cmpt demo`: CoMP end to end, offline, on CPU (what `make demo` runs).

1. Tiny starting points (:func:`cmpt.demo.tiny_models.prepare_tiny`, cached): synthetic charts, documents
   and scenes; a ViT pretrained at ONE fixed resolution (HF Dinov2 format); a tiny LM + tokenizer.
2. CoMP stage I (merger only, RoPE off, fixed resolution, ``L_align`` on) → stage II (everything,
   C-RoPE, native resolution, ``L_align`` on) → stage III (everything, ``L_align`` off), each with
   the packaged ``tiny/comp_stage*`` recipe, chained through ``model.init``.
3. Evaluation on held-out data: "before" = the VLM with the fixed-resolution starting ViT (stage I
   output: merger trained, ViT untouched) and the starting ViT itself; "after" = the stage III VLM and
   its ViT (CoMP-VFM). VQA (relaxed accuracy on charts, ANLS on documents), held-out caption loss,
   linear probe and segmentation probe on scenes, and a resolution sweep.
4. ``out/report.md`` with the results table and loss curves; ``out/summary.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .report import format_results_table, write_report

__all__ = ["QUICK_STAGE", "STAGES", "run_comp_stages", "run_demo", "stage_overrides"]

STAGES = {
    "stage1": "I adapter warm-up: merger only, RoPE off, fixed resolution, L_align on",
    "stage2": "II native adaptation: all parts, C-RoPE, native resolution, L_align on",
    "stage3": "III instruction tuning: all parts, C-RoPE, native resolution, L_align off",
}
# --quick: a smoke run of the same pipeline (tiny sizes, few steps, small evaluation limits)
QUICK_STAGE = {
    "train.steps": 4,
    "train.log_every": 1,
    "train.save_every": 0,
    "data.vision_budget": 128,
    "data.text_budget": 1024,
    "stage.resolution.max_pixels": 112 * 112,
}
PROBE_LABELS = {"label": "largest shape, 3 classes", "num_shapes": "number of shapes, 4 classes"}
EVAL = {  # evaluation sizes: full, quick
    "vqa_limit": (None, 4),  # records (each has 3-5 questions); None = the whole test split
    "sweep_limit": (32, 2),
    "caption_limit": (None, 4),
    "max_pixels": (224 * 224, 112 * 112),  # native-resolution cap of the evaluations
    "sweep": ((56 * 56, 112 * 112, 224 * 224, 336 * 336), (56 * 56, 112 * 112)),
    "probe_epochs": (100, 5),
    "seg_epochs": (20, 2),
}


def _header(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def stage_overrides(
    name: str,
    tiny: dict[str, Path],
    run_dir: Path,
    init: Path | None,
    quick: bool,
    fixed_size: int,
    vocab_prior: Path | None = None,
) -> list[str]:
    """``--set`` overrides that point a packaged ``tiny/comp_<name>`` recipe at the prepared data
    (and, for the stages with the alignment loss, at the captions' ``vocab_prior``)."""
    items: dict[str, Any] = {
        "run.dir": run_dir,
        "model.vision": tiny["vision"],
        "model.llm": tiny["llm"],
        "data.path": tiny["data"],
        "stage.resolution.fixed_size": fixed_size,
        "train.tensorboard": False,
    }
    if init is not None:
        items["model.init"] = init
    if vocab_prior is not None and name != "stage3":  # stage III trains without L_align
        items["loss.vocab_prior"] = vocab_prior
    if quick:
        items.update(QUICK_STAGE)
        if name == "stage1":
            items.pop("stage.resolution.max_pixels")
    return [f"{k}={v}" for k, v in items.items()]


def _safe(name: str, errors: dict[str, str], fn: Callable[[], Any]) -> Any:
    """Run one evaluation; a failure is recorded (and reported) instead of losing the whole demo."""
    t = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # reported in the table and the summary
        errors[name] = f"{type(e).__name__}: {e}"
        print(f"  {name}: FAILED ({errors[name]})")
        traceback.print_exc()
        return None
    print(f"  {name}: done in {time.perf_counter() - t:.1f} s", flush=True)
    return out


def _evaluate(tiny: dict[str, Path], out: Path, quick: bool) -> dict[str, Any]:
    """Before/after comparison on held-out data (see the module docstring)."""
    from ..eval.probe import linear_probe
    from ..eval.resolution import resolution_sweep
    from ..eval.segmentation import seg_probe
    from ..eval.vqa import caption_loss, evaluate_vqa
    from ..vision.processor import ImageProcessor
    from ..vision.vit import NativeViT
    from ..vlm.model import VisionLanguageModel

    q = int(quick)
    cfg = {k: v[q] for k, v in EVAL.items()}
    ev = out / "eval"
    errors: dict[str, str] = {}
    before = VisionLanguageModel.from_pretrained(out / "stage1" / "final")
    after = VisionLanguageModel.from_pretrained(out / "stage3" / "final")
    mp = cfg["max_pixels"]
    test = tiny["data_test"]
    res: dict[str, Any] = {"before": {}, "after": {}}
    for tag, model, kw in (("before", before, {}), ("after", after, {"max_pixels": mp})):
        res[tag]["vqa"] = _safe(
            f"VQA {tag}",
            errors,
            lambda m=model, k=kw, t=tag: evaluate_vqa(
                m, test, limit=cfg["vqa_limit"], out_jsonl=ev / f"vqa_{t}.jsonl", **k
            ),
        )
        res[tag]["scenes_vqa"] = _safe(
            f"scene VQA {tag}",
            errors,
            lambda m=model, k=kw: evaluate_vqa(m, tiny["scenes_test"], limit=cfg["vqa_limit"], **k),
        )
        res[tag]["caption_loss"] = _safe(
            f"caption loss {tag}",
            errors,
            lambda m=model, k=kw: caption_loss(m, test, limit=cfg["caption_limit"], **k),
        )
    # The probes: the starting ViT vs the CoMP ViT, both frozen, same protocol and resolution, patch
    # tokens only (CoMP drops the CLS token from the packed stream, so it is not trained).
    start_vit = NativeViT.from_hf(tiny["vision"], keep_prefix_tokens=False)
    comp_vit = NativeViT.from_pretrained(out / "stage3" / "final" / "vit", keep_prefix_tokens=False)
    s_train, s_val = tiny["scenes_train"], tiny["scenes_val"]
    seg_train = tiny.get("scenes_seg_train", s_train)
    for tag, vit in (("before", start_vit), ("after", comp_vit)):
        for key in PROBE_LABELS:
            res[tag][f"probe_{key}"] = _safe(
                f"linear probe ({key}) {tag}",
                errors,
                lambda v=vit, k=key: linear_probe(
                    v, s_train, s_val, label_key=k, max_pixels=mp, epochs=cfg["probe_epochs"]
                ),
            )
        res[tag]["seg"] = _safe(
            f"segmentation probe {tag}",
            errors,
            lambda v=vit: seg_probe(
                v, seg_train, s_val, mask_key="mask", max_pixels=mp, epochs=cfg["seg_epochs"]
            ),
        )
    # Resolution sweep: the fixed-resolution model fed native-resolution images vs the CoMP model.
    native = ImageProcessor.from_dict({**before.processor.to_dict(), "policy": "native", "fixed_size": None})
    before.processor = native
    sweeps = {}
    for tag, model in (("before", before), ("after", after)):
        sweeps[tag] = _safe(
            f"resolution sweep {tag}",
            errors,
            lambda m=model, t=tag: resolution_sweep(
                m, test, list(cfg["sweep"]), out_dir=ev / f"sweep_{t}", limit=cfg["sweep_limit"]
            ),
        )
    return {"raw": res, "sweeps": sweeps, "errors": errors, "config": cfg}


def _get(d: dict | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _rows(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """The results table: one row per metric, ``before`` and ``after`` side by side."""
    b, a = ev["raw"]["before"], ev["raw"]["after"]

    def row(metric: str, data: str, *keys: str, higher: bool = True) -> dict[str, Any]:
        return {
            "metric": metric,
            "data": data,
            "before": _get(b, *keys),
            "after": _get(a, *keys),
            "higher_is_better": higher,
        }

    n = _get(a, "vqa", "n") or _get(b, "vqa", "n")
    rows = [
        row("VQA score (charts relaxed acc. + docs ANLS)", f"charts+docs test, {n} questions", "vqa", "score")
    ]
    for m in sorted(set(_get(b, "vqa", "per_metric") or {}) | set(_get(a, "vqa", "per_metric") or {})):
        rows.append(row(f"  {m}", "charts" if "relaxed" in m else "docs", "vqa", "per_metric", m))
    n = _get(a, "scenes_vqa", "n") or _get(b, "scenes_vqa", "n")
    rows.append(row("scene VQA accuracy", f"scenes test, {n} questions", "scenes_vqa", "score"))
    for t in sorted(
        set(_get(b, "scenes_vqa", "per_type") or {}) | set(_get(a, "scenes_vqa", "per_type") or {})
    ):
        rows.append(row(f"  {t}", "scenes", "scenes_vqa", "per_type", t))
    rows.append(row("held-out caption loss", "charts+docs test", "caption_loss", higher=False))
    for key, what in PROBE_LABELS.items():
        rows.append(row(f"linear probe top-1 ({key})", f"scenes val, {what}", f"probe_{key}", "top1"))
    rows.append(row("segmentation probe mIoU", "scenes val, 4 classes", "seg", "miou"))
    return rows


def _sweep_plot(ev: dict[str, Any], out: Path) -> tuple[list[Path], list[str]]:
    """One PNG with both resolution sweeps, and a note per sweep."""
    from .report import plot_curves

    curves, notes = {}, []
    for tag, sweep in ev["sweeps"].items():
        pts = (sweep or {}).get("points") or []
        if pts:
            curves[tag] = [(p["max_pixels"], p["score"]) for p in pts]
            best = max(pts, key=lambda p: p["score"])
            tokens = ", ".join(f"{p['max_pixels']}px→{p['mean_vision_tokens']:.0f}" for p in pts)
            notes.append(
                f"Resolution sweep ({tag}, native resolution at each max_pixels): best VQA score "
                f"{best['score']:.3f} at max_pixels={best['max_pixels']}; vision tokens per image {tokens}."
            )
    png = plot_curves(
        curves,
        out / "plots" / "resolution_sweep.png",
        title="VQA score vs max_pixels (charts+docs test)",
        xlabel="max_pixels",
        ylabel="VQA score",
        logx=True,
    )
    return ([png] if png else []), notes


def _notes(ev: dict[str, Any], tiny_stats: dict[str, Any], quick: bool) -> list[str]:
    v, lm, mp = tiny_stats["vision"], tiny_stats["lm"], ev["config"]["max_pixels"]
    r, acc, ch = v["resolution"], v["val"], v["chance"]
    pretrain = ", ".join(f"{k} {acc[k]:.3f} (chance {ch[k]:.3f})" for k in acc)
    lm_loss = f"{lm['held_out_loss_before']:.2f} → {lm['held_out_loss']:.2f}"
    return [
        f"Starting ViT: HF Dinov2 trained from scratch at a fixed {r}² on scene classification "
        f"(largest shape, its colour, number of shapes); held-out val accuracy: {pretrain}.",
        f"Starting LM: held-out loss {lm_loss} after text-only pretraining on the training "
        f"conversations ({lm['vocab_size']} tokens vocabulary).",
        f"VQA/caption 'before' = stage I output (trained merger; ViT and LM untouched) at its fixed {r}² "
        f"input; 'after' = stage III (ViT, merger and LM trained, C-RoPE) at native resolution ≤ {mp} "
        "pixels. The LM changed too, so these rows measure the whole CoMP pipeline, not the ViT alone.",
        "Probes compare the frozen starting ViT with the frozen CoMP ViT (patch tokens only, as CoMP drops "
        f"the CLS token; the same native-resolution inputs ≤ {mp} pixels).",
        "All numbers are as measured, on tiny models and a few hundred synthetic samples: at this scale "
        "CoMP does not win everywhere, and reading the text in charts and documents is beyond these models.",
        *(
            ["`--quick` smoke run: few steps and tiny evaluation limits; the numbers mean nothing."]
            if quick
            else []
        ),
        *[f"Evaluation {k} failed: {e}" for k, e in ev["errors"].items()],
    ]


def run_comp_stages(out: Path, tiny: dict[str, Path], quick: bool, fixed: int) -> dict[str, dict[str, Any]]:
    """CoMP stages I → II → III into ``out/stage{1,2,3}`` (fresh runs), chained through ``model.init``;
    the alignment loss's prior is counted from the training captions first (``cmpt data vocab-prior``)."""
    from ..data.vocab_prior import vocab_prior_main
    from ..recipes import run_recipe

    prior = out / "vocab_prior.safetensors"
    vocab_prior_main(str(tiny["data"]), str(tiny["llm"]), str(prior))
    stages: dict[str, dict[str, Any]] = {}
    init = None
    for i, (name, what) in enumerate(STAGES.items(), start=2):
        _header(f"{i}/5 CoMP {what}")
        run_dir = out / name
        if (run_dir / "config.yaml").is_file():  # a previous demo's run: start fresh, not resume
            shutil.rmtree(run_dir)
        t = time.perf_counter()
        summary = run_recipe(
            f"tiny/comp_{name}", stage_overrides(name, tiny, run_dir, init, quick, fixed, prior)
        )
        seconds = round(time.perf_counter() - t, 1)
        print(f"  {name}: {summary['step']} steps in {seconds} s, last loss {summary['loss']:.3f}")
        stages[name] = {"dir": run_dir, "seconds": seconds, "steps": summary["step"], "description": what}
        stages[name]["summary"] = summary
        init = run_dir / "final"
    return stages


def run_demo(out: str | os.PathLike = "runs/demo", quick: bool = False, cache: str | None = None) -> dict:
    """Run the offline CoMP demo (module docstring) and return its summary.

    Returns ``{"out", "report", "wall_s": {"prepare", "stage1", "stage2", "stage3", "eval",
    "total"}, "stages": {name: {...}}, "results": {"rows", ...}, "starting_points", "errors"}``.
    """
    from .tiny_models import prepare_tiny

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_total = time.perf_counter()
    wall: dict[str, float] = {}
    _header(f"1/5 tiny starting points ({'quick' if quick else 'full'}), cached")
    t = time.perf_counter()
    tiny = prepare_tiny(cache, quick=quick)
    wall["prepare"] = round(time.perf_counter() - t, 1)
    tiny_stats = {
        "vision": json.loads(Path(tiny["vision_stats"]).read_text()),
        "lm": json.loads(Path(tiny["lm_stats"]).read_text()),
    }
    fixed = int(tiny_stats["vision"]["resolution"])

    stages = run_comp_stages(out, tiny, quick, fixed)
    wall.update({name: st["seconds"] for name, st in stages.items()})

    _header("5/5 evaluation: fixed-resolution start vs CoMP, held-out data")
    t = time.perf_counter()
    ev = _evaluate(tiny, out, quick)
    wall["eval"] = round(time.perf_counter() - t, 1)
    results = {
        "title": "cmpt demo: CoMP on tiny offline models" + (" (--quick)" if quick else ""),
        "before_label": f"before (fixed {fixed}² ViT)",
        "after_label": "after (CoMP)",
        "rows": _rows(ev),
    }
    images, sweep_notes = _sweep_plot(ev, out)
    wall["total"] = round(time.perf_counter() - t_total, 1)
    results["notes"] = _notes(ev, tiny_stats, quick) + sweep_notes
    results["intro"] = "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in wall.items())
    report = write_report(out, stages, results, images)

    _header("results")
    print(format_results_table(results, markdown=False))
    print("\nwall time (s): " + ", ".join(f"{k} {v}" for k, v in wall.items()))
    print(f"report: {report}")
    summary = {
        "out": str(out),
        "report": str(report),
        "wall_s": wall,
        "stages": {
            k: {kk: vv for kk, vv in v.items() if kk != "dir"} | {"dir": str(v["dir"])}
            for k, v in stages.items()
        },
        "results": {"rows": results["rows"], "notes": results["notes"]},
        "evaluations": ev["raw"],
        "sweeps": ev["sweeps"],
        "starting_points": tiny_stats,
        "errors": ev["errors"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
