"""What a GPU step benchmark is asked to run (issue 14 item 3; docs/method.md §6): the variants, each
naming the one it differs from, and the command-line options ``bench_comp_gpu.py`` and
``bench_moca_gpu.py`` share; ``gpu_harness.py`` runs them."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

#: seconds a compiled group needs (compilation, dynamic-shape recompiles, timed steps): it starts
#: only with this much left before ``--timeout-s``.
COMPILE_MIN_S = 120.0


@dataclass(frozen=True)
class Variant:
    """One step configuration; ``before``/``change``: the variant it differs from, and how."""

    name: str
    lm_impl: str = "chunked"  # loss.lm_impl
    compile: bool = False  # train.compile (torch.compile per block)
    act_ckpt: str = "off"  # train.activation_checkpointing: a key of ACT_CKPT
    packing: bool = True  # data.packing
    packed_vision: bool = True  # the vision tower's attention packed (the recipe's) or on SDPA
    text_varlen: bool = True  # packed text on the varlen kernel (auto) or SDPA per sequence (sdpa)
    host_keys: bool = True  # the task's host_keys left on the host (the trainer's) or all on the device
    before: str = ""
    change: str = ""


def variant_list(vision_sdpa: Variant) -> list[Variant]:
    """A benchmark's variants; ``vision_sdpa``: its vision tower's attention on SDPA (what that
    means differs between the towers, hence its name and ``change`` are the benchmark's)."""
    return [
        Variant("padded", packing=False),
        Variant("baseline", before="padded", change="packed text"),
        dataclasses.replace(vision_sdpa, packed_vision=False, before="baseline"),
        Variant("text_per_sequence", text_varlen=False, before="baseline", change="text attn per sequence"),
        Variant("batch_on_device", host_keys=False, before="baseline", change="whole batch on the device"),
        Variant("fused_ce", lm_impl="liger", before="baseline", change="fused linear CE (liger)"),
        Variant("compile", compile=True, before="baseline", change="torch.compile per block"),
        Variant("fused_ce+compile", "liger", True, before="compile", change="fused CE, compiled"),
        Variant("ckpt_full", act_ckpt="full", before="baseline", change="full activation checkpointing"),
        Variant(
            "fused_ce+compile+ckpt", "liger", True, "full", before="fused_ce+compile", change="+ full ckpt"
        ),
    ]


#: CoMP's: equal-size images (1036²) make cmpt's SDPA path one batched call per block.
VARIANTS = variant_list(Variant("vision_sdpa_batched", change="vision attn: batched SDPA"))


def select_variants(spec: str, act_ckpt_only: bool, variants: list[Variant] = VARIANTS) -> list[Variant]:
    """``--variants`` (comma-separated names; the baseline always runs) or all of them."""
    names = {v.name for v in variants}
    wanted = named(spec) or names
    unknown = sorted(wanted - names)
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {[v.name for v in variants]}")
    chosen = [v for v in variants if v.name in wanted | {"baseline"}]
    return [v for v in chosen if v.name == "baseline" or v.act_ckpt != "off"] if act_ckpt_only else chosen


def named(spec: str) -> set[str]:
    return {s.strip() for s in spec.split(",") if s.strip()}


def base_args(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after a warm-up pass)")
    ap.add_argument("--batches", type=int, default=4, help="micro-batches the steps cycle over")
    ap.add_argument(
        "--grad-accum", type=int, default=0, help="micro-batches per optimizer step (0: the recipe's)"
    )
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
    ap.add_argument(
        "--timeout-s",
        type=float,
        default=0.0,
        help=f"seconds from start at which the caller kills this process (0: none): a compiled group "
        f"starts only with >= {COMPILE_MIN_S:.0f} s left",
    )
    return ap
