"""What a run records in its ``run.dir`` besides checkpoints (docs/architecture.md ``train/``):

* ``history/NNNN-<UTC time>.yaml``: one entry per start that got as far as loading its checkpoint
  (the config, what was resumed from where, the allowed changes, notes); a refused start, and a
  finished run started again with nothing to do (``ResumePlan.nothing_to_do``), leave none.
  :func:`continued_from` reads them back (:mod:`cmpt.train.resume`);
* ``config.yaml``: the current run's config;
* ``summary.json``: the last launch's outcome (written atomically by rank 0); ``loss``, ``losses``
  and ``grad_norm`` are the last optimizer step's, and a launch with nothing to do rewrites it with
  the finished run's results and ``"nothing_to_do": true`` (docs/method.md §4 "Verified checkpoints");
  :func:`launch_summary` and :func:`finished_summary` build it, with the bad-sample fraction of
  :meth:`~cmpt.train.bad_data.BadDataPolicy.at_end` (docs/method.md §4 "Bad samples").
"""

from __future__ import annotations

import datetime as _dt
import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..config import write_yaml
from ..hub import json_ready
from ..io_atomic import atomic_file
from ..launch import EXIT_OK, EXIT_RESUMABLE
from .bad_data import BadDataPolicy

if TYPE_CHECKING:
    from .config import TrainConfig
    from .resume import ResumePlan
    from .step import StepResult

__all__ = ["continued_from", "finished_summary", "launch_summary", "previous_results", "record_start"]
__all__ += ["write_summary"]

#: summary.json keys of the last optimizer step, kept by a launch that runs none (:func:`previous_results`)
_RESULT_KEYS = ("loss", "losses", "grad_norm", "elapsed_s")


def continued_from(run_dir: Path) -> set[str]:
    """Checkpoints that starts recorded in ``run_dir/history`` continued from."""
    out = set()
    for entry in sorted((run_dir / "history").glob("*.yaml")):
        try:
            doc = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        src = doc.get("resumed_from") if isinstance(doc, dict) else None
        if isinstance(src, dict) and src.get("checkpoint"):
            out.add(str(src["checkpoint"]))
    return out


def write_summary(run_dir: Path, data: dict[str, Any]) -> Path:
    """``run_dir/summary.json``, atomically (rank 0's job)."""
    path = run_dir / "summary.json"
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(json_ready(data), indent=1, default=str), encoding="utf-8")
    return path


def previous_results(run_dir: Path, step: int) -> dict[str, Any]:
    """What ``run_dir/summary.json`` recorded of the last optimizer step (loss, losses, grad norm,
    elapsed time) when it describes ``step``: a launch that ran no step (a finished run started
    again) keeps them. Empty when there is no such summary."""
    try:
        old = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("step") != step:
        return {}
    return {k: old[k] for k in _RESULT_KEYS if k in old}


def launch_summary(
    run_dir: Path,
    counters: dict[str, Any],
    train: TrainConfig,
    last: StepResult | None,
    stopped: bool,
    final: Path | None,
    latest: Path | None,
    elapsed: float,
) -> tuple[dict[str, Any], str | None]:
    """The end-of-launch summary from the trainer's ``counters`` and ``last`` (the last optimizer
    step; None when this launch ran none: the previous results are kept), and the bad-fraction warning."""
    c, cfg = counters, train
    policy = BadDataPolicy(cfg.max_bad_fraction, cfg.bad_check_min_samples)
    bad_data, warning = policy.at_end(c["bad_samples"], c["bad_samples"] + c["samples"])
    summary = {
        "step": c["step"],
        "stopped": stopped,
        "status": "stopped" if stopped else "finished",
        "exit_code": EXIT_RESUMABLE if stopped else EXIT_OK,
        "loss": last.loss if last else None,
        "losses": last.losses if last else {},
        "grad_norm": last.grad_norm if last else None,
        "skipped_steps": c["skipped_steps"],
        "bad_samples": c["bad_samples"],
        "samples": c["samples"],
        **bad_data,
        "tokens": c["tokens"],
        "elapsed_s": elapsed,
        "checkpoint": str(latest) if latest else None,
        "final": str(final) if final else None,
    }
    if last is None:  # no step ran (the run had finished): keep what its last step gave
        summary.update(previous_results(run_dir, c["step"]))
    return summary, warning


def finished_summary(run_dir: Path, train: TrainConfig, ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(counters, summary) of a launch with nothing to do (``ResumePlan.nothing_to_do``): the run's
    counters from its checkpoint ``ckpt`` at ``train.steps``, the previous results, ``nothing_to_do``;
    nothing is loaded, ``final/`` and ``history/`` are left as they are."""
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    counters = {"skipped_steps": 0, "bad_samples": 0, "samples": 0, "tokens": 0, "elapsed_s": 0.0}
    counters.update(state["counters"])
    summary, _ = launch_summary(
        run_dir, counters, train, None, False, run_dir / "final", ckpt, counters["elapsed_s"]
    )
    return counters, {**summary, "resumed_from": None, "nothing_to_do": True}


def record_start(run_dir: Path, config: dict, plan: ResumePlan) -> Path:
    """Append this start to ``run_dir/history/`` and write ``run_dir/config.yaml`` (rank 0); returns
    the history entry. A run from before the history existed gets its old ``config.yaml`` as entry 0."""
    hist = run_dir / "history"
    current = run_dir / "config.yaml"
    if not hist.is_dir() and current.is_file():
        hist.mkdir(parents=True, exist_ok=True)
        old = {
            "note": "config.yaml of this run before cmpt kept a history",
            "config": yaml.safe_load(current.read_text()),
        }
        write_yaml(old, hist / "0000-before-history.yaml")
    hist.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    n = 1 + max((int(p.name[:4]) for p in hist.glob("[0-9][0-9][0-9][0-9]-*.yaml")), default=0)
    entry = {
        "time": now.isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "resume": plan.mode,
        "resumed_from": None
        if plan.checkpoint is None
        else {"checkpoint": plan.checkpoint, "step": plan.step},
        "allowed_changes": {k: {"old": o, "new": v} for k, (o, v) in plan.changes.items()},
        "notes": list(plan.notes),
        "config": config,
    }
    path = hist / f"{n:04d}-{now.strftime('%Y%m%dT%H%M%SZ')}.yaml"
    write_yaml(entry, path)
    write_yaml(config, current)
    return path
