"""The `cmpt data ...` and `cmpt ckpt ...` tools of the command line (:mod:`cmpt.cli`): generate the
offline data, check a data source in any accepted form (docs/data.md), count a caption vocabulary
prior, verify a run's checkpoints. Thin adapters over library functions; heavy imports inside."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_tool_commands"]


def _synth(a: argparse.Namespace) -> int:
    from .demo.synthetic import synth_main

    print(json.dumps(synth_main(a.kind, a.n, a.out, seed=a.seed, splits=a.splits), indent=2))
    return 0


def _check(a: argparse.Namespace) -> int:
    from .data.check import data_check_main

    return data_check_main(
        a.spec, a.out, image_root=a.image_root, tokenizer=a.tokenizer, max_text_tokens=a.max_text_tokens
    )


def _vocab(a: argparse.Namespace) -> int:
    from .data.vocab_prior import vocab_prior_main

    print(json.dumps(vocab_prior_main(a.data, a.tokenizer, a.out), indent=2))
    return 0


def _ckpt_verify(a: argparse.Namespace) -> int:
    """One line per checkpoint of a run (and ``final/`` if marked); exit 0 when the newest
    checkpoint (and a marked ``final/``) verifies, 1 otherwise (docs/method.md §4)."""
    from pathlib import Path

    from .train.verify import verify_run

    if not (Path(a.run_dir) / "checkpoints").is_dir():
        print(f"{a.run_dir}: no checkpoints/ directory (not a run directory?)")
        return 1
    verdicts, good = verify_run(a.run_dir)
    for v in verdicts:
        print(v.line())
    if not verdicts:
        print(f"{a.run_dir}: no checkpoint")
    print(f"{a.run_dir}: {'usable' if good else 'NOT usable: the newest checkpoint (or final/) is damaged'}")
    return 0 if good else 1


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (anything else is a usage error naming the value)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (anything else is a usage error naming the value)."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


DEVICE_HELP = "auto (default: CUDA if available, else CPU), cpu, cuda, cuda:N or mps"


def add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``data {synth, check, vocab-prior}`` and ``ckpt {verify}`` to the ``cmpt`` parser."""
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="generate built-in offline data (LLaVA JSON / documents JSONL + PNG)")
    p.add_argument(
        "--kind",
        required=True,
        choices=["charts", "docs", "scenes", "documents", "passages", "moca", "retrieval"],
        help="moca: documents + passages (train n, val n//5 each) and train.yaml / val.yaml mixtures; "
        "retrieval: n contrastive pairs with hard negatives (train.jsonl) + held-out eval/",
    )
    p.add_argument(
        "--n",
        type=int,
        required=True,
        help="size: charts/docs/scenes/documents/passages: train (or a lone split) gets n, the other splits "
        "of --splits max(1, n//4) each; moca: n train and max(1, n//5) val documents, and as many passages; "
        "retrieval: n training pairs and max(8, n//25) held-out queries per task",
    )
    p.add_argument("--out", required=True, help="output directory (new, or one synth wrote before)")
    p.add_argument("--seed", type=int, default=0, help="random seed; each split has its own stream")
    p.add_argument(
        "--splits",
        default="train,val,test",
        help="charts/docs/scenes/documents/passages: the splits to write, comma-separated, each NAME or "
        "NAME:COUNT (default train,val,test; see --n for the sizes); moca and retrieval write their own "
        "splits and ignore it",
    )
    p.set_defaults(fn=_synth)
    p = data.add_parser(
        "check",
        help="report bad samples of a dataset in any accepted form (docs/data.md)",
        description="Check every record of a data source for the bad-sample reasons training would "
        "skip it for; exit 0 when nothing is bad, 1 otherwise.",
        epilog="""accepted sources (PATH):
  train.json | train.jsonl        JSON records; image paths relative to the file (or --image-root)
  shards/ | 'shards-{000000..000099}.tar' | 'shards/*.tar'   tar shards
  ds/ (save_to_disk) | x.parquet | dir of parquet | a hub snapshot (data/<split>-*.parquet,
      <config>/<split>-*.parquet)     Hugging Face datasets; PATH#SPLIT picks a split (ds#test)
  mix.yaml                        a mixture (tar shards, JSON and HF members together; split: per member)

record layouts:
  LLaVA      {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nQ?"},
              {"from": "gpt", "value": "A."}]}
  HF / TRL   {"images": ["a.jpg"], "messages": [{"role": "user", "content": [{"type": "image"},
              {"type": "text", "text": "Q?"}]}, {"role": "assistant", "content": "A."}]}
  captions   tar samples 000123.jpg + 000123.txt [+ metadata .json] (img2dataset; or "caption" in
              the .json), {"image": "a.jpg", "caption": "..."} in JSON/HF: CoMP reads
              user "<image>\\n" + data.caption_prompt, assistant = the caption; MoCa a document
  in tar     the .json member holds any layout; "image": "coco/x.jpg" (LLaVA verbatim) resolves to
              the sample's image member(s), in order
  documents  {"text": "Intro <image> more", "images": ["a.png"]}   (MoCa)
  pairs      {"qry": ..., "pos_text": ..., "neg_text": [...], "*_image_path": ...}   (MoCa CL)

every form, with the rules and examples: docs/data.md""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", help="data source: JSON/JSONL, tar shards, HF dataset (PATH#SPLIT) or mixture")
    p.add_argument(
        "--image-root",
        default=None,
        help="folder the image paths are relative to (default: the data file's folder); image paths must "
        "stay inside it: --image-root / reads absolute paths",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer dir/name to check conversation lengths")
    p.add_argument(
        "--max-text-tokens", type=int, default=None, help="with --tokenizer: longer ones are too_long"
    )
    p.add_argument("--out", default=None, help="write bad samples as JSONL here")
    p.set_defaults(fn=_check)
    p = data.add_parser(
        "vocab-prior", help="token frequencies of a dataset's captions (alignment-loss prior)"
    )
    p.add_argument(
        "data",
        help="data source in any form data.path takes: JSON/JSONL, tar shards, HF dataset (PATH#SPLIT) "
        "or mixture YAML; the assistant turns (captions) are counted",
    )
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True, help="output .safetensors (an existing file: only a counts file)")
    p.set_defaults(fn=_vocab)

    ck = sub.add_parser("ckpt", help="checkpoint tools").add_subparsers(dest="ckpt_command", required=True)
    p = ck.add_parser("verify", help="check a run's checkpoints offline (sizes, checksums, structure)")
    p.add_argument("run_dir", help="a run directory (holding checkpoints/)")
    p.set_defaults(fn=_ckpt_verify)
