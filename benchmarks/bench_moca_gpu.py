"""MoCa CPT training step at Qwen2.5-VL-3B shapes on a GPU: every step-efficiency variant in one
run, MFU against a bf16 matmul measured in the same run (issue 14 item 3; docs/method.md §3, §6).

The twin of ``bench_comp_gpu.py`` (same variants, harness ``gpu_harness.py``, table and JSON lines; see its
docstring) for recipe ``moca/qwen2.5-vl-3b/cpt.yaml``: ``L = L_MLM + 0.1·L_MAE``, bidirectional LLM, packed
text, every part trainable (vision, merger, LLM, LM head, MAE decoder), bf16 autocast, fused AdamW.

**Model**: a Hugging Face ``Qwen2_5_VLForConditionalGeneration`` with random weights, built here
from the dimensions of Qwen2.5-VL-3B-Instruct — text: hidden 2048, 36 layers, 16 heads, 2 KV
heads, intermediate 11008, vocabulary 151,936, tied head, M-RoPE; vision: 32 blocks, hidden 1280,
16 heads, SwiGLU intermediate 3420, patch 14, 2×2 merge, window attention (112-pixel windows = 8×8
patches) with full attention in blocks 7, 15, 23, 31 — and loaded through cmpt's
``QwenVLBackbone``, exactly as the recipe loads the real checkpoint (saved in bf16, trained in
float32 master weights). The tokenizer is cmpt's tiny BPE (labels are ids below its size, logits
span the full vocabulary). Data: the offline MoCa corpus (``cmpt data synth --kind moca``:
interleaved documents with up to 3 images + text-only passages), images at the recipe's
resolution policy (256·28² … 1024·28² pixels, so ≥ 1,024 patches each); micro-batches by token
budget (``--text-budget`` text rows including image placeholders, ``--vision-budget`` merged
vision tokens; defaults sized so that the variants without checkpointing fit one H200).

**FLOPs.** The MFU numerator is counted as in ``bench_comp_gpu.py`` (``torch.utils.flop_counter``
formulas on the eager baseline, the vision tower's packed attention on SDPA, batched per segment
length, so that the counter sees it; the timed steps run the recipe's ``model.vit_attn``, a varlen
kernel on CUDA). A closed form is printed beside it as a cross-check; forward FLOPs of one
micro-batch, and ×3 for forward + backward:

* LLM, per layer: ``2·N·(2·H² + 2·H·kv·d + 3·H·I)`` (q, o; k, v; gate, up, down) for ``N`` text
  rows, plus attention ``4·H·Σᵢ lᵢ²`` over the packed sequences ``lᵢ`` (bidirectional: every cell);
  the MAE decoder is one more such layer; LM head ``2·n_mlm·H·V`` (masked tokens only); MAE head
  ``2·n_win·H·(m²·C·T·p²)``;
* vision, ``P`` patches: patch embedding ``2·P·(C·T·p²)·D``; per block ``2·P·(4·D² + 3·D·I_v)``
  plus attention ``4·D·Σ s²`` over its attention segments (whole images in the full-attention
  blocks; 8×8-patch windows, cut at image edges, in the others); merger
  ``2·(P/m²)·((m²·D)² + m²·D·H)``.

Its vision-attention variant is ``vision_per_segment``: transformers' own attention of the tower,
which runs one SDPA call per window / image segment (``bench_comp_gpu.py``'s equal-size images make
its counterpart one batched call). The model is built on the GPU, saved in bf16 and loaded once
(the GPU's cache emptied after); compilation dominates a full run.

Usage: python benchmarks/bench_moca_gpu.py [--steps 8] [--batches 4] [--text-budget 4096]
       [--vision-budget 2048] [--variants a,b] [--smoke] [--shapes full|tiny] [--budget-s S]
       [--timeout-s T]
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_harness import Setup, clock_of, device_or_exit, run_bench
from gpu_options import Variant, base_args, select_variants, variant_list

#: MoCa's: transformers' own vision attention, one SDPA call per window / image segment.
VARIANTS = variant_list(Variant("vision_per_segment", change="vision attn: HF per-segment SDPA"))
VIDEO_PAD = "<|video_pad|>"
PATCH, TEMPORAL, MERGE = 14, 2, 2
TEXT = {  # Qwen2.5-VL-3B-Instruct's language model and a tiny stand-in
    "full": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    ),
    "tiny": dict(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    ),
}
VISION = {  # its vision tower and a tiny stand-in (window attention in both)
    "full": dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=2048,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
    "tiny": dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        out_hidden_size=64,
        window_size=112,
        fullatt_block_indexes=[1],
    ),
}


def qwen_config(shapes: str, tok) -> tf.Qwen2_5_VLConfig:
    """The Qwen2.5-VL configuration of ``shapes`` around the token ids of ``tok``."""
    from cmpt.vlm.chat import IMAGE_PAD, VISION_END, VISION_START

    tid = tok.convert_tokens_to_ids
    text = dict(
        **TEXT[shapes],
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(**VISION[shapes], patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    return tf.Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tid(IMAGE_PAD),
        video_token_id=tid(VIDEO_PAD),
        vision_start_token_id=tid(VISION_START),
        vision_end_token_id=tid(VISION_END),
        tie_word_embeddings=True,
    )


def build_checkpoint(out: Path, shapes: str, device: torch.device) -> Path:
    """A random-weight Qwen2.5-VL directory (model, tokenizer, preprocessor config) of ``shapes``."""
    from cmpt.demo.tiny_lm import default_corpus, train_tokenizer
    from cmpt.vlm.chat import IMAGE_PAD, VISION_END, VISION_START

    tok = train_tokenizer(default_corpus(300), vocab_size=1024)
    tok.add_tokens([VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD], special_tokens=True)
    cfg = qwen_config(shapes, tok)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU when there is one (seconds, not minutes)
        model = tf.Qwen2_5_VLForConditionalGeneration(cfg)
    model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).save_pretrained(str(out))
    del model
    gc.collect()
    if device.type == "cuda":  # the copy the task loads is a new one
        torch.cuda.empty_cache()
    tok.save_pretrained(str(out))
    pre = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "min_pixels": 256 * 28 * 28,
        "max_pixels": 1024 * 28 * 28,
        "patch_size": PATCH,
        "temporal_patch_size": TEMPORAL,
        "merge_size": MERGE,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    return out


def _segments(n: int, size: int) -> list[int]:
    return [min(size, n - s) for s in range(0, n, size)]


def analytic_flops(batch: dict, config) -> dict[str, float]:
    """Forward + backward FLOPs of one micro-batch by the closed form of the module docstring:
    ``{"total", "attention"}`` (the attention part: score and value products only)."""
    t, v = config.text_config, config.vision_config
    h, i_, layers, kv = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_key_value_heads
    d_head = h // t.num_attention_heads
    cu = batch["cu_seqlens"].tolist()
    n, sq = cu[-1], sum((b - a) ** 2 for a, b in itertools.pairwise(cu))
    attn = (layers + 1) * 4 * h * sq
    patch_dim = 3 * TEMPORAL * PATCH**2
    m2 = MERGE**2
    fwd = (layers + 1) * 2 * n * (2 * h * h + 2 * h * kv * d_head + 3 * h * i_)
    fwd += 2 * int(batch["num_mlm_tokens"]) * h * t.vocab_size
    fwd += 2 * int(batch["num_mae_windows"]) * h * m2 * patch_dim
    grids = batch["grid_hw"].tolist() if batch.get("grid_hw") is not None else []
    if grids:
        d, iv = v.hidden_size, v.intermediate_size
        p = sum(gh * gw for gh, gw in grids)
        full_sq = sum((gh * gw) ** 2 for gh, gw in grids)
        w = v.window_size // PATCH  # window side in patches
        win_sq = sum(
            sum(s * s for s in _segments(gh, w)) * sum(s * s for s in _segments(gw, w)) for gh, gw in grids
        )
        n_full = len(v.fullatt_block_indexes)
        fwd += 2 * p * patch_dim * d + v.depth * 2 * p * (4 * d * d + 3 * d * iv)
        attn += 4 * d * (n_full * full_sq + (v.depth - n_full) * win_sq)
        fwd += 2 * (p // m2) * ((m2 * d) ** 2 + m2 * d * v.out_hidden_size)
    return {"total": 3.0 * (fwd + attn), "attention": 3.0 * attn}


def moca_setup(args, device: torch.device) -> Setup:
    from cmpt.demo.moca_data import write_moca_corpus
    from cmpt.recipes import load_recipe

    root = Path(tempfile.mkdtemp(prefix="cmpt-bench-moca-gpu-"))
    init = build_checkpoint(root / "model", args.shapes, device)
    n_docs = 12 * args.batches
    write_moca_corpus(root / "data", {"documents": (n_docs, 1), "passages": (n_docs // 2, 1)}, seed=0)
    sets = [
        f"model.init={init}",
        f"data.path={root / 'data' / 'train.yaml'}",
        f"data.text_budget={args.text_budget}",
        f"data.vision_budget={args.vision_budget}",
        "data.num_workers=0",
        "data.length_cache=off",
        f"run.dir={root / 'run'}",
    ]
    if args.shapes == "tiny":  # small images for the tiny tower
        sets += ["stage.resolution.min_pixels=3136", "stage.resolution.max_pixels=18816"]
    cfg, task_cls = load_recipe("moca/qwen2.5-vl-3b/cpt", sets)
    torch.manual_seed(0)
    task = task_cls(cfg)
    loader = iter(task.build_loader(0, 1))
    batches = [next(loader) for _ in range(args.batches)]
    title = (
        f"MoCa CPT step, {args.shapes} shapes (Qwen2.5-VL-3B: HF model, random weights), budgets "
        f"{args.text_budget} text rows / {args.vision_budget} merged vision tokens per micro-batch"
    )

    def vision_attention(model, packed: bool) -> None:
        model.backbone.set_vision_attention(cfg.model.vit_attn if packed else None)

    @contextlib.contextmanager
    def counting(model):  # the vision attention on SDPA (the counter does not see varlen kernels)
        model.backbone.set_vision_attention("sdpa")
        try:
            yield
        finally:
            vision_attention(model, True)

    return Setup(task, batches, lambda m: m.backbone, counting, title, vision_attention)


def main(argv: list[str] | None = None) -> dict:
    ap = base_args(__doc__.splitlines()[0])
    ap.add_argument("--text-budget", type=int, default=4096, help="text rows per micro-batch")
    ap.add_argument("--vision-budget", type=int, default=2048, help="merged vision tokens per micro-batch")
    args = ap.parse_args(argv)
    clock = clock_of(args)
    if args.smoke:
        args.shapes, args.steps, args.batches, args.text_budget, args.vision_budget = "tiny", 1, 1, 1024, 96
    device = device_or_exit(args.smoke or args.shapes == "tiny", "bench_moca_gpu.py")
    variants = select_variants(args.variants, args.act_ckpt, VARIANTS)
    setup = moca_setup(args, device)
    hf_config = setup.task.backbone.hf.config
    closed = [analytic_flops(b, hf_config) for b in setup.batches]
    total, attention = (sum(c[k] for c in closed) / len(closed) for k in ("total", "attention"))
    mlm = sum(int(b["num_mlm_tokens"]) for b in setup.batches) / len(setup.batches)
    extra = {
        "closed-form FLOPs per micro-batch (cross-check)": f"{total / 1e12:.3f} T, attention "
        f"{attention / 1e12:.3f} T",
        "MLM tokens per micro-batch (mean)": f"{mlm:.0f}",
    }
    more = {"closed_form_flop_per_microbatch": total, "closed_form_attention_flop": attention}
    meta = {"bench": "moca_gpu", "shapes": args.shapes}
    return run_bench(setup, variants, device, args, clock, meta, extra, more)


if __name__ == "__main__":
    main()
