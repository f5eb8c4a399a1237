"""The `cmpt` command line (also `python -m cmpt`, so `torchrun -m cmpt train ...` works).

Subcommands: demo · encode · train · export · convert {official} · eval (:mod:`cmpt.cli_eval`); the
tools data {synth, check, vocab-prior} and ckpt {verify} are in :mod:`cmpt.cli_tools`.
Each subcommand is a thin adapter over a library function; heavy imports happen inside handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .cli_eval import add_eval_commands, max_pixels_arg
from .cli_tools import DEVICE_HELP, add_tool_commands, non_negative_int, positive_int
from .vision.attention import BACKENDS


def _encode(a: argparse.Namespace) -> int:
    from .encode import check_attention, check_output, encode_images, expand_images, load_vit, processor_for
    from .encode_shards import check_sharded_output, encode_sharded
    from .eval.runtime import pick_device

    device = pick_device(a.device)  # options first: nothing loads for a mistyped one
    check_attention(a.attn, device, a.precision)
    min_pixels = _min_pixels_arg(a.min_pixels)
    max_pixels = max_pixels_arg(a.max_pixels, a.model, many=False)
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(
            f"--min-pixels {min_pixels} exceeds --max-pixels {max_pixels}: lower --min-pixels or raise "
            "--max-pixels"
        )
    images = expand_images(a.images)
    if a.shard_size is None:  # before the model is loaded
        check_output(a.out, images, model=a.model)
    else:
        check_sharded_output(a.out, images, a.shard_size, model=a.model)
    vit = load_vit(a.model, rope=a.rope, attn=a.attn)
    proc = processor_for(vit, a.model, min_pixels=min_pixels, max_pixels=max_pixels)
    options = dict(
        token_budget=a.token_budget,
        pooled=a.features in ("pooled", "both"),
        patches=a.features in ("patch", "both"),
        skip_bad=a.skip_bad,
        device=device,
        precision=a.precision,
        progress=not a.quiet,
        workers=a.workers,
    )
    if a.shard_size is None:
        res = encode_images(vit, proc, images, a.out, **options)
    else:
        res = encode_sharded(vit, proc, images, a.out, shard_size=a.shard_size, **options)
    origin = vit.config.source
    origin = f" (from {origin})" if origin and origin not in (str(a.model), f"hf:{a.model}") else ""
    shards = f" in {len(res.shards)} shards ({res.reused} kept from before)" if res.shards else ""
    print(
        f"encoded {len(res.images)} images ({res.num_patches} patches){shards} with {a.model}{origin} -> "
        f"{res.out}"
    )
    for path, why in res.skipped.items():
        print(f"skipped {path}: {why}", file=sys.stderr)
    return 0


def _min_pixels_arg(text: str | None) -> int | None:
    """``--min-pixels``: one pixel count or product (``56*56``), parsed as ``--max-pixels`` is
    (:func:`cmpt.eval.resolution.parse_pixels`), checked before anything loads."""
    from .eval.resolution import parse_pixels

    if text is None:
        return None
    try:
        values = parse_pixels(text)
    except ValueError:
        values = []
    if len(values) != 1 or "," in text:
        raise ValueError(f"--min-pixels {text!r}: pass one positive pixel count or product, e.g. 56*56")
    return values[0]


def _demo(a: argparse.Namespace) -> int:
    from .demo import run_demo
    from .demo.moca_run import run_moca_demo

    if a.recipe in ("comp", "all"):
        run_demo(out=a.out, quick=a.quick, cache=a.cache)
    if a.recipe in ("moca", "all"):
        run_moca_demo(out=a.out, quick=a.quick, cache=a.cache)
    return 0


def _train_overrides(a: argparse.Namespace) -> list[str]:
    """``--set`` items, then ``--resume`` / ``--allow-change`` as ``train.resume`` /
    ``train.allow_change`` overrides."""
    sets = list(a.set)
    if a.resume is not None:
        sets.append(f"train.resume={a.resume}")
    if a.allow_change:
        keys = [k.strip() for item in a.allow_change for k in item.split(",") if k.strip()]
        sets.append(f"train.allow_change={json.dumps(keys)}")
    return sets


def _train(a: argparse.Namespace) -> int:
    if a.nproc_per_node:  # relaunch under torchrun's launcher, keeping the workers' exit code
        from .launch import main as launch

        argv = ["--standalone", f"--nproc_per_node={a.nproc_per_node}", "-m", "cmpt", "train", a.config]
        return launch(argv + [arg for s in _train_overrides(a) for arg in ("--set", s)])
    from .recipes import run_recipe
    from .train.distributed import is_main

    summary = run_recipe(a.config, _train_overrides(a))
    if is_main():
        print(json.dumps(summary, default=str))
    return int(summary.get("exit_code", 0))


def _check_export_paths(model: str, out: str) -> None:
    """Refuse, before anything is loaded: a source that does not exist, a run directory instead of
    its ``final/`` or a checkpoint, an ``--out`` that is, holds or lies inside the source, and an
    ``--out`` cmpt may not replace (:func:`cmpt.io_atomic.check_replaceable`)."""
    from pathlib import Path

    from .embed.embedder import EMBEDDER_CONFIG
    from .export import is_checkpoint
    from .hub import is_hub_id
    from .io_atomic import check_not_overlapping, check_replaceable
    from .train.verify import set_aside_note, step_dirs
    from .vlm.io import VLM_CONFIG_NAME

    src = Path(model)
    if src.exists():
        is_model = any((src / f).is_file() for f in (VLM_CONFIG_NAME, EMBEDDER_CONFIG))
        if not is_model and not is_checkpoint(src):
            steps = [p for _, p in step_dirs(src / "checkpoints") if is_checkpoint(p)]
            found = [str(p) for p in (src / "final", *steps[-1:]) if p.is_dir()]
            if found:
                raise ValueError(
                    f"{model} is a training run directory, not a model: export {' or '.join(found)} "
                    "(its final model or its newest checkpoint)"
                )
        check_not_overlapping(out, src)
    elif not is_hub_id(model) or (src.parent != Path(".") and src.parent.is_dir()):  # a local path
        raise FileNotFoundError(
            set_aside_note(src)
            or f"{model} does not exist; pass a model directory (a run's final/) or a checkpoint "
            "(RUN/checkpoints/step_N)"
        )
    check_replaceable(out)


def _export(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .embed.embedder import EMBEDDER_CONFIG, Embedder
    from .export import export_checkpoint, is_checkpoint
    from .vlm.model import VisionLanguageModel

    _check_export_paths(a.model, a.out)
    if is_checkpoint(a.model):  # a mid-run checkpoint (DDP or FSDP2): the recipe's final output
        if a.vfm_only:
            raise ValueError("--vfm-only takes a VLM directory: export the checkpoint first, then its ViT")
        out = export_checkpoint(a.model, a.out)
        print(f"exported checkpoint {a.model} -> {out}")
        return 0
    if (Path(a.model) / EMBEDDER_CONFIG).is_file() and not a.vfm_only:  # a MoCa run's output
        out = Embedder.from_pretrained(a.model).save_pretrained(a.out)
        print(f"exported the Embedder of {a.model} -> {out}")
        return 0
    vlm = VisionLanguageModel.from_pretrained(a.model)
    out = vlm.export_vit(a.out) if a.vfm_only else vlm.save_pretrained(a.out)
    print(f"exported {'the vision model (CoMP-VFM)' if a.vfm_only else 'the VLM'} of {a.model} -> {out}")
    return 0


def _convert(a: argparse.Namespace) -> int:
    import torch

    from .io_atomic import check_not_overlapping, check_replaceable
    from .vlm.official_release import convert_official

    if os.path.exists(a.src):  # refused before the release is read (a hub id is checked by the loader)
        check_not_overlapping(a.out, a.src)
    check_replaceable(a.out)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    kind, out = convert_official(a.src, a.out, vision_config=a.vision_config, dtype=dtype)
    what = "CoMP-MM VLM -> cmpt VLM directory" if kind == "vlm" else "CoMP-VFM tower -> NativeViT directory"
    print(f"converted {a.src} ({what}, pos_embed_order: official) -> {out}")
    return 0


def _bool(p: argparse.ArgumentParser, name: str, help_: str) -> None:
    p.add_argument(
        f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, help=help_
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cmpt", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--debug", action="store_true", help="show the full traceback of user errors (or CMPT_TRACEBACK=1)"
    )
    ap.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="level of cmpt's log lines on rank 0 (other ranks: warnings); default info",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="offline end-to-end demo on built-in synthetic data")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="one-minute smoke run")
    p.add_argument(
        "--recipe",
        choices=["comp", "moca", "all"],
        default="comp",
        help="comp: CoMP stages + evaluation; moca: CoMP → MoCa (CPT, CL, embedding evaluation; reuses "
        "the CoMP demo's VLM when present); all: both",
    )
    p.add_argument(
        "--cache", default=None, help="cache for generated data/models (default $CMPT_CACHE or ~/.cache/cmpt)"
    )
    p.set_defaults(fn=_demo)

    p = sub.add_parser("encode", help="native-resolution features of images → safetensors")
    p.add_argument(
        "--model",
        required=True,
        help="NativeViT directory, Hugging Face vision checkpoint, CoMP-VFM tower, or a cmpt / CoMP-MM VLM "
        "directory (encodes with its vision tower and its image processor)",
    )
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--features", choices=["pooled", "patch", "both"], default="both")
    p.add_argument(
        "--token-budget", type=positive_int, default=16384, help="patches per forward pass (default 16384)"
    )
    p.add_argument(
        "--min-pixels",
        default=None,
        help="pixel floor, a count or a product (e.g. 56*56); smaller images are upscaled (default: the "
        "model's processor)",
    )
    p.add_argument(
        "--max-pixels",
        default=None,
        help="pixel cap, a count or a product (e.g. 448*448); larger images are downscaled (default: the "
        "model's processor)",
    )
    _bool(p, "rope", "2D RoPE on/off (default: the checkpoint's setting; off for HF checkpoints)")
    p.add_argument(
        "--attn",
        default="auto",
        choices=BACKENDS,
        help="attention backend (default auto: flash-attn or torch's varlen kernel on CUDA in bf16, else "
        "sdpa); flash and varlen need CUDA",
    )
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 autocast on CUDA"
    )
    p.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images (listed on stderr) instead of failing"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        help="threads that load and patchify images ahead of the model (default: the CPUs, at most 8; "
        "0: none)",
    )
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=None,
        help="write shards of N images (OUT stem-00001-of-0000n.safetensors and OUT.index.json) instead "
        "of one file; running the same command again resumes: finished shards are kept",
    )
    p.set_defaults(fn=_encode)

    p = sub.add_parser(
        "train",
        help="run a recipe stage (single process, or under torchrun)",
        description="Exit status: 0 finished; 75 stopped by SIGTERM/SIGINT with a checkpoint saved "
        "(rerun to resume); 2 config, resume-rule or data error; 1 anything else.",
    )
    p.add_argument("config", help="recipe YAML path or packaged name, e.g. tiny/comp_stage1")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=1e-4"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="auto|never|PATH",
        help="auto (default): continue from run.dir's newest checkpoint, if any; never: refuse when "
        "run.dir has checkpoints; PATH: a checkpoint (or run) directory to continue from (train.resume)",
    )
    p.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEYS",
        help="comma-separated config keys (or prefixes) that may differ from the checkpoint's on "
        "resume, e.g. optim.lr,train.steps (train.allow_change)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=positive_int,
        default=0,
        metavar="N",
        help="start N processes on this machine (torchrun's launcher via python -m cmpt.launch; "
        "the exit status is the workers')",
    )
    p.set_defaults(fn=_train)

    p = sub.add_parser("export", help="export a trained VLM or Embedder directory (or only its vision model)")
    p.add_argument(
        "model",
        help="a VLM or Embedder (MoCa) directory (runs/x/final), or a checkpoint (runs/x/checkpoints/step_N)",
    )
    p.add_argument("--vfm-only", action="store_true", help="write only the NativeViT (CoMP-VFM)")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_export)

    cv = sub.add_parser(
        "convert", help="convert other checkpoint layouts to cmpt directories"
    ).add_subparsers(dest="convert_command", required=True)
    p = cv.add_parser(
        "official",
        help="a checkpoint of the CoMP release (CoMP-MM VLM or CoMP-VFM SigLIP/DINOv2 tower, "
        "SliMM-X/CoMP-MM layout) -> a cmpt VLM / NativeViT directory with pos_embed_order: official",
    )
    p.add_argument("src", help="the release's checkpoint directory (e.g. a download of SliMM-X/CoMP-MM-1B)")
    p.add_argument(
        "out", help="output directory (loads with VisionLanguageModel / NativeViT.from_pretrained)"
    )
    p.add_argument(
        "--vision-config",
        default=None,
        help="CoMP-MM only: the vision tower's directory or config.json, when the one named by the VLM's "
        "custom_visual_model is not available offline",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the LLM")
    p.set_defaults(fn=_convert)

    add_eval_commands(sub)
    add_tool_commands(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand. Errors about the user's input, data, files or run (not bugs in cmpt) are
    printed as one line without a traceback (``cmpt --debug ...`` or ``CMPT_TRACEBACK=1`` shows it);
    exit status 2. Exit
    statuses: :mod:`cmpt.launch` (0 finished, 75 stopped with a checkpoint, 2 user error, 1 other)."""
    from .launch import EXIT_FAILED, EXIT_USAGE, exit_code_for, report_exit
    from .log_setup import configure_logging, quiet_progress_bars_off_tty

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    quiet_progress_bars_off_tty()
    code = EXIT_FAILED
    try:
        code = int(args.fn(args) or 0)
        return code
    except (ValueError, OSError, RuntimeError) as e:
        if exit_code_for(e) != EXIT_USAGE or args.debug or os.environ.get("CMPT_TRACEBACK"):
            raise
        print(f"cmpt {args.command}: error: {e}", file=sys.stderr)
        print("(cmpt --debug ... shows where it happened)", file=sys.stderr)
        code = EXIT_USAGE
        return code
    finally:
        report_exit(code)  # for python -m cmpt.launch (no-op otherwise)


if __name__ == "__main__":
    sys.exit(main())
