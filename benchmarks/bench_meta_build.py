"""Start-up of an FSDP2 rank > 0: the full model read from disk vs the meta-device skeleton
(docs/method.md §6 "Distributed training").

Writes one VLM directory once — a NativeViT of ViT-B shape (768 × 12) and a Qwen2 LLM of
Qwen2.5-0.5B shape (896 × 24, vocabulary 151,936; random weights, float32, ~2.4 GB on disk) — then
times, each in a fresh process, interleaved, best of ``--repeats``:

  eager      ``VisionLanguageModel.from_pretrained(DIR)``: what every rank did before (weights read,
             a full CPU copy, then moved to meta by ``shard_fsdp``)
  skeleton   ``VisionLanguageModel.from_pretrained(DIR, weights=False)``: what ranks > 0 do now
             (configs, tokenizer and processor only; modules on the meta device)

Reported per variant: wall seconds of the load and the process's peak resident memory
(``VmHWM``, imports included: about 0.35 GB of it is torch and transformers). Weights are
memory-mapped by safetensors, so the eager peak is below the model's size in float32. The machine is
shared: wall times vary with its load. Prints a table; the last line is one JSON object of
figures and ratios. ``--smoke``: a tiny model, one repeat (what the tests run).
Run: ``python benchmarks/bench_meta_build.py [--repeats 3] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from cmpt.vlm.model import VisionLanguageModel
t1 = time.perf_counter()
vlm = VisionLanguageModel.from_pretrained(sys.argv[1], weights=sys.argv[2] == "eager")
t2 = time.perf_counter()
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
params = sum(p.numel() for p in vlm.parameters())
meta = all(p.is_meta for p in vlm.parameters())
print(json.dumps({"load_s": t2 - t1, "import_s": t1 - t0, "params": params, "meta": meta,
                  "rss_gb": int(status["VmHWM"].split()[0]) / 2**20}))
"""


def write_model(out: Path, smoke: bool) -> Path:
    """The VLM directory (ViT-B + Qwen2.5-0.5B shapes, or tiny ones with ``smoke``)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cmpt.demo.tiny_lm import default_corpus, save_tiny_lm, train_tokenizer
    from cmpt.vision.vit import NativeViT, NativeViTConfig
    from cmpt.vlm.model import VisionLanguageModel

    if (out / "vlm" / "vlm_config.json").is_file():
        return out / "vlm"
    torch.manual_seed(0)
    tok = train_tokenizer(default_corpus(300), vocab_size=400)
    if smoke:
        llm_cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=1024)
        vit_cfg = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    else:
        llm_cfg = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, vocab_size=151936)
        vit_cfg = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
    heads = dict(num_attention_heads=4 if smoke else 14, num_key_value_heads=2)
    llm = Qwen2ForCausalLM(Qwen2Config(**llm_cfg, **heads, tie_word_embeddings=True))
    save_tiny_lm(llm, tok, out / "llm")
    NativeViT(NativeViTConfig(**vit_cfg, patch_size=14, pos_grid=16)).save_pretrained(out / "vit")
    VisionLanguageModel.build(out / "vit", out / "llm").save_pretrained(out / "vlm")
    return out / "vlm"


def measure(directory: Path, variant: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory), variant], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the model is written (default: a temporary directory)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, one repeat")
    args = ap.parse_args(argv)
    repeats = 1 if args.smoke else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_model(Path(args.dir or tmp), args.smoke)
        best: dict[str, dict] = {}
        for _ in range(repeats):
            for variant in ("eager", "skeleton"):
                r = measure(directory, variant)
                if variant not in best or r["load_s"] < best[variant]["load_s"]:
                    best[variant] = r
    print(f"model: {best['eager']['params'] / 1e6:.1f}M parameters, best of {repeats}")
    print(f"{'variant':<10} {'load s':>8} {'peak RSS GB':>12}")
    for name, r in best.items():
        print(f"{name:<10} {r['load_s']:>8.2f} {r['rss_gb']:>12.2f}")
    e, s = best["eager"], best["skeleton"]
    ratios = {
        "params": e["params"],
        "eager_load_s": round(e["load_s"], 3),
        "skeleton_load_s": round(s["load_s"], 3),
        "load_speedup": round(e["load_s"] / max(s["load_s"], 1e-9), 2),
        "rss_ratio": round(s["rss_gb"] / max(e["rss_gb"], 1e-9), 3),
        "skeleton_on_meta": s["meta"] and not e["meta"],
        "eager_rss_gb": round(e["rss_gb"], 2),
        "skeleton_rss_gb": round(s["rss_gb"], 2),
    }
    print(json.dumps(ratios))
    return ratios


if __name__ == "__main__":
    main()
