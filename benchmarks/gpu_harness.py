"""The GPU step-benchmark harness shared by ``bench_comp_gpu.py`` and ``bench_moca_gpu.py`` (issue 14
item 3; docs/method.md §6): the variants' groups, the time budget, each group's model copy, step
and timing loop. The variants and the shared options are in ``gpu_options.py``; the matmul peak,
the timing helpers and the model-FLOP count (grouped key/value heads counted as the query's on any
torch) in ``gpu_measure.py``; the reporter (a table row and a cumulative JSON line after every
variant) and the datasheet peaks in ``gpu_report.py``.
See ``bench_comp_gpu.py``'s docstring for how a run is organised."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gpu_measure import FlopCount, failure, matmul_tflops, sync
from gpu_options import COMPILE_MIN_S, Variant, named
from gpu_report import Reporter


def _full_checkpointing(units: list[nn.Module]) -> None:
    from cmpt.train.distributed import apply_activation_checkpointing

    apply_activation_checkpointing(units)


#: ``act_ckpt`` value → how the trainer applies it to the blocks (None: nothing to apply).
ACT_CKPT: dict[str, Callable[[list[nn.Module]], None] | None] = {"off": None, "full": _full_checkpointing}


@dataclass
class Setup:
    """What the harness needs from a recipe: the task (model on the CPU), its micro-batches, how to
    reach the backbone inside the objective, and how to count a batch's patches and text tokens."""

    task: Any
    batches: list[dict]
    backbone_of: Callable[[nn.Module], nn.Module]
    counting: Callable[[nn.Module], Any]  # context manager: the model set up for FLOP counting
    title: str
    vision_attention: Callable[[nn.Module, bool], None]  # (model, packed): packed or on SDPA
    grad_accum: int = 1  # micro-batches per optimizer step, as the recipe trains (run_bench sets it)


@dataclass
class Clock:
    """A run's time limits in seconds from ``started`` (a ``time.perf_counter()`` value; 0: none):
    after ``budget_s`` no variant starts; at ``timeout_s`` the caller kills the process, so a
    compiled group starts only with :data:`COMPILE_MIN_S` left."""

    started: float
    budget_s: float = 0.0
    timeout_s: float = 0.0

    def spent(self) -> bool:
        return self.budget_s > 0 and time.perf_counter() - self.started > self.budget_s

    def left(self) -> float | None:
        """Seconds before ``timeout_s`` (None: no timeout)."""
        return None if self.timeout_s <= 0 else self.timeout_s - (time.perf_counter() - self.started)


@dataclass
class Run:
    """What a run has measured so far: each variant's figures (or ``skipped`` / ``failed``), the
    model FLOPs per micro-batch, or why they were not counted; ``on_done(run, name)`` is called as
    each variant's entry is recorded."""

    results: dict[str, dict] = field(default_factory=dict)
    flops: float | None = None
    flops_note: str = ""  # why the FLOPs were not counted ("" when counted, or not yet)
    on_done: Callable[[Run, str], None] | None = None

    def record(self, name: str, result: dict) -> None:
        self.results[name] = result
        if self.on_done is not None:
            self.on_done(self, name)


def device_or_exit(smoke: bool, script: str) -> torch.device:
    """CUDA when present; the CPU for a smoke run; else a message and exit 0."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if smoke:
        return torch.device("cpu")
    print(f"{script}: no CUDA device here, nothing measured (a GPU benchmark; --smoke runs it on the CPU)")
    sys.exit(0)


def skip_reason(v: Variant, device: torch.device, named: bool) -> str:
    """Why ``v`` does not run here ("" = it runs); ``named``: asked for by ``--variants``."""
    from cmpt.losses.fused_ce import liger_available

    if v.compile and device.type == "cpu" and not named:
        return "compilation on the CPU takes minutes: name it in --variants to run it"
    if v.lm_impl == "liger" and (device.type != "cuda" or not liger_available()):
        return "needs CUDA and liger-kernel (pip install 'cmpt[liger]')"
    if v.act_ckpt not in ACT_CKPT:
        return f"activation checkpointing {v.act_ckpt!r} is not offered here (ACT_CKPT)"
    return ""


def _copy_to(setup: Setup, device: torch.device) -> tuple[nn.Module, list[nn.Module], list[dict]]:
    """A deep copy of the task's objective on ``device``, its blocks and its parameter groups."""
    pristine = setup.task.model
    model = copy.deepcopy(pristine).to(device)
    module_names = {id(m): n for n, m in pristine.named_modules()}
    units = [model.get_submodule(module_names[id(u)]) for u in setup.task.fsdp_units()]
    param_names = {id(p): n for n, p in pristine.named_parameters()}
    groups = [
        {**g, "params": [model.get_parameter(param_names[id(p)]) for p in g["params"]]}
        for g in setup.task.param_groups()
    ]
    return model, units, groups


def _step_fn(setup: Setup, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device):
    """One micro-batch's forward and backward; ``update``: then the optimizer step (the last
    micro-batch of a step of ``setup.grad_accum``)."""
    amp = torch.bfloat16 if device.type == "cuda" else None

    def step(batch: dict, update: bool = True) -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            terms = setup.task.compute_loss(model, batch)
            loss = sum(terms.weights[k] * terms.sums[k] / max(terms.counts[k], 1) for k in terms.sums)
        loss.backward()
        if update:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _count_flops(setup: Setup, model: nn.Module, step, batches: list[dict]) -> tuple[float | None, str]:
    """Model FLOPs per micro-batch (mean), on the eager model with the LM loss in one chunk, or
    None and why they could not be counted (a count never stops the timing that follows)."""
    loss_cfg = model.loss
    counter = FlopCount()
    try:
        model.loss = dataclasses.replace(loss_cfg, lm_impl="chunked", lm_chunk_size=1 << 30)
        setup.backbone_of(model).text_attn = "sdpa"
        with setup.counting(model), counter:
            for batch in batches:
                step(batch, update=False)
    except Exception as e:  # e.g. out of memory: time the variants anyway
        traceback.print_exc()
        return None, f"the counting pass failed: {failure(e)}"
    finally:
        model.loss = loss_cfg
        setup.backbone_of(model).text_attn = "auto"
        model.zero_grad(set_to_none=True)
    if counter.errors:
        return None, "a FLOP formula failed: " + "; ".join(f"{k}: {v}" for k, v in counter.errors.items())
    return counter.total / len(batches), ""


def _measure(
    step, batches: list[dict], steps: int, device: torch.device, warmup: bool, accum: int = 1
) -> dict[str, float]:
    """Seconds per micro-batch over ``steps`` micro-batches (a multiple of ``accum``: an optimizer
    step after every ``accum``, as training does), after a warm-up over every batch."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for batch in batches if warmup else []:  # compilation and every shape once
        step(batch)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)], update=(i + 1) % accum == 0)
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"step_s": seconds, "peak_mem_gib": mem}


def run_variants(
    setup: Setup,
    variants: list[Variant],
    device: torch.device,
    steps: int,
    smoke: bool,
    named: set[str],
    clock: Clock | None = None,
    on_done: Callable[[Run, str], None] | None = None,
) -> Run:
    """Every variant's figures (or ``skipped`` / ``failed``) and the model FLOPs per micro-batch
    (None, with the reason, when they could not be counted); ``named``: the variants ``--variants``
    asked for. ``smoke``: no warm-up, a variant's error propagates. ``clock``: the eager baseline
    group always runs; a later group or variant reached after the budget is skipped, and so is a
    compiled group with less than :data:`COMPILE_MIN_S` left before the timeout."""
    batches = {keep: placed_batches(setup, device, keep) for keep in (True, False)}
    steps = -(-max(steps, 1) // setup.grad_accum) * setup.grad_accum  # whole optimizer steps
    run = Run(on_done=on_done)
    groups: dict[tuple[bool, str], list[Variant]] = {}
    for v in variants:
        reason = skip_reason(v, device, v.name in named)
        if reason:
            run.record(v.name, {"skipped": reason})
        else:
            groups.setdefault((v.compile, v.act_ckpt), []).append(v)
    # eager (counts the FLOPs), compiled, checkpointed, both: the likeliest to matter first
    for (compiled, ckpt), members in sorted(groups.items(), key=lambda kv: (kv[0][1] != "off", kv[0][0])):
        members.sort(key=lambda v: v.name != "baseline")  # the headline first
        count = not compiled and ckpt == "off"  # the eager baseline group counts, and always runs
        why = "" if count else _why_not_start(compiled, clock)
        if why:
            for v in members:
                run.record(v.name, {"skipped": why})
            continue
        try:
            _run_group(setup, members, compiled, ckpt, batches, steps, smoke, device, count, run, clock)
        except Exception as e:  # the group could not be set up
            if smoke:
                raise
            traceback.print_exc()
            for v in members:
                if v.name not in run.results:
                    run.record(v.name, {"failed": failure(e)})
        finally:
            gc.collect()  # the group's model, gradients and optimizer state are gone with its frame
            if compiled:  # fresh recompile limits and caches for a later compiled group
                torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return run


def _why_not_start(compiled: bool, clock: Clock | None) -> str:
    """Why a group (not the eager baseline's) does not start now ("" = it starts)."""
    if clock is None:
        return ""
    if clock.spent():
        return BUDGET_SPENT
    left = clock.left()
    if compiled and left is not None and left < COMPILE_MIN_S:
        return (
            f"compilation needs ≥ {COMPILE_MIN_S:.0f} s and {max(left, 0):.0f} s were left before --timeout-s"
        )
    return ""


def _run_group(
    setup: Setup,
    members: list[Variant],
    compiled: bool,
    ckpt: str,
    batches: dict[bool, list[dict]],
    steps: int,
    smoke: bool,
    device: torch.device,
    count: bool,
    run: Run,
    clock: Clock | None = None,
) -> None:
    """Variants sharing ``compile`` and ``act_ckpt`` on one fresh copy of the model, their figures
    recorded in ``run``; ``count``: count the model FLOPs first (before any rewrite) and ignore the
    budget. A variant reached after the budget is skipped. ``batches``: the micro-batches with the
    task's ``host_keys`` on the host (True) or all on the device (False)."""
    model, units, param_groups = _copy_to(setup, device)
    opt = torch.optim.AdamW(param_groups, fused=device.type == "cuda")
    step = _step_fn(setup, model, opt, device)
    if count:
        run.flops, run.flops_note = _count_flops(setup, model, step, batches[True])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    apply = ACT_CKPT[ckpt]
    if apply is not None:
        apply(units)
    if compiled:  # as the trainer does (train.compile)
        from cmpt.train.compile import compile_units

        compile_units(units, **({"backend": "eager"} if device.type == "cpu" else {}))
    for v in members:
        if not count and clock is not None and clock.spent():
            run.record(v.name, {"skipped": BUDGET_SPENT})
            continue
        model.loss = dataclasses.replace(model.loss, lm_impl=v.lm_impl)
        setup.backbone_of(model).configure_packing(v.packing)
        setup.vision_attention(model, v.packed_vision)
        setup.backbone_of(model).text_attn = "auto" if v.text_varlen else "sdpa"
        try:
            result = _measure(
                step, batches[v.host_keys], steps, device, warmup=not smoke, accum=setup.grad_accum
            )
        except Exception as e:  # one variant's failure (out of memory, a compiler error)
            if smoke:
                raise
            traceback.print_exc()
            result = {"failed": failure(e)}
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        run.record(v.name, result)


BUDGET_SPENT = "the time budget (--budget-s) was spent before it started"


def placed_batches(setup: Setup, device: torch.device, host_keys: bool = True) -> list:
    """The setup's micro-batches placed as the trainer places them (``host_keys``: the task's
    ``host_keys`` stay on the host, pinned on CUDA as the data loader's are) or all on the device."""
    from cmpt.train.distributed import to_device

    keep = frozenset(getattr(setup.task, "host_keys", ())) if host_keys else frozenset()
    pin = device.type == "cuda"
    out = []
    for b in setup.batches:
        b = {k: v.pin_memory() if pin and k in keep and torch.is_tensor(v) else v for k, v in b.items()}
        out.append(to_device(b, device, keep=keep))
    return out


def run_bench(
    setup: Setup,
    variants: list[Variant],
    device: torch.device,
    args: argparse.Namespace,
    clock: Clock,
    meta: dict[str, Any],
    extra: dict[str, str],
    more: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure the matmul peak, run the variants and report as they finish; the final figures.
    Micro-batches per optimizer step: ``--grad-accum``, else the recipe's ``train.grad_accum``."""
    setup.grad_accum = args.grad_accum or int(setup.task.cfg.train.grad_accum)
    meta = {**meta, "grad_accum": setup.grad_accum}
    peak = matmul_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    reporter = Reporter(setup, variants, peak, device, meta, extra, more or {})
    reporter.header()
    run = run_variants(
        setup, variants, device, args.steps, args.smoke, named(args.variants), clock, reporter.progress
    )
    return reporter.final(run)


def clock_of(args: argparse.Namespace) -> Clock:
    """``--budget-s`` and ``--timeout-s``, counted from now."""
    return Clock(time.perf_counter(), args.budget_s, args.timeout_s)
