"""CoMP training step at CoMP-MM-1B shapes on a GPU: every step-efficiency variant in one run, MFU
against a bf16 matmul measured in the same run (issue 14 item 3; docs/method.md §6).

Model: SigLIP-so400m/14 vision tower + Qwen2.5-0.5B-shaped language model (vocabulary 151,936),
random weights built locally (no hub access), synthetic chart images. Recipe
``comp/siglip-so400m_qwen2.5-0.5b/stage2_pass1.yaml``, the heaviest CoMP stage: every part trains,
RoPE and the alignment loss on, images forced to 1024² (→ 1036², 5,476 patches, 1,369 merged
tokens each). bf16 autocast, fused AdamW.

**Variants** (``gpu_options.variant_list``, data: one line each; ``change`` says what differs from the
variant named in ``before``, and the table gives that change's throughput ratio):

* ``padded`` — text right-padded (``data.packing: false``);
* ``baseline`` — packed text (the default), cmpt's chunked LM loss, eager, no checkpointing;
* the vision attention on SDPA instead of the recipe's varlen kernel — here
  ``vision_sdpa_batched`` (``model.attn: sdpa``: one SDPA call per group of equal-length images;
  stage II pass 1 makes every image 1036², so that is *one batched call per block*, not a loop);
  ``bench_moca_gpu.py``'s ``vision_per_segment`` is transformers' own per-window loop;
* ``text_per_sequence`` — packed text's attention one sequence at a time (the backbone's
  ``text_attn = "sdpa"``: SDPA per group of equal-length sequences on CUDA, in practice one call
  per sequence) instead of one varlen kernel (on the CPU both are the ``cmpt::varlen_sdpa``
  operator: the ratio there is noise);
* ``batch_on_device`` — the whole micro-batch moved to the device, as before ``Task.host_keys``
  (ids, labels and layout on the host, pinned: docs/method.md §7 "Batches on the host");
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
vision attention are switched in place (the baseline first). Each variant: one warm-up pass over
the micro-batches (compilation, dynamic shapes), then ``--steps`` timed steps cycling over them.
Groups run eager, compiled, checkpointed, compiled + checkpointed; after a compiled group
``torch._dynamo.reset()`` (a later group starts with fresh recompile limits).

**MFU = model FLOPs / step time / measured bf16 matmul rate** (8192³ products: ≥ 3 warm-ups and
~0.3 s more for the clocks to ramp, then the mean of ≥ 50 over ≥ 1 s); the datasheet's dense bf16
peak (``gpu_report.DATASHEET_BF16_TFLOPS``, H200: 989 TFLOP/s) is printed beside it, with the MFU against
it. Model FLOPs of a micro-batch are counted once, on the eager baseline, by
``torch.utils.flop_counter``'s formulas in a minimal dispatch mode (:class:`FlopCount`; matmuls
2·m·n·k forward, twice that backward; attention by the SDPA formulas; the alignment loss's caption
forward included), with the LM loss in one chunk (no recomputation) and the ViT and the LLM's
packed text on SDPA per image / per sequence (the counter does not see the varlen kernels), so
attention counts Σ lᵢ² cells — causal text attention too: torch's formula counts every cell, not
the half a causal kernel computes (~+1.3 % of a CoMP step's FLOPs). Grouped key/value heads
(``enable_gqa``) are counted as if expanded to the query's heads, on any torch (torch < 2.13's
formulas reject them). A count that fails (a formula's error, out of memory) leaves the FLOPs
uncounted, with the reason, and the variants are timed all the same. (The formulas know CUDA's
SDPA kernels, not the CPU's: a ``--smoke`` count on the CPU omits attention.) The same figure
divides every variant's time: recomputation (checkpointing) is not useful work, so the MFU of a
checkpointed variant is model, not hardware, FLOP utilisation.

**Output**, flushed as it comes, so that a run killed at its timeout keeps what it measured: the
header, then after each variant its table row and a cumulative JSON line (``"partial": true``,
``"pending"``: the variants still to come), then the whole table and the final JSON line.
``--smoke`` runs the same code on tiny shapes in seconds, on the CPU too, one step per variant
without warm-up (its times mean nothing; liger variants skipped; compiled ones only when named in
``--variants``, with the ``eager`` backend); without CUDA and without ``--smoke`` / ``--shapes
tiny`` the script says so and exits 0. ``--variants`` picks some by name (the baseline always
runs); ``--act-ckpt`` keeps the checkpointed ones; ``--budget-s S`` starts no variant after S
seconds (the eager baseline group always runs; the others are listed as skipped); ``--timeout-s T``
(when the caller kills the process) starts a compiled group only with ≥ :data:`COMPILE_MIN_S` left,
so one call fits a device lease (``benchmarks/device_session.sh``).

Usage: python benchmarks/bench_comp_gpu.py [--images 4] [--steps 8] [--variants a,b] [--smoke]
       [--shapes full|tiny] [--act-ckpt] [--fixed-size 1024] [--budget-s S] [--timeout-s T]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers as tf
from torch import nn

from gpu_harness import Setup, clock_of, device_or_exit, run_bench
from gpu_options import base_args, select_variants

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

    def vision_attention(model: nn.Module, packed: bool) -> None:  # SDPA: batched over equal lengths
        model.vlm.vit.config.attn = cfg.model.attn if packed else "sdpa"

    return Setup(task, batches, lambda m: m.vlm, ViTOnSDPA, title, vision_attention)


def main(argv: list[str] | None = None) -> dict:
    ap = base_args(__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4, help="images per micro-batch (1036² each)")
    ap.add_argument("--fixed-size", type=int, default=1024, help="stage II pass 1 forces 1024²")
    args = ap.parse_args(argv)
    clock = clock_of(args)
    if args.smoke:
        args.shapes, args.images, args.fixed_size, args.steps, args.batches = "tiny", 2, 112, 1, 1
    device = device_or_exit(args.smoke or args.shapes == "tiny", "bench_comp_gpu.py")
    variants = select_variants(args.variants, args.act_ckpt)
    setup = comp_setup(args)
    b0, vit = setup.batches[0], setup.task.vlm.vit
    vit_fwd = sum(n * vit.num_flops_per_token(n) for n in b0["grid_hw"].prod(-1).tolist())
    extra = {"batch 0's ViT fwd+bwd, analytic (cross-check of the count)": f"{3 * vit_fwd / 1e12:.3f} T"}
    return run_bench(
        setup, variants, device, args, clock, {"bench": "comp_gpu", "shapes": args.shapes}, extra
    )


if __name__ == "__main__":
    main()
