"""The generic training loop: it never knows which recipe it runs (docs/architecture.md: ``train.loop``).

A recipe is a :class:`Task` (model, parameter groups, FSDP units, loader, loss). The trainer
owns distribution (``torchrun`` + DDP / FSDP2), precision, activation checkpointing,
``torch.compile``, gradient accumulation, globally normalized losses (docs/method.md §6), clipping, AdamW
with its schedule, non-finite and bad-data guards (the bad-sample limit is decided on counts summed
over ranks, before each step, by :mod:`cmpt.train.bad_data`: docs/method.md §4), atomic resumable
checkpoints, clean stops on SIGTERM / SIGINT and logging.

**Starts and ends.** ``run.dir`` is checked when the trainer is made (a file, or a folder of the
user's holding no cmpt run: :func:`cmpt.train.resume.check_run_dir_owner`) and locked by rank 0 for
the whole run (:func:`cmpt.train.disk.claim_run_dir`: one process per run.dir); ``train.resume`` /
``train.allow_change`` decide where a run continues from and which config changes it accepts
(:mod:`cmpt.train.resume`); ``final/`` is swapped in complete (:mod:`cmpt.io_atomic`);
``run.dir/summary.json`` records ``status`` (``finished`` | ``stopped`` | ``failed``) and
``exit_code`` (:mod:`cmpt.launch`), the bad-sample fraction (:meth:`BadDataPolicy.at_end`) and,
after a launch that ran no step, the previous results (:func:`~cmpt.train.history.previous_results`).
Its ``loss``, ``losses`` and ``grad_norm`` are the last optimizer step's (the progress bar's
``last``); the step lines and ``metrics.jsonl`` average each logging interval, and the run's last
log line names the last step's loss as summary.json's. A finished run started again (its checkpoint
at ``train.steps``, ``final/`` complete: ``ResumePlan.nothing_to_do``) logs one line and returns at
once: no model is wrapped, no loader built, no checkpoint loaded, ``final/`` and ``history/`` stay
as they are, and summary.json records the finished run again with ``"nothing_to_do": true`` and
``"resumed_from": null`` (docs/method.md §4 "Verified checkpoints").

**One optimizer step** (globally normalized losses, accumulation, clipping, the non-finite guard) is
:class:`cmpt.train.step.StepRunner` (docs/method.md §6 "Loss normalization").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import config_hash
from ..io_atomic import atomic_directory
from ..launch import exit_code_for
from ..log_setup import ensure_logging
from . import distributed as D
from .bad_data import BadDataError, BadDataGuard, BadDataPolicy
from .checkpoint import (
    CheckpointManager,
    get_rng_state,
    plain_config,
    save_final_weights,
    set_rng_state,
)
from .compile import compile_units
from .config import OptimConfig, RunConfig, TrainConfig
from .config_diff import IGNORED_KEYS
from .disk import RunDirLock, check_run_dir, claim_run_dir, on_main
from .frozen import FROZEN_KEY, check_frozen, frozen_digest
from .history import finished_summary, launch_summary, record_start, write_summary
from .logging import EtaClock, IntervalMeter, MetricsLogger
from .optim import (
    build_optimizer,
    build_scheduler,
    group_names,
    resolve_groups,
    scheduler_state,
)
from .reshard import DEFAULT_BATCH_KEY, loader_refused
from .resume import (
    ResumeError,
    ResumePlan,
    check_run_dir_owner,
    load_and_reschedule,
    start_run,
)
from .startup import startup_lines
from .step import StepResult, StepRunner
from .task import Loader, LossTerms, Task

__all__ = ["BadDataError", "Loader", "LossTerms", "NonFiniteError", "Task", "Trainer"]

logger = logging.getLogger("cmpt.train")


class NonFiniteError(RuntimeError):
    """More than ``train.max_nonfinite`` optimizer steps had a non-finite loss or gradient norm."""


class Trainer:
    """Train ``task`` with the generic ``run`` / ``optim`` / ``train`` sections; :meth:`fit` runs it."""

    def __init__(
        self,
        run: RunConfig,
        optim: OptimConfig,
        train: TrainConfig,
        task: Task,
        full_config: dict | Any | None = None,
    ) -> None:
        self.run, self.optim_cfg, self.cfg, self.task = run, optim, train, task
        self.full_config = full_config
        self.run_dir = Path(run.dir)
        check_run_dir(self.run_dir)  # a file there: refused before anything is built
        check_run_dir_owner(self.run_dir)  # a user's folder, no run in it: refused too
        self._lock: RunDirLock | None = None  # rank 0's, from the start of fit() to its end
        self._stop = False
        self._started = False  # past the resume checks: summary.json describes this launch
        self.plan: ResumePlan | None = None
        self.counters: dict[str, Any] = {"step": 0}
        self.metrics: MetricsLogger | None = None
        self.model: nn.Module | None = None  # as trained (maybe DDP-wrapped)
        self.module: nn.Module | None = None  # unwrapped (FSDP2 shards in place)

    # ------------------------------------------------------------------ public
    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return (what SIGTERM / SIGINT do)."""
        self._stop = True

    def fit(self) -> dict[str, Any]:
        """Train up to ``train.steps`` (resuming as ``train.resume`` says); returns the summary, which
        ``run.dir/summary.json`` also holds (with ``status`` and ``exit_code``, also on failure)."""
        ensure_logging()  # step lines must reach the user (a no-op when logging is configured)
        world, started = D.init_distributed()
        previous = self._install_signal_handlers()
        ok = False
        try:
            summary = self._fit(world)
            ok = True
            return summary
        except BaseException as e:
            self._write_summary({"status": "failed", "exit_code": exit_code_for(e), "error": f"{e!r}"})
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.metrics is not None:
                self.metrics.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            if started:  # no barrier after an error: the other ranks may be gone
                self.model = None  # the wrapper's process-group reference goes before the group
                if ok:
                    D.barrier()
                D.destroy(wait=False)

    # ------------------------------------------------------------------ setup
    def _fit(self, world: D.WorldInfo) -> dict[str, Any]:
        self.world, cfg = world, self.cfg
        # under torchrun with > 1 process, "none" means DDP; a single process is never wrapped
        self.mode = "none" if world.world_size == 1 else ("fsdp" if cfg.dist == "fsdp" else "ddp")
        bf16 = D.trains_in_bf16(cfg.precision, world.device)
        self._precision = "bf16 autocast" if bf16 else "fp32"
        self._amp = (lambda: torch.autocast(world.device.type, dtype=torch.bfloat16)) if bf16 else None
        D.seed_all(self.run.seed + world.rank)

        self._lock = claim_run_dir(self.run_dir, world)  # before anything reads or writes run.dir
        ckpt = CheckpointManager(self.run_dir / "checkpoints", world, keep_last=cfg.keep_last)
        ckpt.clean_incomplete()
        ignored = (*IGNORED_KEYS, *getattr(self.task, "resume_ignored_keys", ()))
        self._batch_key = getattr(self.task, "world_batch_key", DEFAULT_BATCH_KEY)
        args = (ckpt, self.run_dir, cfg, self._config_dict(), ignored, self._batch_key)
        plan, self._fingerprint = start_run(*args)
        self.plan, self._started = plan, True
        if plan.nothing_to_do:  # finished, final/ complete: nothing is wrapped, loaded or rewritten
            self.counters, summary = finished_summary(self.run_dir, self.cfg, Path(plan.checkpoint))
            return self._write_summary(summary)
        self._build_model()
        if cfg.grad_accum > 1 and not hasattr(self.task, "loss_counts") and world.is_main:
            logger.info(
                "the task has no loss_counts(batch): the %d forwards of a step run before their "
                "backwards, keeping %d graphs in memory",
                cfg.grad_accum,
                cfg.grad_accum,
            )
        self.loader = self.task.build_loader(world.rank, world.world_size)
        policy = BadDataPolicy(cfg.max_bad_fraction, cfg.bad_check_min_samples)
        self.bad_data = BadDataGuard(policy, lockstep=getattr(self.loader, "lockstep", False))
        self.counters = {"step": 0, "skipped_steps": 0, "bad_samples": 0, "samples": 0, "tokens": 0}
        self.counters["elapsed_s"] = 0.0
        resumed_from = None
        if plan.checkpoint is not None:  # the config's lr, schedule and hyper-parameters, not the saved
            args = (plan.checkpoint, self._frozen, self._config_dict(), cfg.allow_change)
            note = on_main(world.is_main, lambda: check_frozen(*args))
            if note and world.is_main:
                logger.warning("%s", note)
            tstate, rstate = load_and_reschedule(ckpt, plan, self.module, self.optimizer, self.scheduler)
            self.counters.update(tstate["counters"])
            set_rng_state(rstate["rng"])
            try:
                self.loader.load_state_dict(rstate["loader"])
            except ValueError as e:  # another global batch (cmpt.train.reshard) or other data
                saved = int(tstate.get("world_size", world.world_size))
                msg = loader_refused(plan.checkpoint, e, saved, world.world_size, self._batch_key)
                raise ResumeError(msg) from None
            self.bad_data.load_state_dict(rstate.get("bad_data", {}))
            resumed_from = self.counters["step"]
        if world.is_main:  # only a start that got this far is recorded (a refused one is not)
            record_start(self.run_dir, self._config_dict(), plan)

        self.metrics = MetricsLogger(
            self.run_dir,
            enabled=world.is_main,
            total_steps=cfg.steps,
            start_step=self.counters["step"],
            tensorboard=cfg.tensorboard,
            wandb=cfg.wandb,
            progress=cfg.progress,
            run_name=self.run.name,
            config=self._config_dict(),
        )
        for line in startup_lines(
            self.module,
            world_size=world.world_size,
            mode=self.mode,
            precision=self._precision,
            device=str(world.device),
            grad_accum=cfg.grad_accum,
            loader=self.loader,
            budgets=getattr(self.loader, "token_budgets", None),
        ):
            self.metrics.message(line)
        summary = self._loop(ckpt)
        return self._write_summary({**summary, "resumed_from": resumed_from})

    def _write_summary(self, summary: dict[str, Any]) -> dict[str, Any]:
        """``run.dir/summary.json`` (rank 0, atomic) once the run has started; returns what it holds:
        ``summary`` plus ``steps`` and ``resume`` (the :class:`~cmpt.train.resume.ResumePlan`)."""
        data = {"step": self.counters.get("step"), "steps": self.cfg.steps, **summary}
        data["resume"] = dataclasses.asdict(self.plan) if self.plan else None
        if self._started and self.world.is_main:
            write_summary(self.run_dir, data)
        return data

    def _build_model(self) -> None:
        """Move, checkpoint, compile and wrap the task's model; build the optimizer. FSDP2 starts from
        a meta-device copy and rank 0's weights (:func:`cmpt.train.distributed.shard_fsdp`), in
        bf16 with fp32 gradient reduction when the run trains in bf16."""
        world, cfg = self.world, self.cfg
        model = self.task.model
        named = group_names(model, self.task.param_groups())
        units = list(self.task.fsdp_units())
        if self.mode != "fsdp":  # FSDP2 allocates each rank's own shards on the device
            model.to(world.device)
        # rank 0 holds the full weights until they are sharded (cmpt.train.frozen)
        self._frozen = frozen_digest(model) if world.is_main else {}
        if cfg.ac_mode != "none":
            D.apply_activation_checkpointing(units, cfg.ac_mode, cfg.ac_every)
        if cfg.compile:
            compile_units(units)
        self.module = model
        if self.mode == "fsdp":
            mp = D.mixed_precision(self._amp is not None)
            self.model = D.shard_fsdp(model, units, world.device, mp)
        elif self.mode == "ddp":
            self.model = D.wrap_ddp(model, world.device)
        else:
            self.model = model
        self.optimizer = build_optimizer(resolve_groups(self.module, named, self.optim_cfg), self.optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, self.optim_cfg, cfg.steps)
        self.steps = StepRunner(
            self.task, self.model, self.optimizer, mode=self.mode, device=world.device,
            world_size=world.world_size, grad_accum=cfg.grad_accum, clip_grad=self.optim_cfg.clip_grad,
            amp=self._amp,
        )  # fmt: skip

    def _config_dict(self) -> dict:
        return plain_config(self.full_config, run=self.run, optim=self.optim_cfg, train=self.cfg)

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop and signum == signal.SIGINT:
            raise KeyboardInterrupt("second SIGINT: aborting without a checkpoint")
        self._stop = True
        name = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, then saving a checkpoint", name)

    # ------------------------------------------------------------------ loop
    def _loop(self, ckpt: CheckpointManager) -> dict[str, Any]:
        cfg, c = self.cfg, self.counters
        it = iter(self.loader)
        start_step, t_start = c["step"], time.perf_counter()
        meter, last, stopped, clock = IntervalMeter(), None, False, EtaClock(cfg.steps, c["step"])
        while c["step"] < cfg.steps:
            seen = c["bad_samples"] + c["samples"]
            batches, bad, good = self.bad_data.take(it, cfg.grad_accum, c["step"] + 1, c["bad_samples"], seen)
            res = self.steps.run(batches, bad, good, lambda: self._stop)
            lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
            self.scheduler.step()
            c["step"] += 1
            step, last = c["step"], res
            c["bad_samples"] += res.bad
            c["samples"] += res.samples
            c["tokens"] += res.tokens
            meter.add(res)
            elapsed_run = time.perf_counter() - t_start
            eta = clock.eta(step)
            self.metrics.step(step, res.loss, meter.tokens_per_s(), eta)
            self._check_faults(step, res)
            if step == start_step + 1:  # time to first step, length index part (cmpt.data.length_cache)
                from ..data.length_cache import first_step_message

                self.metrics.message(first_step_message(self.loader) + f"; {res.tokens:,} tokens in it")
            save = res.stop or (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps
            if save or (cfg.log_every and step % cfg.log_every == 0):  # a checkpoint's steps are logged
                extra = {k: c[k] for k in ("skipped_steps", "bad_samples")}
                rec = meter.record(step, lrs, **extra, elapsed_s=c["elapsed_s"] + elapsed_run, eta_s=eta)
                self.metrics.log(rec)
                meter = IntervalMeter()
            if save:
                self._save(ckpt, elapsed_run)
                if res.stop and step < cfg.steps:
                    stopped = True
                    break
        run_time = time.perf_counter() - t_start
        final = None if stopped else self._save_final()
        args = (self.run_dir, c, cfg, last, stopped, final, ckpt.latest(), c["elapsed_s"] + run_time)
        summary, warning = launch_summary(*args)
        if warning and self.world.is_main:  # the counts are global: every rank agrees
            logger.warning("%s", warning)
        if last is not None:  # which loss summary.json holds (the step lines average intervals)
            terms = [f"{k} {v:.4g}" for k, v in sorted(last.losses.items()) if v is not None]
            self.metrics.message(
                f"{summary['status']} at step {c['step']}/{cfg.steps}; last step: loss {last.loss:.4g}"
                + (f" ({', '.join(terms)})" if len(terms) > 1 else "")
                + ' = summary.json "loss" (the step lines show means over their interval)'
            )
        return summary

    def _check_faults(self, step: int, res: StepResult) -> None:
        """Count a skipped (non-finite) step; raise past ``max_nonfinite`` (the bad-sample limit is
        applied before the step, by :class:`~cmpt.train.bad_data.BadDataGuard`)."""
        cfg, c = self.cfg, self.counters
        if res.nonfinite:
            c["skipped_steps"] += 1
            self.metrics.message(f"step {step}: non-finite loss or grad norm, update skipped")
            if c["skipped_steps"] > cfg.max_nonfinite:
                raise NonFiniteError(
                    f"{c['skipped_steps']} steps had a non-finite loss or gradient norm "
                    f"(train.max_nonfinite = {cfg.max_nonfinite}); the last at step {step}"
                )

    def _save(self, ckpt: CheckpointManager, elapsed_run: float) -> None:
        counters = {**self.counters, "elapsed_s": self.counters["elapsed_s"] + elapsed_run}
        trainer_state = {"counters": counters, "scheduler": scheduler_state(self.scheduler)}
        trainer_state["config_hash"] = config_hash(self._config_dict())
        trainer_state["config"] = self._config_dict()  # compared on resume (cmpt.train.resume)
        trainer_state["data_fingerprint"] = self._fingerprint
        trainer_state[FROZEN_KEY] = self._frozen  # checked on resume (cmpt.train.frozen)
        rank_state = {"rng": get_rng_state(), "loader": self.loader.state_dict()}
        rank_state["bad_data"] = self.bad_data.state_dict()
        ckpt.save(self.counters["step"], self.module, self.optimizer, trainer_state, rank_state)

    def _save_final(self) -> Path:
        """``run.dir/final``, swapped into place complete (:func:`cmpt.io_atomic.atomic_directory`)."""
        out, main = self.run_dir / "final", self.world.is_main
        info = {"step": self.counters["step"], "task": type(self.task).__name__}
        ctx = atomic_directory(out, "cmpt.train.Trainer", **info) if main else contextlib.nullcontext(out)
        with ctx as tmp:
            save_final_weights(self.task, self.module, tmp, main)
        D.barrier()
        return out
