"""`cmpt eval`: probe · seg · vqa · resolution · retrieval · embed (docs/method.md §3, §5). Each
command checks its options (device, counts, ``--out``) before it loads anything, then calls one
library function of :mod:`cmpt.eval` and prints its result."""

from __future__ import annotations

import argparse
import json
import sys

from .cli_tools import DEVICE_HELP, positive_int

__all__ = ["add_eval_commands"]


def _eval(a: argparse.Namespace) -> int:
    from . import eval as ev
    from .eval.runtime import pick_device

    pick_device(a.device)  # a device this torch cannot use is refused before anything loads
    if a.eval_command != "embed":
        a.max_pixels = max_pixels_arg(a.max_pixels, a.model, many=a.eval_command == "resolution")
    common = {"device": a.device}
    if a.eval_command != "embed":
        common["image_root"] = a.image_root
    if a.eval_command == "embed":
        from .eval.embed import embed_main

        opts = {"batch_tokens": a.batch_tokens, "limit": a.limit, "skip_bad": a.skip_bad}
        res = embed_main(a.model, a.data, out=a.out, **opts, **common)
        print(res["table"], end="")
        if res["skipped"]:
            print(f"skipped {res['skipped']} bad records (listed in the log above)", file=sys.stderr)
        return 0
    if a.eval_command == "probe":
        res = ev.probe_main(a.model, a.data, a.val, max_pixels=a.max_pixels, out=a.out, **common)
    elif a.eval_command == "seg":
        res = ev.seg_main(a.model, a.data, a.val, max_pixels=a.max_pixels, out=a.out, **common)
    elif a.eval_command == "vqa":
        res = ev.vqa_main(
            a.model,
            a.data,
            max_pixels=a.max_pixels,
            limit=a.limit,
            batch_size=a.batch_size,
            metric=a.metric,
            with_caption_loss=a.caption_loss,
            out_dir=a.out,
            **common,
        )
    elif a.eval_command == "resolution":
        res = ev.resolution_main(a.model, a.data, a.max_pixels, out_dir=a.out, limit=a.limit, **common)
    else:
        res = ev.retrieval_main(a.model, a.data, limit=a.limit, max_pixels=a.max_pixels, out=a.out, **common)
    print(json.dumps(res, indent=2, default=str))
    return 0


def max_pixels_arg(text: str | None, model: str, *, many: bool) -> int | list[int] | None:
    """``--max-pixels`` checked before anything loads: a count or a product (``224*224``), a comma
    list where ``many``; each at least one merge window of ``model``'s image processor, read from
    its config files (a local directory; otherwise the check happens when the model loads)."""
    from .eval.resolution import parse_pixels

    if text is None:
        return None
    window = _merge_window(model)
    least = f"; the smallest {model} accepts is {window**2} ({window}*{window})" if window else ""
    try:
        values = parse_pixels(text)
    except ValueError as e:
        raise ValueError(f"{e}{least}") from None
    if not many and "," in text:
        raise ValueError(
            f"--max-pixels {text!r}: one pixel count or product, e.g. 50176 or 224*224 (a comma list is "
            "for `cmpt eval resolution`)"
        )
    if window and values[0] < window**2:
        raise ValueError(
            f"--max-pixels {text!r}: {values[0]} pixels is less than one {window}×{window} merge window "
            f"(patch side × merge size) of {model}; pass at least {window**2} ({window}*{window})"
        )
    return values if many else values[0]


def _merge_window(model: str) -> int | None:
    """Pixels a side of one merge window of ``model``'s image processor, from a local directory's
    config files only (no weights); None when it is not one (a hub id, a missing path, a directory
    that does not load: the load reports that)."""
    from pathlib import Path

    if not Path(model).is_dir():
        return None
    from .encode import load_vision_model

    try:
        return load_vision_model(model, weights=False)[1].factor
    except (ValueError, OSError):
        return None


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``eval {probe, seg, vqa, resolution, retrieval, embed}`` to the ``cmpt`` parser."""
    ev = sub.add_parser("eval", help="evaluate a ViT or VLM").add_subparsers(
        dest="eval_command", required=True
    )
    helps = {
        "probe": "frozen linear classification probe (best val top-1 over an LR grid)",
        "seg": "frozen segmentation probe (BatchNorm + 1×1 linear head, mIoU)",
        "vqa": "VQA with the benchmark's scorer (relaxed accuracy, ANLS, VQA accuracy)",
        "resolution": "the same VQA eval at several max_pixels (CoMP Fig. 3): table + PNG",
        "retrieval": "image↔text Recall@1/5/10 in the alignment-loss feature spaces",
    }
    for name, text in helps.items():
        p = ev.add_parser(name, help=text)
        p.add_argument("--model", required=True, help="NativeViT dir, HF vision checkpoint, or VLM dir")
        p.add_argument("--data", required=True, help="LLaVA JSON file or a directory of splits")
        p.add_argument("--device", default=None, help=DEVICE_HELP)
        p.add_argument(
            "--image-root",
            default=None,
            help="folder the image paths are relative to (default: the JSON file's folder); image paths "
            "must stay inside it: --image-root / reads absolute paths",
        )
        if name in ("probe", "seg"):
            p.add_argument("--val", default=None, help="validation JSON (default: DATA/val.json)")
        if name == "resolution":
            p.add_argument("--max-pixels", required=True, help='comma list, e.g. "224*224,448*448,3136*256"')
            p.add_argument("--out", required=True, help="output DIRECTORY (table, JSON, PNG); not a file")
        else:
            p.add_argument(
                "--max-pixels",
                default=None,
                help="resolution cap in pixels, a count or a product (e.g. 50176 or 224*224); at least one "
                "merge window, (patch size × merge size)² (784 for patch 14, merge 2)",
            )
        if name == "vqa":
            p.add_argument(
                "--out",
                default=None,
                help="output DIRECTORY (predictions.jsonl, vqa_results.json); not a file",
            )
        elif name != "resolution":
            p.add_argument(
                "--out",
                default=None,
                help=f"output JSON FILE; a directory or a path ending in / gets {name}_results.json in it",
            )
        if name not in ("probe", "seg"):
            p.add_argument(
                "--limit", type=positive_int, default=None, help="evaluate at most this many records"
            )
        if name == "vqa":
            p.add_argument("--batch-size", type=positive_int, default=8, help="questions per generate call")
            p.add_argument("--metric", default="auto", help="auto | relaxed_accuracy | anls | vqa_accuracy")
            p.add_argument("--caption-loss", action="store_true", help="also report the caption loss")
        p.set_defaults(fn=_eval)
    p = ev.add_parser("embed", help="embedding model (MoCa): MMEB Precision@1 and ViDoRe-style nDCG@5")
    p.add_argument(
        "--model", required=True, help="Embedder dir, cmpt VLM dir or Hugging Face Qwen2-VL / Qwen2.5-VL dir"
    )
    p.add_argument(
        "--data",
        required=True,
        help="folder of *.jsonl MMEB tasks and/or page-retrieval folders, or one such task",
    )
    p.add_argument(
        "--out", default=None, help="output DIRECTORY (embed_results.json / .md / .png); not a file"
    )
    p.add_argument(
        "--batch-tokens", type=positive_int, default=None, help="tokens per forward (default: the model's)"
    )
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many queries per task")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (counted, logged), not fail")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.set_defaults(fn=_eval)
