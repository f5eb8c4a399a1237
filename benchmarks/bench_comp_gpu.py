"""A CoMP training step at CoMP-MM-1B shapes: throughput, TFLOP/s and MFU (run it on a GPU).

SigLIP-so400m/14 vision tower + Qwen2.5-0.5B-shaped language model (vocabulary 151,936), random
weights built locally (no hub access), synthetic chart images. The recipe is
``comp/siglip-so400m_qwen2.5-0.5b/stage2_pass1.yaml``, the heaviest CoMP stage: every part trains,
RoPE and the alignment loss on, images forced to 1024² (→ 1036², 5,476 patches, 1,369 merged
tokens each). bf16 autocast, AdamW (fused on CUDA).

FLOPs of one step are counted with ``torch.utils.flop_counter``'s formulas (matmuls and attention,
forward and backward, the alignment loss's caption forward included; the ViT's attention is
counted on per-image SDPA, whose kernels the formulas know; the LLM's text runs in the model's
default layout, packed on SDPA, whose dense block-diagonal mask makes the counted attention the
whole N × N packed row, masked cells included: see ``bench_packing.py``); MFU is against a large
bf16 matmul measured in the same run (not the datasheet). With ``--act-ckpt`` the recomputed forward is
counted too, so the figure is then hardware FLOP utilisation.
``--shapes tiny`` runs the same code on tiny shapes (a CPU smoke test).
Prints a table, then one JSON line.

Usage: python benchmarks/bench_comp_gpu.py [--images 4] [--steps 10] [--act-ckpt] [--shapes full|tiny]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf
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


def build_inputs(root: Path, shapes: str, n_images: int) -> dict[str, Path]:
    """Random-weight HF checkpoints of the two towers, a tokenizer, and synthetic chart data."""
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
    data = root / "data"
    cmd = [sys.executable, "-m", "cmpt", "data", "synth", "--kind", "charts", "--n", str(8 * n_images)]
    subprocess.run([*cmd, "--out", str(data)], check=True, capture_output=True)
    return {"vision": root / "vision", "llm": root / "llm", "data": data / "train.json"}


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, 10, device) / 1e12


def timed(fn, repeats: int, device: torch.device) -> float:
    """Mean seconds per call after one warm-up, synchronising the device around the loop."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the ops run under it, by ``torch.utils.flop_counter``'s formulas (matmuls,
    convolutions, attention). ``FlopCounterMode`` itself is not used: its module tracker keeps
    checkpointed activations alive (tiny-shape CPU step with checkpointing: 24 MB of transient
    memory plain, 605 MB under the tracker, more than without checkpointing), which made the
    ``--act-ckpt`` count run out of GPU memory."""

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4, help="images per micro-batch (1036² each)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--act-ckpt", action="store_true", help="activation checkpointing (counts recompute)")
    ap.add_argument("--shapes", choices=["full", "tiny"], default="full")
    ap.add_argument("--fixed-size", type=int, default=1024, help="stage II pass 1 forces 1024²")
    args = ap.parse_args()

    from cmpt.recipes import load_recipe
    from cmpt.recipes.comp import CompTask
    from cmpt.train.distributed import apply_activation_checkpointing, to_device

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if device.type == "cuda" else None
    root = Path(tempfile.mkdtemp(prefix="cmpt-bench-gpu-"))
    paths = build_inputs(root, args.shapes, args.images)
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
        "data.num_workers=2",
    ]
    cfg, _ = load_recipe("comp/siglip-so400m_qwen2.5-0.5b/stage2_pass1", sets)
    torch.manual_seed(0)
    task = CompTask(cfg)
    model = task.model.to(device)  # the CompObjective (its forward runs the VLM, then the losses)
    vlm = task.vlm
    if args.act_ckpt:
        apply_activation_checkpointing(task.fsdp_units())
    loader = iter(task.build_loader(0, 1))
    batches = [to_device(next(loader), device) for _ in range(4)]
    groups = task.param_groups()
    opt = torch.optim.AdamW(groups, fused=device.type == "cuda")
    state = {"i": 0}

    def step() -> None:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            terms = task.compute_loss(model, batch)
            loss = sum(terms.weights[k] * terms.sums[k] / max(terms.counts[k], 1) for k in terms.sums)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # FLOPs: one step on each batch the timed loop cycles, with per-image SDPA in the ViT (the
    # counter does not see the varlen flash kernel's attention), then back to the configured backend
    attn, vlm.vit.config.attn = vlm.vit.config.attn, "sdpa"
    with FlopCount() as counter:
        for _ in batches:
            step()
    vlm.vit.config.attn = attn
    flops = counter.total / len(batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_step = timed(step, len(batches) * max(1, args.steps // len(batches)), device)
    peak = matmul_tflops(device, amp or torch.float32)
    patches = sum(int(b["patches"].shape[0]) for b in batches) / len(batches)
    text = sum(int(b["num_tokens"]) for b in batches) / len(batches)
    b0 = batches[0]
    tflops = flops / t_step / 1e12
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    # analytic ViT forward of batches[0], a cross-check of the counter
    vit_fwd = sum(n * vlm.vit.num_flops_per_token(n) for n in b0["grid_hw"].prod(-1).tolist())
    print(f"CoMP stage II pass 1 step, {args.shapes} shapes, {where}, bf16={amp is not None}")
    print(f"  micro-batch: {len(b0['grid_hw'])} images, {patches:.0f} patches, {text:.0f} text tokens (mean)")
    print(
        f"  step {t_step * 1e3:.1f} ms; {patches / t_step:,.0f} patches/s; {text / t_step:,.0f} text tokens/s"
    )
    print(f"  FLOPs/step {flops / 1e12:.2f} T (batch 0's ViT fwd+bwd, analytic: {3 * vit_fwd / 1e12:.2f} T)")
    print(
        f"  {tflops:.1f} TFLOP/s = {100 * tflops / peak:.1f}% of the measured matmul peak {peak:.0f} TFLOP/s"
    )
    print(f"  peak GPU memory {mem:.1f} GiB; activation checkpointing {'on' if args.act_ckpt else 'off'}")
    print(f"  text {'packed (one row, block-diagonal mask)' if vlm.packing else 'right-padded rows'}")
    print(
        json.dumps(
            {
                "step_ms": round(t_step * 1e3, 1),
                "patches_per_s": round(patches / t_step),
                "text_tokens_per_s": round(text / t_step),
                "tflops_per_s": round(tflops, 1),
                "matmul_peak_tflops": round(peak, 1),
                "mfu": round(tflops / peak, 3),
                "step_tflop": round(flops / 1e12, 3),
                "vit_fwd_bwd_tflop_analytic": round(3 * vit_fwd / 1e12, 3),
                "peak_mem_gib": round(mem, 1),
                "act_ckpt": args.act_ckpt,
                "text_packed": vlm.packing,
            }
        )
    )


if __name__ == "__main__":
    main()
