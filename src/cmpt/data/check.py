"""``cmpt data check``: every record of a source checked by :func:`cmpt.data.validate.check_record`,
the per-reason report and the bad-sample list (docs/method.md §4, ``docs/data.md``)."""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cmpt.data.open import is_map_style, open_source, split_spec
from cmpt.data.sources import BadSample
from cmpt.data.tar_reader import iter_tar
from cmpt.data.validate import Problem, check_record
from cmpt.data.webdataset import ShardList
from cmpt.vision.processor import ImageProcessor
from cmpt.vlm.vision_tokens import ensure_vision_tokens

__all__ = ["Report", "check_dataset", "data_check_main", "empty_shards"]


@dataclass
class Report:
    """Result of :func:`check_dataset`: every problem found, in record order."""

    num_records: int
    problems: list[Problem] = field(default_factory=list)

    def bad_samples(self) -> list[tuple[str, int, list[Problem]]]:
        """``(id, index, problems)`` per bad record, in record order (ids may repeat in a dataset)."""
        groups: dict[tuple[int, str], list[Problem]] = {}
        for p in self.problems:
            groups.setdefault((p.index, p.id), []).append(p)
        return [(sid, idx, probs) for (idx, sid), probs in groups.items()]

    @property
    def bad_ids(self) -> list[str]:
        return [sid for sid, _, _ in self.bad_samples()]

    @property
    def num_bad(self) -> int:
        return len(self.bad_samples())

    @property
    def counts(self) -> dict[str, int]:
        """Number of bad samples per reason (a sample counts once per reason)."""
        seen = {(p.index, p.id, p.reason) for p in self.problems}
        return dict(Counter(reason for _, _, reason in seen).most_common())

    def summary(self) -> str:
        """The counts per reason, each with its first bad sample and why (the fix, where the
        message names one: an absolute image path's ``path_escape``, docs/data.md)."""
        frac = self.num_bad / self.num_records if self.num_records else 0.0
        first: dict[str, Problem] = {}
        for p in self.problems:
            first.setdefault(p.reason, p)
        lines = [f"{self.num_records} records, {self.num_bad} bad ({100 * frac:.2f}%)"]
        for reason, n in self.counts.items():
            eg = first[reason]
            lines.append(f"  {reason:<22} {n:<6} e.g. {eg.id}" + (f": {eg.detail}" if eg.detail else ""))
        return "\n".join(lines)


def check_dataset(source: Any, *, num_threads: int = 0, **kwargs: Any) -> Report:
    """Check every record of ``source`` (keyword arguments as :func:`check_record`) (docs/method.md §4).

    ``source``: a map-style source (``LlavaSource``, ``HFSource``, ``MixtureSource``) or tar shards
    (a ``ShardList``, read once in order; ``index`` is then the sample's position in that read).
    ``num_threads > 1`` decodes images in a thread pool (PIL releases the GIL while decoding).
    A tokenizer without the vision tokens is copied and given them (the caller's is not modified).
    """
    tok = kwargs.get("tokenizer")
    if tok is not None:
        probe = copy.deepcopy(tok)
        if ensure_vision_tokens(probe):
            kwargs["tokenizer"] = probe

    def one(item: tuple[int, Any]) -> list[Problem]:
        i, rec = item
        if isinstance(rec, BadSample):
            return [Problem(rec.id, rec.reason, rec.detail, i)]
        if rec is None:
            try:
                rec = source[i]
            except BadSample as e:
                return [Problem(e.id, e.reason, e.detail, i)]
        return check_record(rec, source, **kwargs)

    if is_map_style(source):  # records read lazily, in the threads
        items: Any = ((i, None) for i in range(len(source)))
    else:  # streaming: records (or BadSample) in shard order
        items = enumerate(source.iter_records())
    if num_threads > 1:
        with ThreadPoolExecutor(num_threads) as pool:
            results = list(pool.map(one, items))
    else:
        results = [one(x) for x in items]
    return Report(len(results), [p for r in results for p in r])


def _files(obj: Any) -> Iterator[str]:
    """Every string in ``obj`` (a path, or a source's ``fingerprint()``) naming an existing file."""
    if isinstance(obj, str):
        if os.path.isfile(obj):
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _files(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _files(v)


def empty_shards(source: Any) -> list[str]:
    """The tar shards of ``source`` (a ``ShardList``, a tar index, a mixture's members) that hold no
    sample: training skips them (docs/method.md §4); ``cmpt data check`` lists them as a warning."""
    shards = source if isinstance(source, ShardList) else getattr(source, "shards", None)
    if not isinstance(shards, ShardList):
        return [p for s in getattr(source, "sources", []) for p in empty_shards(s)]
    paths = dict.fromkeys(shards.paths)
    return [p for p in paths if not any(True for _ in iter_tar(p, read_data=False, limit=1))]


def _check_out_path(out_jsonl: str, spec: Any, source: Any) -> None:
    """Refuse a bad-sample list path that is a directory, one of the files the check reads (the
    spec, a mixture's members, shards, parquet files: writing it would replace the data) or any other
    existing file but an empty one or an earlier bad-sample list (:func:`_earlier_list`)."""
    if os.path.isdir(out_jsonl):
        raise IsADirectoryError(
            f"--out {out_jsonl} is a directory: pass the .jsonl file to write, e.g. "
            f"{os.path.join(out_jsonl, 'bad_samples.jsonl')}"
        )
    if not os.path.exists(out_jsonl):
        return
    for f in (*_files(split_spec(spec)[0]), *_files(source.fingerprint())):
        if os.path.samefile(out_jsonl, f):
            raise ValueError(
                f"--out {out_jsonl} is the input data file {f}: the bad-sample list would replace it; "
                "choose another file, e.g. bad_samples.jsonl"
            )
    if not _earlier_list(out_jsonl):
        raise FileExistsError(
            f"--out {out_jsonl} exists and is not an earlier bad-sample list of `cmpt data check`; cmpt "
            "does not replace it: move or remove it, or choose another file, e.g. bad_samples.jsonl"
        )


def _earlier_list(path: str) -> bool:
    """Whether the existing file ``path`` is empty or a bad-sample list (its first row's keys)."""
    try:
        if os.path.getsize(path) == 0:
            return True
        with open(path, encoding="utf-8") as fh:
            row = json.loads(fh.readline(1 << 20))
    except (OSError, UnicodeDecodeError, ValueError):  # unreadable, not text, not JSON: not a list
        return False
    return isinstance(row, dict) and set(row) >= {"id", "index", "reasons"}


def data_check_main(
    spec: str,
    out_jsonl: str | None = None,
    image_root: str | None = None,
    tokenizer: Any = None,
    *,
    max_text_tokens: int | None = None,
    processor: ImageProcessor | None = None,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 3000,
    processor_factor: int = 28,
    num_threads: int = 0,
    decode: bool = True,
    print_fn: Any = print,
) -> int:
    """``cmpt data check SPEC``: check a data source (JSON/JSONL, tar shards, a Hugging Face dataset
    — ``PATH#SPLIT`` for a split — or a mixture YAML, see :func:`cmpt.data.open.open_source` and
    ``docs/data.md``); 0 when clean, 1 when anything is bad or there is no record at all. Empty tar
    shards (:func:`empty_shards`) are listed in a warning line: training skips them.

    Prints a per-reason summary; with ``out_jsonl`` writes one line per bad sample
    ``{"id", "index", "reasons": [...], "details": [...]}`` (``index``: the record's position); an
    ``out_jsonl`` that is a directory or an input file is refused before the check
    (:func:`_check_out_path`).
    ``tokenizer``: a tokenizer object or a name/directory for ``AutoTokenizer`` (enables the
    ``too_long`` check together with ``max_text_tokens``).
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    source = open_source(spec, image_root, key="the data to check", root_key="--image-root")
    if out_jsonl:
        _check_out_path(out_jsonl, spec, source)
    report = check_dataset(
        source,
        num_threads=num_threads,
        processor_factor=processor_factor,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        processor=processor,
        max_text_tokens=max_text_tokens,
        tokenizer=tokenizer,
        decode=decode,
    )
    print_fn(f"{getattr(source, 'path', spec)}: {report.summary()}")
    empty = list(dict.fromkeys(empty_shards(source)))
    if empty:
        more = f", ... ({len(empty)} in all)" if len(empty) > 20 else ""
        print_fn(
            f"{spec}: warning: {len(empty)} empty tar shard(s), skipped in training: "
            f"{', '.join(empty[:20])}{more}"
        )
    if report.num_records == 0:  # training would stop at once: "epoch 0 has no micro-batch"
        print_fn(f"{spec}: no records: nothing to train on (an empty file, or a mixture of none)")
        return 1
    if out_jsonl:
        os.makedirs(os.path.dirname(os.path.abspath(out_jsonl)), exist_ok=True)
        with open(out_jsonl, "w", encoding="utf-8") as fh:
            for sid, index, probs in report.bad_samples():
                reasons = list(dict.fromkeys(p.reason for p in probs))
                row = {
                    "id": sid,
                    "index": index,
                    "reasons": reasons,
                    "details": [p.detail for p in probs],
                }
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print_fn(f"{report.num_bad} bad sample(s) written to {out_jsonl}")
    return 1 if report.problems else 0
