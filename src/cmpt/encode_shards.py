"""``cmpt encode --shard-size N``: features of many images in shards that a rerun resumes
(docs/method.md §7 "Sharded, resumable encoding").

For ``--out DIR/feats.safetensors`` the images are cut, in input order, into shards of ``N``:
``DIR/feats-00001-of-00012.safetensors``, ... (each a complete ``cmpt encode`` file, see
:mod:`cmpt.encode`), then ``DIR/feats.safetensors.index.json`` lists them, written last (a shard
whose images were all skipped, ``skip_bad``, has no file and is not listed). Memory
holds one shard's features, not the whole set's. Each shard records in its metadata
(:data:`SHARD_KEY`) its input images (absolute paths), the settings that decide its features
(the model's configuration except its attention backend and origin, the image processor,
pooled/patch, bf16 or fp32) and a digest of the weights (:mod:`cmpt.weights_digest`). A rerun of the same
command reuses every shard whose record matches and encodes the others; a shard recorded with other
images, settings or weights, or shards of another shard count, stop the run before any work (their
features would not match the new ones), naming the shard and what differs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .encode import (
    EncodeResult,
    NothingEncodedError,
    bf16_autocast,
    check_output,
    encode_images,
    is_encode_output,
)
from .io_atomic import atomic_file
from .vision.processor import ImageProcessor
from .vision.vit import NativeViT
from .weights_digest import digest_mismatch, parameter_digest

__all__ = ["INDEX_KEY", "SHARD_KEY", "check_sharded_output", "encode_sharded", "index_path", "shard_paths"]

#: metadata key of a shard's record (JSON: inputs, settings, weights)
SHARD_KEY = "cmpt_encode_shard"
#: key (and format version) of the index file
INDEX_KEY, INDEX_FORMAT = "cmpt_encode_index", "1"


def shard_paths(out: str | Path, n: int) -> list[Path]:
    """``n`` shard files for ``out``: ``<stem>-00001-of-0000n<suffix>`` beside it."""
    out = Path(out)
    return [out.with_name(f"{out.stem}-{i:05d}-of-{n:05d}{out.suffix}") for i in range(1, n + 1)]


def index_path(out: str | Path) -> Path:
    """The index file of a sharded ``out``: ``<out>.index.json``."""
    out = Path(out)
    return out.with_name(out.name + ".index.json")


def _settings(vit: NativeViT, processor: ImageProcessor, pooled: bool, patches: bool, bf16: bool) -> dict:
    # neither the attention backend nor where the model was read from changes the features
    config = {k: v for k, v in asdict(vit.config).items() if k not in ("attn", "source")}
    features = [name for name, on in (("pooled", pooled), ("patch", patches)) if on]
    settings = {"vit": config, "processor": processor.to_dict(), "features": features, "bf16": bf16}
    return json.loads(json.dumps(settings))  # as a shard's record reads back (lists, not tuples)


def check_sharded_output(out: str | Path, images: list[Path], shard_size: int, model: Any = None) -> None:
    """Before any work: ``shard_size`` is at least 1, there are images, no shard path or index holds
    the user's data (:func:`~cmpt.encode.check_output`), and no shard of another shard count lies
    beside ``out`` (an earlier run over other images)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not images:
        raise ValueError("no images to encode")
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(
            f"output {out} is a directory: --out takes the .safetensors name the shards are named after, "
            f"e.g. {out / 'features.safetensors'}"
        )
    shards = shard_paths(out, math.ceil(len(images) / shard_size))
    for path in shards:  # an input image there is refused too: it is no encode output
        check_output(path, (), model)
    index = index_path(out)
    if index.exists() and not _is_index(index):
        raise FileExistsError(
            f"{index} exists and is not an index cmpt encode wrote: not replacing it; choose another --out, "
            "or remove the file yourself first if it may go"
        )
    pattern = re.compile(rf"{re.escape(out.stem)}-\d{{5}}-of-\d{{5}}{re.escape(out.suffix)}")
    planned = {p.name for p in shards}
    other = sorted(p.name for p in out.parent.glob(f"{out.stem}-*") if pattern.fullmatch(p.name))
    other = [name for name in other if name not in planned]
    if other:
        raise ValueError(
            f"{out.parent} holds shards of another shard count ({other[0]}, ...): an earlier cmpt encode "
            f"of other images or another --shard-size; remove them ({out.stem}-*-of-*{out.suffix}) or "
            "choose another --out"
        )


def _is_index(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and INDEX_KEY in data


def _record(path: Path) -> tuple[dict, list[str], int] | None:
    """A shard file's record, kept images and patch count; None when it is absent or no shard."""
    if not path.exists() or not is_encode_output(path):
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if SHARD_KEY not in meta:
                return None
            grids = f.get_tensor("grid_hw")
        return json.loads(meta[SHARD_KEY]), json.loads(meta["images"]), int(grids.prod(1).sum())
    except (SafetensorError, OSError, ValueError, KeyError):
        return None


def _difference(saved: dict, now: dict) -> str | None:
    """What differs between a shard's record and this run's, in words; None when nothing does."""
    if saved.get("inputs") != now["inputs"]:
        return "other images (the inputs changed: files added, removed, renamed or reordered)"
    before = saved.get("settings", {})
    changed = []
    for key, value in now["settings"].items():
        old = before.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            changed += [f"{key}.{k}" for k in sorted(set(value) | set(old)) if value.get(k) != old.get(k)]
        elif old != value:
            changed.append(key)
    if changed:
        return f"other settings ({', '.join(changed)})"
    bad = digest_mismatch(saved.get("weights", {}), now["weights"])
    if bad:
        return f"other weights ({len(bad)} parameter(s) differ, e.g. {bad[0]})"
    return None


def encode_sharded(
    vit: NativeViT,
    processor: ImageProcessor,
    images: list[Path],
    out: str | Path,
    *,
    shard_size: int,
    pooled: bool = True,
    patches: bool = True,
    precision: str = "auto",
    device: Any = "cpu",
    **kwargs: Any,
) -> EncodeResult:
    """:func:`~cmpt.encode.encode_images` shard by shard (see the module docstring), resuming: shards
    already written by the same command are reused. ``kwargs``: the other options of
    ``encode_images``. Returns the totals, ``out`` = the index file, ``shards`` and ``reused``."""
    from .eval.runtime import pick_device

    check_sharded_output(out, images, shard_size, getattr(vit, "loaded_from", None))
    out, device = Path(out), pick_device(device)
    chunks = [images[i : i + shard_size] for i in range(0, len(images), shard_size)]
    shards = shard_paths(out, len(chunks))
    base = {
        "settings": _settings(vit, processor, pooled, patches, bf16_autocast(precision, device.type)),
        "weights": parameter_digest(vit),
    }
    records = [{"inputs": [str(Path(p).resolve()) for p in chunk], **base} for chunk in chunks]
    found = [_record(path) for path in shards]
    for path, record, done in zip(shards, records, found):  # every kept shard checked before any work
        why = done and _difference(done[0], record)
        if why:
            raise ValueError(
                f"shard {path} was encoded from {why}: its features would not match this run's. Remove "
                f"the shards ({out.stem}-*-of-*{out.suffix}) to encode again, or choose another --out"
            )
    kept, skipped, patches_total, reused, listed = [], {}, 0, 0, []
    for i, (chunk, path, record) in enumerate(zip(chunks, shards, records)):
        if found[i] is not None:
            names, n_patches = found[i][1], found[i][2]
            done = {str(Path(n).resolve()) for n in names}
            for p, resolved in zip(chunk, record["inputs"]):
                if resolved not in done:
                    skipped[str(p)] = "skipped when its shard was encoded"
            reused += 1
        else:
            try:
                res = encode_images(
                    vit,
                    processor,
                    chunk,
                    path,
                    pooled=pooled,
                    patches=patches,
                    precision=precision,
                    device=device,
                    metadata={SHARD_KEY: json.dumps(record)},
                    desc=f"shard {i + 1}/{len(shards)}",
                    **kwargs,
                )
            except NothingEncodedError as e:  # every image of the shard skipped: no file, none listed
                skipped.update(e.skipped)
                continue
            names, n_patches = res.images, res.num_patches
            skipped.update(res.skipped)
        kept += names
        patches_total += n_patches
        listed.append({"file": path.name, "images": len(names), "patches": n_patches})
    if not kept:
        raise NothingEncodedError(f"no image could be encoded; problems: {skipped}", skipped)
    index = {INDEX_KEY: INDEX_FORMAT, "model": vit.config.source, "images": len(kept), "shards": listed}
    with atomic_file(index_path(out)) as tmp:
        tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    return EncodeResult(
        kept, skipped, patches_total, str(index_path(out)), shards=[str(p) for p in shards], reused=reused
    )
