"""Converters from a LLaVA JSON/JSONL dataset to tar shards and Hugging Face datasets (docs/method.md §4).

* :func:`llava_to_wds` writes WebDataset-style tar shards (format: :mod:`cmpt.data.webdataset`):
  sample ``n`` is ``<n:06d>.json`` (the record without its image paths; ``image`` names the image
  members' extensions) plus ``<n:06d>.<ext>`` for one image or ``<n:06d>.<k>.<ext>`` for several.
  An image–caption record keeps its ``caption`` key (it stays a caption record, docs/data.md). Tar
  headers carry no time, owner or mode of the source files, so the same input gives
  byte-identical shards.
* :func:`llava_to_hf` writes a ``datasets.Dataset`` (``format="disk"``: ``save_to_disk``;
  ``"parquet"``: ``data-XXXXX.parquet`` files) with columns ``id`` (string), ``images`` (a list of
  ``datasets.Image``, bytes embedded, ``path`` = the original relative path), ``conversations``
  (a list of ``{from, value}``: an image–caption record's conversation with the default prompt)
  and ``extra_json`` (the record's other keys as a JSON string). Needs the optional ``datasets`` package.

Tar shards are faithful: an image file that does not exist is still named (a member that is not
there), so it is counted as ``missing_image`` when training, as the JSON form would. Records that
cannot be represented are skipped and reported in the returned summary: unparseable JSONL lines
(both), and for HF a record whose image file is missing or outside the image root (the format
embeds the bytes; ``datasets`` cannot store a dangling path) or whose ``conversations`` is not a
list of ``{from: str, value: str}`` objects (the column has a fixed schema).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from typing import Any

from cmpt.data.llava_source import LlavaSource
from cmpt.data.sources import BadSample, Record
from cmpt.io_atomic import atomic_file

__all__ = ["llava_to_hf", "llava_to_wds", "require_datasets", "write_tar_samples"]


def require_datasets() -> Any:
    """Import the optional ``datasets`` package, or say how to install it."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "Hugging Face datasets support needs the optional `datasets` package: pip install 'datasets>=4.0'"
        ) from e
    return datasets


def _image_ext(path: Any) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".") if isinstance(path, str) else ""
    return ext if ext.isalnum() else "img"


def write_tar_samples(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write ``[(key, {ext: bytes})]`` as one tar shard (atomically, deterministic headers)."""
    with atomic_file(path) as tmp, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tf.addfile(info, io.BytesIO(data))


def _records(source: LlavaSource, skipped: list[dict[str, str]]) -> Iterator[Record]:
    for i in range(len(source)):
        try:
            yield source[i]
        except BadSample as e:
            skipped.append({"id": e.id, "reason": e.reason, "detail": e.detail})


def _read_file(rec: Record, i: int) -> bytes | None:
    try:
        path = rec.image_path(i)
        with open(path, "rb") as fh:
            return fh.read()
    except (BadSample, OSError):
        return None


def _record_json(rec: Record, images: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": rec.id}
    if images is not None:
        obj["image"] = images
    if rec.is_caption:  # read back as a caption record, so data.caption_prompt still applies
        obj["caption"] = rec.caption
    else:
        if rec.conversations is not None or rec.text is None:
            obj["conversations"] = rec.conversations
        if rec.text is not None:  # a MoCa document (docs/method.md §3)
            obj["text"] = rec.text
    obj.update(rec.meta)
    return obj


def llava_to_wds(
    json_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    image_root: str | os.PathLike | None = None,
    prefix: str = "shard",
) -> dict[str, Any]:
    """Write the records of a LLaVA JSON/JSONL file as tar shards ``out_dir/<prefix>-<k:06d>.tar``.

    Returns ``{"shards": [paths], "pattern": brace pattern, "samples": n, "skipped": [...]}``.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    source = LlavaSource(json_path, image_root)
    os.makedirs(out_dir, exist_ok=True)
    skipped: list[dict[str, str]] = []
    shards: list[str] = []
    batch: list[tuple[str, dict[str, bytes]]] = []
    n = 0

    def flush() -> None:
        path = os.path.join(os.fspath(out_dir), f"{prefix}-{len(shards):06d}.tar")
        write_tar_samples(path, batch)
        shards.append(path)
        batch.clear()

    for rec in _records(source, skipped):
        members: dict[str, bytes] = {}
        names = []
        for i in range(len(rec.images)):
            ext = _image_ext(rec.images[i])
            name = ext if len(rec.images) == 1 else f"{i}.{ext}"
            names.append(name)
            data = _read_file(rec, i)
            if data is not None:
                members[name] = data
        spec = None if not names else names[0] if len(names) == 1 else names
        obj = _record_json(rec, spec)
        batch.append((f"{n:06d}", {"json": json.dumps(obj, ensure_ascii=False).encode("utf-8"), **members}))
        n += 1
        if len(batch) >= samples_per_shard:
            flush()
    if batch or not shards:
        flush()
    pattern = os.path.join(os.fspath(out_dir), f"{prefix}-{{{0:06d}..{len(shards) - 1:06d}}}.tar")
    return {"shards": shards, "pattern": pattern, "samples": n, "skipped": skipped}


def _hf_row(rec: Record) -> dict[str, Any]:
    """The record as an HF row; :class:`BadSample` (reason, detail) when it cannot be one."""
    convs = rec.conversations
    ok = isinstance(convs, list) and all(
        isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
        for t in convs
    )
    if not ok or not all(isinstance(p, str) for p in rec.images):
        raise BadSample(rec.id, "bad_value", "does not fit the HF schema")
    images = []
    for i, name in enumerate(rec.images):
        path = rec.image_path(i)  # BadSample path_escape
        try:
            with open(path, "rb") as fh:
                images.append({"bytes": fh.read(), "path": name})
        except OSError as e:
            raise BadSample(rec.id, "missing_image", f"{path}: {e.strerror}") from None
    return {
        "id": rec.id,
        "images": images,
        "conversations": [{"from": t["from"], "value": t["value"]} for t in convs],
        "extra_json": json.dumps(rec.meta, ensure_ascii=False),
    }


def llava_to_hf(
    json_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    format: str = "disk",
    image_root: str | os.PathLike | None = None,
    num_files: int = 1,
) -> dict[str, Any]:
    """Write a LLaVA JSON/JSONL file as a Hugging Face dataset (``format="disk"`` or ``"parquet"``).

    Returns ``{"path": the directory (disk) or the first parquet file, "files": [...], "samples": n,
    "skipped": [...]}``. ``num_files``: parquet files / arrow shards to write.
    """
    if format not in ("disk", "parquet"):
        raise ValueError(f"format must be 'disk' or 'parquet', got {format!r}")
    datasets = require_datasets()
    source = LlavaSource(json_path, image_root)
    skipped: list[dict[str, str]] = []
    rows = []
    for rec in _records(source, skipped):
        try:
            rows.append(_hf_row(rec))
        except BadSample as e:
            skipped.append({"id": e.id, "reason": e.reason, "detail": e.detail})
    turn = {"from": datasets.Value("string"), "value": datasets.Value("string")}
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "images": datasets.List(datasets.Image()),
            "conversations": datasets.List(turn),
            "extra_json": datasets.Value("string"),
        }
    )
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_list(rows, features=features)  # in memory: a conversion tool
        del rows
        k = max(1, min(num_files, len(ds) or 1))
        if format == "disk":
            ds.save_to_disk(out, num_shards=k)
            files = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".arrow"))
            path = out
        else:
            files = [os.path.join(out, f"data-{i:05d}.parquet") for i in range(k)]
            for i, f in enumerate(files):
                ds.shard(k, i, contiguous=True).to_parquet(f)
            path = files[0] if k == 1 else out
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    return {"path": path, "files": files, "samples": len(ds), "skipped": skipped}
