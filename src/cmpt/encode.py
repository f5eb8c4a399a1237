"""`cmpt encode`: native-resolution features of image files, batched by a token budget.

Output: one safetensors file with
  ``pooled``        (n, D)  one vector per image (CLS / MAP head / patch mean, per the model's family)
  ``patch_tokens``  (N, D)  every image's patch features, raster order, concatenated
  ``grid_hw``       (n, 2)  patch grid per image; ``offsets`` (n+1,) rows of each image in patch_tokens
and in the file's metadata the image paths (in row order) under ``images`` (JSON list), the
model's origin under ``model`` and the format version under ``cmpt_encode``
(:data:`ENCODE_MARKER`): an existing ``--out`` is replaced only when it carries that mark
(:func:`check_output`; README "outputs never replace a user's file").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .host_tensor import read_back_in_windows, readback_window, to_device_async
from .hub import CONFIG_FILES, WEIGHT_FILES, is_hub_id, local_model_dir, read_json
from .io_atomic import atomic_file
from .prefetch import check_workers, ordered_map
from .vision.image_io import ImageLoadError
from .vision.processor import CONFIG_NAME as PROCESSOR_CONFIG
from .vision.processor import ImageProcessor
from .vision.rope import patch_positions
from .vision.vit import NativeViT
from .vlm.io import VLM_CONFIG_NAME

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: metadata key (and format version) of every file ``cmpt encode`` writes
ENCODE_MARKER, ENCODE_FORMAT = "cmpt_encode", "1"
_TENSORS = {"grid_hw", "offsets", "pooled", "patch_tokens"}


def vision_dir(model: str | os.PathLike) -> Path:
    """The local directory of a vision model name: the path itself (a missing one is refused with
    :func:`cmpt.hub.missing_path_error`), or for a hub id its cached or downloaded snapshot's
    configs and safetensors weights (:func:`cmpt.hub.local_model_dir`, :data:`cmpt.hub.WEIGHT_FILES`),
    enough to tell what it holds."""
    return local_model_dir(model, "vision checkpoint", allow_patterns=WEIGHT_FILES, must_exist=True)


def _is_native_vit(d: Path) -> bool:
    cfg = d / "config.json"
    return cfg.is_file() and read_json(cfg).get("cmpt_model") == "NativeViT"


def load_vit(
    model: str | os.PathLike, *, rope: bool | None = None, attn: str = "auto", weights: bool = True
) -> NativeViT:
    """A cmpt NativeViT directory, a CoMP-VFM tower of the official release (docs/method.md §1.5;
    both through ``NativeViT.from_pretrained``), any Hugging Face vision checkpoint that
    ``NativeViT.from_hf`` reads, or the vision tower of a VLM: a cmpt VLM directory (its
    ``vision/``; also an Embedder saved over one) or a CoMP-MM of the official release; local or by
    hub id (:func:`vision_dir`). ``weights=False``: a meta-device skeleton from the configs only."""
    from .vision.official_release import detect_official_layout

    d = vision_dir(model)
    if (d / VLM_CONFIG_NAME).is_file():
        return NativeViT.from_pretrained(d / "vision", rope=rope, attn=attn, weights=weights)
    layout = detect_official_layout(d)
    if layout == "vlm":
        from .vlm.model import VisionLanguageModel

        # by name: its tokenizer files too
        vlm = VisionLanguageModel.from_pretrained(_by_name(model, d), rope=rope, weights=weights)
        vlm.vit.config.attn = attn  # read when the ViT runs
        return vlm.vit
    if _is_native_vit(d) or layout == "vit":
        return NativeViT.from_pretrained(d, rope=rope, attn=attn, weights=weights)
    # a hub id by name: transformers fetches the weight files it reads (a .bin too)
    return NativeViT.from_hf(_by_name(model, d), rope=rope, attn=attn, weights=weights)


def _by_name(model: str | os.PathLike, d: Path) -> str | Path:
    return model if is_hub_id(model) else d


def processor_for(vit: NativeViT, model: str | os.PathLike, **overrides) -> ImageProcessor:
    """The checkpoint's preprocessing (:meth:`ImageProcessor.from_pretrained`, local or by hub id: its
    ``preprocessor_config.json``, a cmpt VLM directory's ``processor/``; mean/std, pixel bounds) with
    the native-resolution policy unless overridden; the ViT's own settings without one."""
    c = vit.config
    kwargs = {"policy": "native", **{k: v for k, v in overrides.items() if v is not None}}
    if kwargs["policy"] == "native":
        kwargs.setdefault("fixed_size", None)  # a fixed-resolution checkpoint's side does not apply
    d = local_model_dir(model, "vision checkpoint", allow_patterns=CONFIG_FILES)
    if (d / VLM_CONFIG_NAME).is_file() or (d / PROCESSOR_CONFIG).is_file():
        return ImageProcessor.from_pretrained(d, patch_size=c.patch_size, merge_size=c.merge_size, **kwargs)
    return default_processor(vit, **kwargs)


def load_vision_model(model: str | os.PathLike, *, weights: bool = True) -> tuple[NativeViT, ImageProcessor]:
    """``(vit, processor)`` of a model name, local or by hub id (:func:`vision_dir`): a cmpt VLM
    directory (its ``vision/`` and ``processor/``), a CoMP-MM of the official release (its tower
    and processor, docs/method.md §1.5), else what :func:`load_vit` reads (:func:`processor_for`).
    ``weights=False``: the ViT as a meta-device skeleton, from the configs only (the processor is
    the same)."""
    from .vision.official_release import detect_official_layout

    d = vision_dir(model)
    if (d / VLM_CONFIG_NAME).is_file():
        return load_vit(d, weights=weights), ImageProcessor.from_pretrained(d)
    if detect_official_layout(d) == "vlm":
        from .vlm.model import VisionLanguageModel

        vlm = VisionLanguageModel.from_pretrained(model, weights=weights)  # by name: its tokenizer files too
        return vlm.vit, vlm.processor or default_processor(vlm.vit)
    vit = load_vit(model, weights=weights)
    return vit, processor_for(vit, model)


def default_processor(vit: NativeViT, **overrides) -> ImageProcessor:
    """The native-resolution processor of ``vit`` (:meth:`ImageProcessor.for_vit`: its patch/merge
    size, mean and std)."""
    return ImageProcessor.for_vit(vit.config, **overrides)


def expand_images(items: Iterable[str | Path]) -> list[Path]:
    """Files as given, directories expanded (recursively, sorted) to their image files."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"image {p} does not exist")
    if not out:
        raise ValueError("no images to encode: pass image files or folders that contain images")
    return out


def is_encode_output(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file an earlier ``cmpt encode`` wrote: its metadata carries
    :data:`ENCODE_MARKER`, or (a file from before the mark) encode's ``images`` list and only
    encode's tensors. Anything else — not safetensors, unreadable, another tool's — is not."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, set(f.keys())
    except (SafetensorError, OSError):
        return False
    return ENCODE_MARKER in meta or ("images" in meta and {"grid_hw", "offsets"} <= names <= _TENSORS)


def check_output(out: str | Path, images: Iterable[str | Path], model: str | Path | None = None) -> None:
    """Refuse an output file that would destroy an input or the user's data, or cannot be written,
    before any work: ``out`` is a directory, one of ``images``, a file of the local ``model``
    directory, or an existing file that is not an earlier ``cmpt encode`` output
    (:func:`is_encode_output`); such a one is replaced."""
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(
            f"output {out} is a directory: --out takes the .safetensors file to write, e.g. "
            f"{out / 'features.safetensors'}"
        )
    if not out.exists():
        return
    for image in images:
        if os.path.samefile(out, image):
            raise ValueError(
                f"output {out} is the input image {image}: writing it would destroy the image; choose "
                "another file, e.g. features.safetensors"
            )
    if model is not None and Path(model).is_dir() and Path(model).resolve() in out.resolve().parents:
        raise ValueError(
            f"output {out} is a file of the model directory {model}: writing it would damage the model; "
            "choose a file outside it"
        )
    if not is_encode_output(out):
        raise FileExistsError(
            f"output {out} exists and is not a file cmpt encode wrote: not replacing it; choose another "
            "--out, or remove the file yourself first if it may go"
        )


def bf16_autocast(precision: str, device_type: str) -> bool:
    """Whether ``precision`` (``auto`` | ``fp32`` | ``bf16``) encodes under bf16 autocast on a
    ``device_type`` device: ``bf16``, or ``auto`` on CUDA."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def check_attention(attn: str, device: torch.device, precision: str, key: str = "--attn") -> None:
    """Refuse an attention backend that cannot run on ``device`` at ``precision`` before anything
    loads (:func:`cmpt.vision.attention.check_backend`, docs/method.md §1.1)."""
    from .vision.attention import check_backend

    check_backend(attn, device.type, key=key, half=bf16_autocast(precision, device.type))


def budget_batches(costs: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Consecutive index groups whose summed cost stays within ``budget`` (an oversize item goes alone)."""
    batch, total = [], 0
    for i, cost in enumerate(costs):
        if batch and total + cost > budget:
            yield batch
            batch, total = [], 0
        batch.append(i)
        total += cost
    if batch:
        yield batch


class NothingEncodedError(ValueError):
    """Every image was skipped (``skip_bad``): nothing to write. ``skipped``: path → why."""

    def __init__(self, message: str, skipped: dict[str, str]) -> None:
        super().__init__(message)
        self.skipped = skipped


@dataclass
class EncodeResult:
    """What an encode wrote: the images encoded (in row order), those skipped with why, their patch
    count and the output file (a sharded encode's index; its ``shards``, ``reused`` of them)."""

    images: list[str]
    skipped: dict[str, str]
    num_patches: int
    out: str
    shards: list[str] = field(default_factory=list)
    reused: int = 0


def to_raster(tokens: torch.Tensor, grids: Sequence[Sequence[int]], merge: int) -> torch.Tensor:
    """Merge-window ordered rows → raster order, per image."""
    parts, start = [], 0
    for h, w in grids:
        n = h * w
        rc = patch_positions([(h, w)], merge)
        raster = torch.empty_like(tokens[start : start + n])
        raster[rc[:, 0] * w + rc[:, 1]] = tokens[start : start + n]
        parts.append(raster)
        start += n
    return torch.cat(parts)


@torch.no_grad()
def encode_images(
    vit: NativeViT,
    processor: ImageProcessor,
    images: Sequence[Path],
    out: str | Path,
    *,
    token_budget: int = 16384,
    pooled: bool = True,
    patches: bool = True,
    skip_bad: bool = False,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    progress: bool = True,
    workers: int | None = None,
    metadata: dict[str, str] | None = None,
    desc: str = "encode",
) -> EncodeResult:
    """Encode ``images`` at native resolution and write one safetensors file (see module docstring).

    ``precision``: ``fp32``, ``bf16`` (autocast; on a GPU the ViT then uses a flash varlen kernel)
    or ``auto`` = bf16 on CUDA, fp32 elsewhere. Features are saved in float32 either way.
    ``device``: what ``--device`` takes (:func:`cmpt.eval.runtime.pick_device`: ``auto``, ``cpu``,
    ``cuda[:N]``, ``mps[:0]``; one this torch cannot use is a ``ValueError`` listing those it can).
    An ``out`` that is a directory, an input image, a file of the model's directory or a file
    ``cmpt encode`` did not write is refused first (:func:`check_output`), and so is an attention
    backend (``vit.config.attn``) that cannot run there (:func:`check_attention`); the file is
    written to ``<out>.tmp`` and renamed (removed on error). ``workers``: threads that load and
    patchify images ahead of the forward (default :func:`cmpt.prefetch.default_workers`; 0: in this
    thread; :func:`cmpt.prefetch.ordered_map`). ``metadata``: more entries of the file's metadata
    (:mod:`cmpt.encode_shards` records what a shard was made from); ``desc``: the progress bar's label.
    """
    if not (pooled or patches):
        raise ValueError("nothing to save: enable pooled and/or patch features")
    check_output(out, images, getattr(vit, "loaded_from", None))
    check_workers(workers)
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    from .eval.runtime import pick_device

    device = pick_device(device)  # one the torch cannot use: a ValueError listing the usable ones
    check_attention(vit.config.attn, device, precision, key="attn")
    vit = vit.to(device).eval()
    dev_type = device.type
    bf16 = bf16_autocast(precision, dev_type)
    costs, sizes, skipped = [], {}, {}
    from PIL import Image

    for path in images:  # header-only pass: token counts for batching
        try:
            with Image.open(path) as im:
                h, w = processor.grid_size(im.height, im.width)
            costs.append(h * w)
            sizes[path] = (h, w)
        except Exception as e:  # reported with the path, then skipped or raised
            if not skip_bad:
                raise ImageLoadError(
                    f"image {path}: cannot read it ({e}); fix or remove it, or pass --skip-bad"
                ) from e
            skipped[str(path)] = str(e)
            costs.append(0)
    pooled_rows, patch_rows, grids, kept = [], [], [], []

    def prepare(path: Path) -> tuple[torch.Tensor, tuple[int, int]] | Exception:
        try:
            return processor.preprocess(path)
        except (ImageLoadError, ValueError) as e:  # a bad image: the loop below raises or skips it
            return e

    def forwards(bar: tqdm) -> Iterator[tuple[tuple[list[Path], list], tuple[torch.Tensor, ...]]]:
        """Each batch's images and grids, and its device outputs (patch tokens, pooled rows)."""
        for batch in budget_batches(costs, token_budget):
            good, tensors = [], []
            for path in (images[i] for i in batch if images[i] in sizes):
                result = next(prepared)
                if isinstance(result, Exception):
                    if not skip_bad:
                        raise result
                    skipped[str(path)] = str(result)
                else:
                    tensors.append(result)
                    good.append(path)
            if good:
                x = to_device_async(torch.cat([t for t, _ in tensors]), device)
                grid = [g for _, g in tensors]
                with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
                    tokens, prefix = vit.encode(x, grid)
                    pooled_out = vit.pool(tokens, prefix, grid) if pooled else None
                yield (good, grid), ((tokens,) if patches else ()) + ((pooled_out,) if pooled else ())
            bar.update(len(batch))

    # images decoded and patchified by `workers` threads ahead of the forward, outputs read back a
    # window of batches at a time (docs/method.md §7)
    prepared = ordered_map(prepare, [p for p in images if p in sizes], workers=workers)
    # the bar advances after each batch's forward: an error leaves it short of 100 %
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar, closing(prepared):
        for (good, grid), host in read_back_in_windows(forwards(bar), readback_window(device)):
            if patches:
                patch_rows.append(to_raster(host[0], grid, vit.config.merge_size))
            if pooled:
                pooled_rows.append(host[-1])
            grids.extend(grid)
            kept.extend(str(p) for p in good)
    if not kept:
        raise NothingEncodedError(f"no image could be encoded; problems: {skipped}", skipped)
    counts = torch.tensor([h * w for h, w in grids])
    tensors_out = {
        "grid_hw": torch.tensor(grids, dtype=torch.long),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
    }
    if pooled:
        tensors_out["pooled"] = torch.cat(pooled_rows)
    if patches:
        tensors_out["patch_tokens"] = torch.cat(patch_rows)
    meta = {**(metadata or {}), "images": json.dumps(kept), "model": vit.config.source}
    meta[ENCODE_MARKER] = ENCODE_FORMAT
    with atomic_file(out) as tmp:
        save_file(tensors_out, str(tmp), metadata=meta)
    return EncodeResult(kept, skipped, int(counts.sum()), str(out))
