"""CoMP training step at CoMP-MM-1B shapes on a GPU: every step-efficiency variant in one run, MFU
against a bf16 matmul measured in the same run (issue 14 item 3; docs/method.md §6).

Model: SigLIP-so400m/14 vision tower + Qwen2.5-0.5B-shaped language model (vocabulary 151,936),
random weights built locally (no hub access), synthetic chart images. Recipe
``comp/siglip-so400m_qwen2.5-0.5b/stage2_pass1.yaml``, the heaviest CoMP stage: every part trains,
RoPE and the alignment loss on, images forced to 1024² (→ 1036², 5,476 patches, 1,369 merged
tokens each). bf16 autocast, fused AdamW.

**Variants** (:data:`VARIANTS`, data: one line each; ``change`` says what differs from the variant
named in ``before``, and the table gives that change's throughput ratio):

* ``padded`` — text right-padded (``data.packing: false``);
* ``baseline`` — packed text (the default), cmpt's chunked LM loss, eager, no checkpointing;
* ``vision_per_segment`` — the vision tower's attention one segment at a time instead of packed
  (CoMP: ``model.attn: sdpa``, per-image SDPA; MoCa: transformers' own per-window SDPA);
* ``text_per_sequence`` — packed text's attention one sequence at a time (the backbone's
  ``text_attn = "sdpa"``: a Python loop of SDPA calls on CUDA) instead of one varlen kernel (on
  the CPU both are the ``cmpt::varlen_sdpa`` operator: the ratio there is noise);
* ``fused_ce`` — ``loss.lm_impl: liger`` (Liger's fused linear CE, needs ``cmpt[liger]``);
* ``compile`` — ``train.compile``: ``torch.compile`` of each transformer block, as the trainer does;
* ``fused_ce+compile``;
* ``ckpt_full`` — ``train.activation_checkpointing: true`` (every block recomputed in backward);
* ``fused_ce+compile+ckpt``.

Selective checkpointing: add its function to :data:`ACT_CKPT` and a ``Variant`` line. A variant
that cannot run here (liger without CUDA / liger-kernel) is listed as skipped; one that fails on
the device (e.g. out of memory) is listed as failed and the others still run.

**One model, many variants.** The task (model on the CPU, data, micro-batches) is built once; each
group of variants that share ``compile`` and ``act_ckpt`` (the two that rewrite modules) trains a
fresh deep copy on the device with its own AdamW, and within a group ``lm_impl``, packing and the
vision attention are switched in place. Each variant: one warm-up pass over the micro-batches
(compilation, dynamic shapes), then ``--steps`` timed steps cycling over them.

**MFU = model FLOPs / step time / measured bf16 matmul rate.** Model FLOPs of a micro-batch are
counted once, on the eager baseline, by ``torch.utils.flop_counter``'s formulas in a minimal
dispatch mode (matmuls 2·m·n·k forward, twice that backward; attention by the SDPA formulas;
the alignment loss's caption forward included), with the LM loss in one chunk (no recomputation)
and the ViT and the LLM's packed text on SDPA per image / per sequence (the counter does not see
the varlen kernels), so attention counts Σ lᵢ² cells. (The
formulas know CUDA's SDPA kernels, not the CPU's: a ``--smoke`` count on the CPU omits attention.) The
same figure divides every variant's time: recomputation (checkpointing) is not useful work, so the
MFU of a checkpointed variant is model, not hardware, FLOP utilisation.

Prints one table, then one JSON line (figures and ratios). ``--smoke`` runs the same code on tiny
shapes in seconds, on the CPU too, one step per variant without warm-up (its times mean nothing; liger
variants skipped; compiled ones only when named in ``--variants``, with the ``eager`` backend);
without CUDA and without ``--smoke`` / ``--shapes tiny`` the script says so and exits 0. One
invocation at full shapes is planned to fit ~4 minutes on one H200 (an estimate: not yet run there).
``--variants`` picks some by name (the baseline always runs); ``--act-ckpt`` keeps the checkpointed
ones; ``--budget-s S`` starts no variant after S seconds (the eager baseline group always runs; the
others are listed as skipped), so one call fits a device lease (``benchmarks/device_session.sh``).

Usage: python benchmarks/bench_comp_gpu.py [--images 4] [--steps 8] [--variants a,b] [--smoke]
       [--shapes full|tiny] [--act-ckpt] [--fixed-size 1024] [--budget-s S]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

VISION = {  # SigLIP-so400m/14 and a tiny stand-in
    "full": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
LM = {  # Qwen2.5-0.5B and a tiny stand-in
    "full": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
    ),
    "tiny": dict(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


@dataclass(frozen=True)
class Variant:
    """One step configuration; ``before``/``change``: the variant it differs from, and how."""

    name: str
    lm_impl: str = "chunked"  # loss.lm_impl
    compile: bool = False  # train.compile (torch.compile per block)
    act_ckpt: str = "off"  # train.activation_checkpointing: a key of ACT_CKPT
    packing: bool = True  # data.packing
    packed_vision: bool = True  # the vision tower's attention packed (the recipe's) or per segment
    text_varlen: bool = True  # packed text on the varlen kernel (auto) or SDPA per sequence (sdpa)
    before: str = ""
    change: str = ""


VARIANTS = [
    Variant("padded", packing=False),
    Variant("baseline", before="padded", change="packed text"),
    Variant("vision_per_segment", packed_vision=False, before="baseline", change="vision attn per segment"),
    Variant("text_per_sequence", text_varlen=False, before="baseline", change="text attn per sequence"),
    Variant("fused_ce", lm_impl="liger", before="baseline", change="fused linear CE (liger)"),
    Variant("compile", compile=True, before="baseline", change="torch.compile per block"),
    Variant("fused_ce+compile", "liger", True, before="compile", change="fused CE, compiled"),
    Variant("ckpt_full", act_ckpt="full", before="baseline", change="full activation checkpointing"),
    Variant("fused_ce+compile+ckpt", "liger", True, "full", before="fused_ce+compile", change="+ full ckpt"),
]


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
    vision_attention: Callable[[nn.Module, bool], None]  # (model, packed): packed or per segment


# --------------------------------------------------------------------------- measuring
def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Rate of a large square matmul in ``dtype`` (the MFU denominator), measured now."""
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, 10, device) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Mean seconds per call after one warm-up, synchronising the device around the loop."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the ops run under it, by ``torch.utils.flop_counter``'s formulas (matmuls,
    convolutions, attention). ``FlopCounterMode`` itself is not used: its module tracker keeps
    checkpointed activations alive (docs/benchmarks.md), which ran a GPU out of memory."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


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
    amp = torch.bfloat16 if device.type == "cuda" else None

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            terms = setup.task.compute_loss(model, batch)
            loss = sum(terms.weights[k] * terms.sums[k] / max(terms.counts[k], 1) for k in terms.sums)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _count_flops(setup: Setup, model: nn.Module, step, batches: list[dict]) -> float:
    """Model FLOPs per micro-batch (mean), on the eager model with the LM loss in one chunk."""
    loss_cfg = model.loss
    model.loss = dataclasses.replace(loss_cfg, lm_impl="chunked", lm_chunk_size=1 << 30)
    try:
        setup.backbone_of(model).text_attn = "sdpa"
        with setup.counting(model), FlopCount() as counter:
            for batch in batches:
                step(batch)
    finally:
        model.loss = loss_cfg
        setup.backbone_of(model).text_attn = "auto"
    return counter.total / len(batches)


def _measure(step, batches: list[dict], steps: int, device: torch.device, warmup: bool) -> dict[str, float]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for batch in batches if warmup else []:  # compilation and every shape once
        step(batch)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
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
    deadline: float | None = None,
) -> tuple[dict[str, dict], float | None]:
    """Every variant's figures (or ``skipped`` / ``failed``) and the model FLOPs per micro-batch
    (None when the eager baseline group could not run);
    ``named``: the variants ``--variants`` asked for. ``smoke``: no warm-up, errors propagate.
    ``deadline`` (``--budget-s``): the eager baseline group always runs; a later group or variant
    reached after it is skipped, so one invocation fits a device lease."""
    batches = [_to_device(b, device) for b in setup.batches]
    steps = max(steps, 1)
    results: dict[str, dict] = {}
    flops: float | None = None
    groups: dict[tuple[bool, str], list[Variant]] = {}
    for v in variants:
        reason = skip_reason(v, device, v.name in named)
        if reason:
            results[v.name] = {"skipped": reason}
        else:
            groups.setdefault((v.compile, v.act_ckpt), []).append(v)
    # eager (counts the FLOPs), compiled, checkpointed, both: the likeliest to matter first (--budget-s)
    for (compiled, ckpt), members in sorted(groups.items(), key=lambda kv: (kv[0][1] != "off", kv[0][0])):
        count = flops is None and not compiled and ckpt == "off"  # the eager baseline group counts
        if not count and over(deadline):
            results.update({v.name: {"skipped": BUDGET_SPENT} for v in members})
            continue
        try:
            counted = _run_group(
                setup,
                members,
                compiled,
                ckpt,
                batches,
                steps,
                smoke,
                device,
                count,
                results,
                None if count else deadline,
            )
            flops = counted if count else flops
        except Exception as e:  # the group could not be set up
            if smoke:
                raise
            traceback.print_exc()
            for v in members:
                results.setdefault(v.name, {"failed": _failure(e)})
        gc.collect()  # the group's model, gradients and optimizer state are gone with its frame
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results, flops


def _failure(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def _run_group(
    setup: Setup,
    members: list[Variant],
    compiled: bool,
    ckpt: str,
    batches: list[dict],
    steps: int,
    smoke: bool,
    device: torch.device,
    count: bool,
    results: dict[str, dict],
    deadline: float | None = None,
) -> float | None:
    """Variants sharing ``compile`` and ``act_ckpt`` on one fresh copy of the model; their figures go
    to ``results``. Returns the model FLOPs per micro-batch when ``count`` (before any rewrite).
    A variant reached after ``deadline`` (a ``time.perf_counter()`` value) is skipped."""
    model, units, param_groups = _copy_to(setup, device)
    opt = torch.optim.AdamW(param_groups, fused=device.type == "cuda")
    step = _step_fn(setup, model, opt, device)
    flops = _count_flops(setup, model, step, batches) if count else None
    apply = ACT_CKPT[ckpt]
    if apply is not None:
        apply(units)
    if compiled:  # as the trainer does (train.compile)
        from cmpt.train.compile import compile_units

        compile_units(units, **({"backend": "eager"} if device.type == "cpu" else {}))
    for v in members:
        if over(deadline):
            results[v.name] = {"skipped": BUDGET_SPENT}
            continue
        model.loss = dataclasses.replace(model.loss, lm_impl=v.lm_impl)
        setup.backbone_of(model).configure_packing(v.packing)
        setup.vision_attention(model, v.packed_vision)
        setup.backbone_of(model).text_attn = "auto" if v.text_varlen else "sdpa"
        try:
            results[v.name] = _measure(step, batches, steps, device, warmup=not smoke)
        except Exception as e:  # one variant's failure (out of memory, a compiler error)
            if smoke:
                raise
            results[v.name] = {"failed": _failure(e)}
            traceback.print_exc()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return flops


BUDGET_SPENT = "the time budget (--budget-s) was spent before it started"


def over(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() > deadline


def _to_device(batch: dict, device: torch.device) -> dict:
    from cmpt.train.distributed import to_device

    return to_device(batch, device)


WIDTHS = (9, 9, 9, 8, 6, 7, 6)


def report(
    setup: Setup,
    variants: list[Variant],
    results: dict[str, dict],
    flops: float | None,
    peak: float,
    device: torch.device,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Print the table and return the JSON figures (printed last by the caller)."""
    patches = sum(int(b["patches"].shape[0]) if b.get("patches") is not None else 0 for b in setup.batches)
    text = sum(int(b["num_tokens"]) for b in setup.batches)
    patches, text = patches / len(setup.batches), text / len(setup.batches)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(setup.title)
    print(f"  {where}; bf16 matmul measured now: {peak:.0f} TFLOP/s")
    counted = "not counted (the baseline group failed)" if flops is None else f"{flops / 1e12:.3f} T"
    print(f"  model FLOPs per micro-batch (counted on the eager baseline): {counted}")
    print(f"  micro-batch (mean of {len(setup.batches)}): {patches:.0f} patches, {text:.0f} text tokens")
    for k, v in extra.items():
        print(f"  {k}: {v}")
    cols = ("step ms", "tok/s", "patch/s", "TFLOP/s", "MFU", "× base", "GiB")
    print(
        f"  {'variant':<22} "
        + " ".join(f"{c:>{w}}" for c, w in zip(cols, WIDTHS))
        + "  change (× throughput)"
    )
    base = results.get("baseline", {}).get("step_s")
    out: dict[str, Any] = {
        "step_ms": {},
        "mfu": {},
        "speedup_vs_baseline": {},
        "change_ratio": {},
        "peak_mem_gib": {},
    }
    for v in variants:
        r = results.get(v.name, {})
        if "step_s" not in r:
            what = f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED: {r.get('failed')}"
            print(f"  {v.name:<22} {what}")
            out.setdefault("not_run", {})[v.name] = what
            continue
        t = r["step_s"]
        tflops = flops / t / 1e12 if flops is not None else float("nan")
        ratio = base / t if base else float("nan")
        prev = results.get(v.before, {}).get("step_s")
        change = f"{v.change} vs {v.before}: ×{prev / t:.3f}" if prev else (v.change or "")
        print(
            f"  {v.name:<22} {t * 1e3:9.1f} {text / t:9,.0f} {patches / t:9,.0f} {tflops:8.1f} "
            f"{100 * tflops / peak:5.1f}% {ratio:7.3f} {r['peak_mem_gib'] or float('nan'):6.1f}  {change}"
        )
        out["step_ms"][v.name] = round(t * 1e3, 2)
        out["mfu"][v.name] = None if flops is None else round(tflops / peak, 4)
        out["speedup_vs_baseline"][v.name] = round(ratio, 4) if base else None
        out["peak_mem_gib"][v.name] = r["peak_mem_gib"] and round(r["peak_mem_gib"], 2)
        if prev:
            out["change_ratio"][f"{v.name} vs {v.before}"] = round(prev / t, 4)
    return {
        "device": where,
        "matmul_peak_tflops": round(peak, 1),
        "model_flop_per_microbatch": flops,
        "patches_per_microbatch": round(patches),
        "text_tokens_per_microbatch": round(text),
        **out,
    }


def select_variants(spec: str, act_ckpt_only: bool) -> list[Variant]:
    """``--variants`` (comma-separated names; the baseline always runs) or all of them."""
    names = {v.name for v in VARIANTS}
    wanted = named(spec) or names
    unknown = sorted(wanted - names)
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {[v.name for v in VARIANTS]}")
    chosen = [v for v in VARIANTS if v.name in wanted | {"baseline"}]
    return [v for v in chosen if v.name == "baseline" or v.act_ckpt != "off"] if act_ckpt_only else chosen


def named(spec: str) -> set[str]:
    return {s.strip() for s in spec.split(",") if s.strip()}


def base_args(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after a warm-up pass)")
    ap.add_argument("--batches", type=int, default=4, help="micro-batches the steps cycle over")
    ap.add_argument("--variants", default="", help="comma-separated names (default: all)")
    ap.add_argument(
        "--act-ckpt", action="store_true", help="only the checkpointed variants (and the baseline)"
    )
    ap.add_argument("--shapes", choices=["full", "tiny"], default="full")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 micro-batches, 1 step: a CPU check")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="seconds from start after which no further variant starts (0: none); the baseline always runs",
    )
    return ap


def deadline_of(args: argparse.Namespace, started: float) -> float | None:
    """``--budget-s`` as a ``time.perf_counter()`` deadline counted from ``started``."""
    return started + args.budget_s if args.budget_s > 0 else None


# --------------------------------------------------------------------------- CoMP
def build_inputs(root: Path, shapes: str, n_samples: int) -> dict[str, Path]:
    """Random-weight HF checkpoints of the two towers, a tokenizer, and synthetic chart data."""
    from cmpt.demo.synthetic import generate
    from cmpt.demo.tiny_lm import train_tokenizer

    vision = tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION[shapes], patch_size=14, image_size=384))
    vision.save_pretrained(root / "vision")
    tok = train_tokenizer(vocab_size=2048)
    lm = tf.Qwen2ForCausalLM(
        tf.Qwen2Config(
            **LM[shapes],
            tie_word_embeddings=True,
            max_position_embeddings=32768,
            rope_theta=1e6,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.pad_token_id,
        )
    )
    lm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    data = generate("charts", n_samples, root / "data")
    return {"vision": root / "vision", "llm": root / "llm", "data": data}


def comp_setup(args: argparse.Namespace) -> Setup:
    from cmpt.recipes import load_recipe
    from cmpt.recipes.comp import CompTask

    root = Path(tempfile.mkdtemp(prefix="cmpt-bench-gpu-"))
    paths = build_inputs(root, args.shapes, 2 * args.batches * args.images)
    merged = ((args.fixed_size + 27) // 28) ** 2
    sets = [
        f"model.vision={paths['vision']}",
        f"model.llm={paths['llm']}",
        "model.init=''",
        f"data.path={paths['data']}",
        "data.image_root=''",
        "loss.vocab_prior=''",
        f"data.max_samples_per_batch={args.images}",
        f"data.vision_budget={args.images * merged}",
        f"stage.resolution.fixed_size={args.fixed_size}",
        f"run.dir={root / 'run'}",
        "data.length_cache=off",
        "data.num_workers=0",
    ]
    cfg, _ = load_recipe("comp/siglip-so400m_qwen2.5-0.5b/stage2_pass1", sets)
    torch.manual_seed(0)
    task = CompTask(cfg)
    loader = iter(task.build_loader(0, 1))
    batches = [next(loader) for _ in range(args.batches)]

    class ViTOnSDPA:  # count the ViT's attention on per-image SDPA (the counter sees its formula)
        def __init__(self, model: nn.Module) -> None:
            self.cfg = model.vlm.vit.config

        def __enter__(self) -> None:
            self.attn, self.cfg.attn = self.cfg.attn, "sdpa"

        def __exit__(self, *exc) -> None:
            self.cfg.attn = self.attn

    title = (
        f"CoMP stage II pass 1 step, {args.shapes} shapes (SigLIP-so400m + Qwen2.5-0.5B), "
        f"{args.images} images of {args.fixed_size}² per micro-batch"
    )

    def vision_attention(model: nn.Module, packed: bool) -> None:
        model.vlm.vit.config.attn = cfg.model.attn if packed else "sdpa"

    return Setup(task, batches, lambda m: m.vlm, ViTOnSDPA, title, vision_attention)


def main(argv: list[str] | None = None) -> dict:
    ap = base_args(__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4, help="images per micro-batch (1036² each)")
    ap.add_argument("--fixed-size", type=int, default=1024, help="stage II pass 1 forces 1024²")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    if args.smoke:
        args.shapes, args.images, args.fixed_size, args.steps, args.batches = "tiny", 2, 112, 1, 1
    device = device_or_exit(args.smoke or args.shapes == "tiny", "bench_comp_gpu.py")
    variants = select_variants(args.variants, args.act_ckpt)
    setup = comp_setup(args)
    peak = matmul_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    results, flops = run_variants(
        setup, variants, device, args.steps, args.smoke, named(args.variants), deadline_of(args, started)
    )
    b0, vit = setup.batches[0], setup.task.vlm.vit
    vit_fwd = sum(n * vit.num_flops_per_token(n) for n in b0["grid_hw"].prod(-1).tolist())
    extra = {"batch 0's ViT fwd+bwd, analytic (cross-check of the count)": f"{3 * vit_fwd / 1e12:.3f} T"}
    figures = report(setup, variants, results, flops, peak, device, extra)
    figures = {"bench": "comp_gpu", "shapes": args.shapes, **figures}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
