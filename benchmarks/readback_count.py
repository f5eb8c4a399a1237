"""Device read-backs per training micro-batch, counted on the CPU (docs/benchmarks.md "Host-device
synchronisations"): the CoMP stage-II and MoCa CPT micro-batches of the GPU benchmarks (tiny
shapes) go through the task's forward, ``Embedder.encode`` embeds inputs and ``cmpt encode``
(:func:`cmpt.encode.encode_images`) encodes images (both counted per forward), with the tensors
that would be on the GPU marked (a ``torch.Tensor`` subclass that marks what is computed from
them), and every call that would copy a marked value to the host is counted by the cmpt line
that made it: ``.tolist()``, ``.item()``, ``int()`` / ``float()`` / ``bool()`` / an index of a tensor,
``.cpu()``, ``nonzero``, a boolean-mask gather or assignment, ``repeat_interleave`` without
``output_size`` (not ``.to(device)``: on the CPU the device is the host). The device's tensors: the
batch's, except the task's ``host_keys`` (what the trainer leaves on the host), and whatever
:mod:`cmpt.host_tensor` copies there. Host-to-device copies from pageable memory also make the host
wait; they are not counted here (``tests/test_sync_free.py`` checks them on the meta device).

Usage: python benchmarks/readback_count.py [--before DIR]
``--before DIR``: also count an older checkout of cmpt (its ``src/`` and ``benchmarks/``, e.g. a
``git worktree``) in a subprocess, same shapes, and print both with their ratio. Forward only (a
backward reads back what its forward saved, or nothing). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils._pytree import tree_map

HERE = Path(__file__).resolve().parent
#: calls that copy a device value to the host (by ``__name__``)
READS = {"tolist", "item", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy", "nonzero"}
READS |= {"masked_select", "unique", "unique_consecutive", "argwhere"}


class _Counter:
    lines: ClassVar[Counter] = Counter()

    @classmethod
    def record(cls, what: str) -> None:
        frames = [f for f in traceback.extract_stack() if f"{os.sep}cmpt{os.sep}" in f.filename]
        where = f"{frames[-1].filename.split('/cmpt/')[-1]}:{frames[-1].lineno}" if frames else "?"
        cls.lines[(where, what)] += 1


def _is_bool(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool


def _reads(func: object, args: tuple, kwargs: dict) -> str | None:
    name = getattr(func, "__name__", "")
    if name in READS:
        return name
    if name in ("__getitem__", "__setitem__") and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(_is_bool(i) for i in index):
            return f"boolean {name.strip('_')}"
    if (
        name == "repeat_interleave"
        and "output_size" not in kwargs
        and isinstance(kwargs.get("repeats", args[1] if len(args) > 1 else None), torch.Tensor)
    ):
        return "repeat_interleave"
    return None


class OnDevice(torch.Tensor):
    """A CPU tensor standing for one on the GPU; what is computed from it is marked too."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _reads(func, args, kwargs)
        if what:
            _Counter.record(what)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if what in READS - {"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere"}:
            return out
        return tree_map(_mark, out)


def _mark(x: object) -> object:
    return x.as_subclass(OnDevice) if type(x) is torch.Tensor else x


def _marking(fn):
    def wrapped(*args, **kwargs):
        return _mark(fn(*args, **kwargs))

    return wrapped


@contextlib.contextmanager
def _device_copies_marked() -> Iterator[None]:
    """Outputs of ``cmpt.host_tensor``'s functions are device tensors, and its ``readback_window``
    is an accelerator's, in every module using them; the modules are restored on exit."""
    import cmpt.host_tensor as ht

    originals = [getattr(ht, n) for n in ("host_tensor", "to_device_async") if hasattr(ht, n)]
    window = getattr(ht, "readback_window", None)
    patched = []
    for module in [m for name, m in sys.modules.items() if name.startswith("cmpt")]:
        for name, value in list(vars(module).items()):
            if any(value is f for f in originals):
                patched.append((module, name, value))
                setattr(module, name, _marking(value))
            elif window is not None and value is window:
                patched.append((module, name, value))
                setattr(module, name, lambda device: ht.READBACK_WINDOW)
    try:
        yield
    finally:
        for module, name, value in patched:
            setattr(module, name, value)


def count(setup: object, micro_batches: int) -> tuple[Counter, int]:
    """Read-backs by (line, call) over ``micro_batches`` micro-batches after one uncounted one."""
    task = setup.task
    keep = set(getattr(task, "host_keys", ()))
    model = task.model.train()
    batches = [
        {k: v if k in keep or not isinstance(v, torch.Tensor) else _mark(v) for k, v in b.items()}
        for b in setup.batches
    ]
    with _device_copies_marked():
        task.compute_loss(model, batches[0])
        _Counter.lines.clear()
        for i in range(micro_batches):
            task.compute_loss(model, batches[i % len(batches)])
    return Counter(_Counter.lines), micro_batches


def count_embed(n_inputs: int) -> tuple[Counter, int]:
    """Read-backs by (line, call) of ``Embedder.encode`` over ``n_inputs`` text + image inputs (the
    tiny Qwen2.5-VL of the MoCa benchmark, a small token budget: several forwards), after one
    uncounted call, and the number of forwards."""
    from PIL import Image

    from bench_moca_gpu import build_checkpoint
    from cmpt.embed.embedder import Embedder

    root = Path(tempfile.mkdtemp(prefix="cmpt-readback-embed-"))
    emb = Embedder.from_pretrained(build_checkpoint(root / "model", "tiny", torch.device("cpu")))
    emb.backbone.processor.min_pixels, emb.backbone.processor.max_pixels = 3136, 18816
    gen = torch.Generator().manual_seed(0)
    sizes = [(56 + 28 * (i % 3), 56 + 28 * (i % 2)) for i in range(n_inputs)]
    images = [Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).byte().numpy()) for w, h in sizes]
    texts = [f"a picture, number {i}, " + "word " * (i % 7) for i in range(n_inputs)]
    forwards, real = [0], emb._forward

    def forward(items: list) -> torch.Tensor:
        forwards[0] += 1
        return real(items)

    emb._forward = forward
    with _device_copies_marked():
        emb.encode(texts[:2], images[:2], batch_tokens=128)
        _Counter.lines.clear()
        forwards[0] = 0
        emb.encode(texts, images, batch_tokens=128)
    shutil.rmtree(root, ignore_errors=True)
    return Counter(_Counter.lines), forwards[0]


def count_encode(n_images: int) -> tuple[Counter, int]:
    """Read-backs by (line, call) of :func:`cmpt.encode.encode_images` over ``n_images`` small
    images (a tiny random NativeViT, a token budget of about two images: many forwards), after one
    uncounted call, and the number of forwards."""
    from PIL import Image

    from bench_prefetch import tiny_vit
    from cmpt.encode import default_processor, encode_images

    root = Path(tempfile.mkdtemp(prefix="cmpt-readback-encode-"))
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n_images):
        h, w = 56 + 28 * (i % 3), 56 + 28 * (i % 2)
        paths.append(root / f"{i}.png")
        Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).byte().numpy()).save(paths[-1])
    vit = tiny_vit()
    processor = default_processor(vit, max_pixels=112 * 112)
    forwards, real = [0], vit.encode

    def encode(patches: torch.Tensor, *args, **kwargs):  # its input is on the device, however it got there
        forwards[0] += 1
        return real(_mark(patches), *args, **kwargs)

    vit.encode = encode
    run = {"token_budget": 40, "progress": False, "workers": 0}
    with _device_copies_marked():
        encode_images(vit, processor, paths[:2], root / "warm.safetensors", **run)
        _Counter.lines.clear()
        forwards[0] = 0
        encode_images(vit, processor, paths, root / "out.safetensors", **run)
    shutil.rmtree(root, ignore_errors=True)
    return Counter(_Counter.lines), forwards[0]


def measure(micro_batches: int) -> dict[str, dict]:
    """``{recipe: {"per_microbatch": n, "lines": {...}}}`` for this process's cmpt (``embed`` and
    ``encode``: per forward of ``Embedder.encode`` and ``cmpt encode``)."""
    from bench_comp_gpu import comp_setup
    from bench_moca_gpu import moca_setup

    comp = argparse.Namespace(shapes="tiny", images=2, fixed_size=112, batches=2)
    moca = argparse.Namespace(shapes="tiny", batches=2, text_budget=1024, vision_budget=96)
    out = {}
    counts = {
        "comp": lambda: count(comp_setup(comp), micro_batches),
        "moca": lambda: count(moca_setup(moca, torch.device("cpu")), micro_batches),
        "embed": lambda: count_embed(16 * micro_batches),
        "encode": lambda: count_encode(16 * micro_batches),
    }
    for name, counted in counts.items():
        lines, n = counted()
        out[name] = {
            "per_microbatch": sum(lines.values()) / n,
            "lines": {f"{w} {c}": k / n for (w, c), k in lines.most_common()},
        }
    return out


def _check_checkout(directory: Path) -> None:
    if (
        not (directory / "src" / "cmpt").is_dir()
        or not (directory / "benchmarks" / "bench_comp_gpu.py").is_file()
    ):
        raise SystemExit(
            f"--before {directory}: not a cmpt checkout (needs src/cmpt/ and benchmarks/bench_comp_gpu.py); "
            "make one with: mkdir DIR && git archive REV | tar -x -C DIR"
        )


def _before(directory: Path, micro_batches: int) -> dict[str, dict]:
    """The same counts for an older checkout, in a subprocess with its ``src`` and ``benchmarks``."""
    env = {**os.environ, "PYTHONPATH": f"{directory / 'src'}:{directory / 'benchmarks'}"}
    script = str(Path(__file__).resolve())
    cmd = [sys.executable, script, "--json-only", "--micro-batches", str(micro_batches)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"--before {directory}: counting failed there:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="an older checkout of cmpt to count too")
    ap.add_argument("--micro-batches", type=int, default=3)
    ap.add_argument("--top", type=int, default=12, help="lines shown per recipe")
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.before:
        _check_checkout(args.before.resolve())
    torch.manual_seed(0)
    now = measure(max(args.micro_batches, 1))
    if args.json_only:
        print(json.dumps(now))
        return now
    before = _before(args.before.resolve(), args.micro_batches) if args.before else None
    figures: dict = {"bench": "readback_count"}
    titles = (
        ("comp", "CoMP stage II"),
        ("moca", "MoCa CPT"),
        ("embed", "Embedder.encode, per forward"),
        ("encode", "cmpt encode, per forward"),
    )
    for name, title in titles:
        n = now[name]["per_microbatch"]
        per = "" if name in ("embed", "encode") else " per micro-batch"
        head = f"\n{title}: {n:.2f} device read-backs{per}"
        if before:
            b = before[name]["per_microbatch"]
            head += f" (before: {b:.1f})"
            figures[f"{name}_before"] = b
        print(head)
        for line, k in list((before or now)[name]["lines"].items())[: args.top]:
            print(f"  {k:>5.1f}  {line}" + ("  (before)" if before else ""))
        for line, k in list(now[name]["lines"].items())[: args.top] if before else []:
            print(f"  {k:>5.1f}  {line}  (now)")
        figures[name] = n
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    sys.path.append(str(HERE))  # after PYTHONPATH: --before runs the older checkout's benchmarks
    main()
