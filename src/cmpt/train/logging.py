"""Run metrics: ``metrics.jsonl``, TensorBoard, W&B, a tqdm bar and one summary line per interval.

Only rank 0 writes (the trainer builds a disabled logger elsewhere). ``metrics.jsonl`` holds one
JSON object per logging interval (strict JSON: a non-finite value is ``null``) and survives
resumption: the trainer also logs at every checkpoint step, so the records up to the resumed step
cover every step it trained; on start the lines with a step beyond it are dropped (they belong to
steps that will be trained again) and TensorBoard hides its events from there on (a fresh start:
all of them), new lines are appended. TensorBoard is used only when enabled *and* importable
(otherwise an info line says so); ``train.wandb`` without wandb is refused at start.

What a reader sees (docs/architecture.md, "Logs"):

* **Step lines** (every ``train.log_every`` steps) go through Python logging (``cmpt.train``), or
  above the bar when there is one; the CLI and the trainer make sure INFO lines are printed
  (:mod:`cmpt.log_setup`). The loss is labelled: ``loss (mean of N steps)`` over the interval; the
  bar shows ``last`` (the latest step's loss).
* **One ETA** (:class:`EtaClock`), shown by both the bar and the step lines: tqdm's own rate and
  remaining-time fields are left out of the bar, and the estimate skips the first step of a launch
  (start-up, compilation, workers warming up) once a later step has run.
* **The bar** is drawn only when ``train.progress`` is on *and* standard error is a terminal;
  otherwise (``nohup``, a batch job, a pipe) the step lines alone are printed, with no carriage
  returns in the log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..hub import json_ready
from ..io_atomic import atomic_file

__all__ = ["EtaClock", "IntervalMeter", "MetricsLogger", "StepStats", "format_summary", "truncate_jsonl"]

logger = logging.getLogger("cmpt.train")


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Drop the records of ``path`` with ``step > last_step`` (and unreadable lines); returns kept count."""
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= last_step:
            kept.append(line)
    with atomic_file(path) as tmp:
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    return len(kept)


class StepStats:
    """Per-step accumulation over micro-batches (device tensors: no host sync until the step ends)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.nonfinite = torch.zeros((), dtype=torch.float64)
        self.weights: dict[str, float] = {}
        self.bad = self.samples = self.tokens = 0.0
        self.metrics: dict[str, list] = {}

    def add(self, terms: Any, loss: torch.Tensor, batch: dict) -> None:
        for n, s in terms.sums.items():
            v = s.detach().double()
            self.sums[n] = self.sums[n] + v if n in self.sums else v
        self.weights = {n: float(w) for n, w in terms.weights.items()}
        self.nonfinite = self.nonfinite.to(loss.device) + (~torch.isfinite(loss.detach())).double()
        self.bad += float(batch.get("num_bad", 0))
        self.samples += float(batch.get("num_samples", 0))
        n_tok = batch.get("num_tokens")
        self.tokens += float(n_tok) if n_tok is not None else float(sum(terms.counts.values()))
        for k, v in terms.metrics.items():
            self.metrics.setdefault(k, []).append(v)

    def sums_for(self, names: list[str]) -> list[torch.Tensor]:
        return [self.sums[n].reshape(()).to(self.nonfinite.device) for n in names]

    def mean_metrics(self) -> dict[str, float]:
        return {k: float(sum(float(x) for x in v) / len(v)) for k, v in self.metrics.items()}


class EtaClock:
    """Remaining time of a run: steps left × the mean time of this launch's steps after its first
    (the first one carries start-up and compilation); from the first step alone until a second one."""

    def __init__(self, total_steps: int, start_step: int) -> None:
        self.total, self.start = total_steps, start_step
        self.t0 = time.perf_counter()
        self.t_first: float | None = None

    def eta(self, step: int) -> float:
        """Seconds left after ``step`` has finished (call once per step, in order)."""
        now = time.perf_counter()
        done = step - self.start
        if self.t_first is None:
            self.t_first = now
        if done >= 2:
            per_step = (now - self.t_first) / (done - 1)
        else:
            per_step = (now - self.t0) / max(1, done)
        return max(0, self.total - step) * per_step


class IntervalMeter:
    """Averages of the steps since the last record (losses and grad norm over finite steps only)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.finite = 0
        self.loss = self.grad_norm = 0.0
        self.tokens = self.samples = 0
        self.losses: dict[str, list[float]] = {}
        self.metrics: dict[str, list[float]] = {}

    def add(self, res: Any) -> None:
        """Add one step's result (``loss``, ``losses``, ``grad_norm``, ``nonfinite``, ``tokens``,
        ``samples``, ``metrics`` attributes)."""
        self.tokens += res.tokens
        self.samples += res.samples
        for k, v in res.metrics.items():
            _add(self.metrics, k, v)
        if res.nonfinite:
            return
        self.finite += 1
        self.loss += res.loss
        self.grad_norm += res.grad_norm
        for k, v in res.losses.items():
            if v is not None:
                _add(self.losses, k, v)

    def tokens_per_s(self) -> float:
        return self.tokens / max(1e-9, time.perf_counter() - self.t0)

    def record(self, step: int, lrs: dict[str, float], **extra: Any) -> dict[str, Any]:
        """The ``metrics.jsonl`` record of this interval (``extra``: counters, elapsed_s, eta_s)."""
        wall, n = max(1e-9, time.perf_counter() - self.t0), self.finite
        rec: dict[str, Any] = {"step": step, "loss": self.loss / n if n else float("nan"), "loss_steps": n}
        rec.update({f"loss/{k}": v[0] / v[1] for k, v in sorted(self.losses.items())})
        rec.update({f"lr/{k}": v for k, v in lrs.items()})
        rec["grad_norm"] = self.grad_norm / n if n else float("nan")
        rec.update({f"metric/{k}": v[0] / v[1] for k, v in sorted(self.metrics.items())})
        rec.update(tokens=self.tokens, tokens_per_s=self.tokens / wall)
        rec.update(samples=self.samples, samples_per_s=self.samples / wall)
        rec.update(extra)
        return rec


def _add(acc: dict[str, list[float]], key: str, value: float) -> None:
    a = acc.setdefault(key, [0.0, 0])
    a[0] += float(value)
    a[1] += 1


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_summary(rec: dict[str, Any], total_steps: int) -> str:
    """One line: step, losses, lr, grad norm, throughput, ETA and fault counters."""
    n = int(rec.get("loss_steps", 1))
    label = "loss" if n == 1 else f"loss (mean of {n} steps)"
    parts = [f"step {rec['step']}/{total_steps}", f"{label} {rec.get('loss', float('nan')):.4g}"]
    terms = [f"{k[5:]} {v:.4g}" for k, v in rec.items() if k.startswith("loss/")]
    if len(terms) > 1:
        parts.append("(" + ", ".join(terms) + ")")
    lrs = [v for k, v in rec.items() if k.startswith("lr/")]
    if lrs:
        parts.append(f"lr {max(lrs):.3g}")
    if "grad_norm" in rec:
        parts.append(f"gnorm {rec['grad_norm']:.3g}")
    parts.append(f"{rec.get('tokens_per_s', 0.0):.4g} tok/s")
    parts.append(f"elapsed {_fmt_duration(rec.get('elapsed_s', 0.0))}")
    parts.append(f"eta {_fmt_duration(rec.get('eta_s', float('nan')))}")
    if rec.get("skipped_steps"):
        parts.append(f"skipped {rec['skipped_steps']}")
    if rec.get("bad_samples"):
        parts.append(f"bad {rec['bad_samples']}")
    return " | ".join(parts)


class MetricsLogger:
    """Sinks for the trainer's metrics. ``enabled=False`` (ranks > 0) makes every call a no-op."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        wandb: bool = False,
        progress: bool = True,
        run_name: str = "",
        config: dict | None = None,
    ) -> None:
        self.enabled, self.total_steps, self.progress = enabled, total_steps, progress
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, start_step)
        if tensorboard:
            self._tb = _open_tensorboard(Path(run_dir) / "tensorboard", start_step)
        if wandb:
            self._wandb = _open_wandb(Path(run_dir), run_name, config)
        if progress and _interactive():
            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=run_name or "train",
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",  # one ETA: ours
            )

    def step(self, step: int, loss: float, tokens_per_s: float, eta_s: float) -> None:
        """Advance the progress bar to ``step`` with loss, tokens/s and ETA."""
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix_str(f"last {loss:.4g} | {tokens_per_s:.4g} tok/s | eta {_fmt_duration(eta_s)}")

    def log(self, rec: dict[str, Any]) -> None:
        """Write one interval record (it must have ``step``) to every sink and print its summary."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_ready(rec)) + "\n")  # a non-finite loss is null: strict JSON
        step = int(rec["step"])
        numbers = {k: float(v) for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        line = format_summary(rec, self.total_steps)
        if self._bar is not None:
            self._bar.write(line)
        else:
            logger.info(line)

    def message(self, text: str) -> None:
        """A free-form line (e.g. skipped steps), printed above the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            logger.info(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._tb = self._wandb = self._bar = None


def _interactive() -> bool:
    """Whether standard error is a terminal (a progress bar in a log file is noise)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _open_tensorboard(log_dir: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's wrapper needs the `tensorboard` package
        logger.info("tensorboard is not installed: TensorBoard logging is off (pip install tensorboard)")
        return None
    # events at or after the first step this launch trains are hidden: those of a crashed launch
    # (a fresh start purges them all, as metrics.jsonl is truncated)
    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)


def _open_wandb(run_dir: Path, run_name: str, config: dict | None):
    import wandb  # TrainConfig refuses train.wandb=true without it, at start

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "cmpt"),
        name=run_name or run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config or {},
    )
