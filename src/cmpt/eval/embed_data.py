"""``cmpt eval embed`` data: MMEB- and ViDoRe-style tasks, read and checked (docs/method.md §3, §5).

* ``D/*.jsonl``: one MMEB task per file (name = stem), one query per line: ``{"task", "qry_text",
  "qry_img_path" | null, "tgt_text": [...], "tgt_img_path": [...]}``. Candidate ``i`` is
  ``tgt_text[i]`` and/or ``tgt_img_path[i]`` (``""`` / null = absent; either list may be
  omitted), the positive at index 0; image paths relative to ``D``; MMEB's ``<|image_1|>``
  placeholder is read as cmpt's ``<image>``.
* ``D/<task>/{queries,corpus,qrels}.jsonl``: one page-retrieval task per folder; ``{"id",
  "text"}``, ``{"id", "image_path"}`` (relative to the folder), ``{"query_id", "corpus_id",
  "score"}``. A query is its raw text (no instruction); a page is :data:`PAGE_PROMPT` with the
  image at its placeholder.
* A single task: ``--data D/<task>.jsonl`` (one MMEB task, image paths relative to ``D``) or
  ``--data D/<task>/`` (one page-retrieval folder).

Training data are refused in one line, before any record is checked: a ``.jsonl`` whose first
records are MoCa contrastive pairs (``qry`` / ``pos_text`` keys, e.g. the ``train.jsonl`` of
``cmpt data synth --kind retrieval``) or documents (:func:`cmpt.data.documents.probe_kind`, by
structure), with the evaluation folder to pass instead (docs/method.md §3 "Evaluation").

Every distinct input ``(text, absolute image path)`` gets one index in :class:`EmbedData` ``keys``
(embedded once whatever its tasks or roles). ``limit`` keeps the first N usable queries per task.
A bad record (invalid JSON, missing / mistyped key, image missing, unreadable or outside the task's
root, duplicate id, qrels naming an unknown id) raises ``ValueError`` naming the file and line, or
with ``skip_bad`` is skipped, logged and listed in ``EmbedData.bad`` (reasons from
:data:`cmpt.data.sources.REASONS`). Images are fully decoded once here, so a bad one never
surfaces in the middle of the embedding: the records are read once with every existing image taken
as usable, the images decoded by threads (:func:`cmpt.prefetch.ordered_map`, docs/method.md §7),
and only when something is bad are the records read again, to raise or skip in file order as if
each image had been decoded in turn.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmpt.data.sources import BadSample, resolve_image_path
from cmpt.prefetch import ordered_map
from cmpt.vision.processor import load_image
from cmpt.vlm.chat import IMAGE_TOKEN

__all__ = ["PAGE_PROMPT", "EmbedData", "MMEBTask", "PageTask", "load_embed_data"]

log = logging.getLogger("cmpt.eval")

PAGE_PROMPT = "<image>\nRepresent the given document image."
Key = tuple[str | None, str | None]  # (text, absolute image path)


@dataclass
class MMEBTask:
    name: str
    path: Path
    queries: list[int] = field(default_factory=list)  # pool index per query
    candidates: list[list[int]] = field(default_factory=list)  # pool indices, positive first
    skipped: int = 0


@dataclass
class PageTask:
    name: str
    path: Path
    query_ids: list[str] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    qrels: list[dict[int, float]] = field(default_factory=list)  # per query: page position → score
    skipped: int = 0


@dataclass
class EmbedData:
    """The tasks of a data directory (or single task) and the distinct inputs they need (``keys``).
    ``root``: the folder MMEB image paths are relative to; ``path``: what ``--data`` named."""

    root: Path
    mmeb: list[MMEBTask] = field(default_factory=list)
    pages: list[PageTask] = field(default_factory=list)
    keys: list[Key] = field(default_factory=list)
    bad: list[dict[str, Any]] = field(default_factory=list)
    index: dict[Key, int] = field(default_factory=dict, repr=False)
    path: Path | None = None  # what --data named (default: root)

    def add(self, text: str | None, image: str | None) -> int:
        key = (text, image)
        if key not in self.index:
            self.index[key] = len(self.keys)
            self.keys.append(key)
        return self.index[key]


class _Checker:
    """Raises on a bad record (naming file and line) or, with ``skip_bad``, records it.

    ``survey=True`` (a first pass): records every bad record silently, and takes an existing image
    as usable for now, listing it in ``unverified`` to be decoded in parallel after the pass
    (:func:`_decode_all`); ``known``: usability already established per path."""

    def __init__(
        self,
        data: EmbedData,
        skip_bad: bool,
        survey: bool = False,
        known: dict[str, str | None] | None = None,
    ) -> None:
        self.data, self.skip_bad, self.survey = data, skip_bad, survey
        self.images: dict[str, str | None] = dict(known or {})  # path → reason it is unusable (None: fine)
        self.unverified: list[str] = []

    def bad(self, path: Path, line: int, reason: str, detail: str) -> None:
        where = f"{path}:{line}"
        if not self.skip_bad and not self.survey:
            raise ValueError(f"{where}: {reason}: {detail}; fix the record or pass --skip-bad to skip it")
        if not self.survey:
            log.warning("skipping %s: %s: %s", where, reason, detail)
        self.data.bad.append({"file": str(path), "line": line, "reason": reason, "detail": detail})

    def image(self, root: Path, value: Any, what: str) -> str:
        """Absolute path of a usable image; ``BadSample`` otherwise (checked once per path)."""
        full = resolve_image_path(str(root), value, what)
        if full not in self.images:
            if not os.path.isfile(full):
                self.images[full] = "missing_image"
            elif self.survey:
                self.images[full] = None
                self.unverified.append(full)
            else:
                self.images[full] = _decode_problem(full)
        if self.images[full] is not None:
            raise BadSample(what, self.images[full], f"{value!r} ({full})")
        return full


def _decode_problem(path: str) -> str | None:
    """``"unreadable_image"`` when the image at ``path`` cannot be fully decoded, else None."""
    try:
        load_image(path)
    except ValueError:
        return "unreadable_image"
    return None


def _decode_all(paths: list[str]) -> dict[str, str | None]:
    """:func:`_decode_problem` of each path, decoded by threads (:func:`cmpt.prefetch.ordered_map`,
    docs/method.md §7)."""
    return dict(zip(paths, ordered_map(_decode_problem, paths)))


def _jsonl(path: Path, check: _Checker):
    """``(line number, object)`` of every non-blank line; invalid ones go to ``check.bad``."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                check.bad(path, n, "invalid_json", str(e))
                continue
            if not isinstance(obj, dict):
                check.bad(path, n, "invalid_json", f"a line must be a JSON object, got {type(obj).__name__}")
                continue
            yield n, obj


def _text(value: Any, key: str) -> str | None:
    """A stored string (``None`` / ``""`` = absent); MMEB's ``<|image_1|>`` becomes ``<image>``."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadSample(key, "bad_value", f"{key} must be a string, got {type(value).__name__}")
    return value.replace("<|image_1|>", "<image>")


def _placeholders(text: str | None, n_images: int, what: str) -> None:
    """A text either has no ``<image>`` (the image goes first) or one per image."""
    found = (text or "").count(IMAGE_TOKEN)
    if found not in (0, n_images):
        raise BadSample(what, "placeholder_mismatch", f"{found} {IMAGE_TOKEN} in the text, {n_images} images")


def _mmeb_record(obj: dict, root: Path, check: _Checker) -> tuple[Key, list[Key]]:
    text = _text(obj.get("qry_text"), "qry_text")
    image = None if obj.get("qry_img_path") in (None, "") else check.image(root, obj["qry_img_path"], "query")
    if text is None and image is None:
        raise BadSample("query", "missing_key", "the query has neither qry_text nor qry_img_path")
    _placeholders(text, int(image is not None), "query")
    lists = {k: obj.get(k) for k in ("tgt_text", "tgt_img_path")}
    if all(v is None for v in lists.values()):
        raise BadSample("targets", "missing_key", "no tgt_text nor tgt_img_path")
    for k, v in lists.items():
        if v is not None and not isinstance(v, list):
            raise BadSample(k, "bad_value", f"{k} must be a list, got {type(v).__name__}")
    sizes = {len(v) for v in lists.values() if v is not None}
    if len(sizes) != 1 or 0 in sizes:
        raise BadSample("targets", "bad_value", f"tgt_text / tgt_img_path lengths {sorted(sizes)}")
    cands = []
    for i in range(sizes.pop()):
        t = None if lists["tgt_text"] is None else _text(lists["tgt_text"][i], f"tgt_text[{i}]")
        p = None if lists["tgt_img_path"] is None else lists["tgt_img_path"][i]
        p = None if p in (None, "") else check.image(root, p, f"candidate {i}")
        if t is None and p is None:
            raise BadSample(f"candidate {i}", "missing_key", f"candidate {i} has neither text nor image")
        _placeholders(t, int(p is not None), f"candidate {i}")
        cands.append((t, p))
    return (text, image), cands


def _refuse_training_data(path: Path) -> None:
    """One ``ValueError`` when ``path`` holds MoCa training pairs or documents rather than an MMEB
    task (its first records, by structure: :func:`cmpt.data.documents.probe_kind`; docs/method.md §3)."""
    from cmpt.data.documents import DATA_KINDS, probe_kind
    from cmpt.data.open import open_source

    kind = probe_kind(open_source(path, key="--data"))
    if kind is None:
        return
    held, stage, _ = DATA_KINDS[kind]
    sibling = path.parent / "eval"
    where = f"e.g. {sibling}" if sibling.is_dir() else "e.g. the eval/ of `cmpt data synth --kind retrieval`"
    raise ValueError(
        f"{path} looks like training data, not an evaluation task: it holds {held}, MoCa stage "
        f"{stage}'s data; pass the evaluation folder ({where}) whose *.jsonl files have "
        "qry_text/qry_img_path + tgt_text/tgt_img_path keys, or one such file"
    )


def _load_mmeb(path: Path, data: EmbedData, check: _Checker, limit: int | None) -> MMEBTask:
    task = MMEBTask(path.stem, path)
    for n, obj in _jsonl(path, check):
        if not task.queries and "qry_text" not in obj and "qry_img_path" not in obj:
            _refuse_training_data(path)  # no query key: training data? (else a bad record below)
        if limit is not None and len(task.queries) >= limit:
            break
        try:
            query, cands = _mmeb_record(obj, data.root, check)
        except BadSample as e:
            check.bad(path, n, e.reason, f"{e.id}: {e.detail}")
            continue
        task.queries.append(data.add(*query))
        task.candidates.append([data.add(*c) for c in cands])
    return task


def _id(obj: dict, key: str) -> str:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise BadSample(key, "missing_key" if value is None else "bad_value", f"{key} = {value!r}")
    return str(value)


def _load_pages(task_dir: Path, data: EmbedData, check: _Checker, limit: int | None) -> PageTask:
    task = PageTask(task_dir.name, task_dir)
    pages: dict[str, int] = {}  # corpus id → position in task.pages
    unusable: set[str] = set()  # ids of skipped records / queries beyond the limit
    corpus = task_dir / "corpus.jsonl"
    for n, obj in _jsonl(corpus, check):
        try:
            cid = _id(obj, "id")
            if cid in pages:
                raise BadSample(cid, "bad_value", f"duplicate corpus id {cid!r}")
            image = check.image(task_dir, obj.get("image_path"), f"page {cid}")
        except BadSample as e:
            check.bad(corpus, n, e.reason, f"{e.id}: {e.detail}")
            if str(obj.get("id")) not in pages:  # not a duplicate of a usable page
                unusable.add(str(obj.get("id")))
            continue
        pages[cid] = len(task.pages)
        task.pages.append(data.add(PAGE_PROMPT, image))
    queries: dict[str, int] = {}
    qfile = task_dir / "queries.jsonl"
    for n, obj in _jsonl(qfile, check):
        try:
            qid, text = _id(obj, "id"), _text(obj.get("text"), "text")
            if qid in queries:
                raise BadSample(qid, "bad_value", f"duplicate query id {qid!r}")
            if text is None:
                raise BadSample(qid, "missing_key", "the query has no text")
            _placeholders(text, 0, qid)
        except BadSample as e:
            check.bad(qfile, n, e.reason, f"{e.id}: {e.detail}")
            if str(obj.get("id")) not in queries:
                unusable.add(str(obj.get("id")))
            continue
        if limit is not None and len(queries) >= limit:
            unusable.add(qid)
            continue
        queries[qid] = len(task.queries)
        task.query_ids.append(qid)
        task.queries.append(data.add(text, None))  # raw text, no instruction
        task.qrels.append({})
    qrels = task_dir / "qrels.jsonl"
    for n, obj in _jsonl(qrels, check):
        try:
            qid, cid, score = _id(obj, "query_id"), _id(obj, "corpus_id"), obj.get("score")
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise BadSample(qid, "bad_value", f"score must be a number, got {score!r}")
            if qid in unusable or cid in unusable:
                continue
            for known, name, value in ((queries, "query_id", qid), (pages, "corpus_id", cid)):
                if value not in known:
                    raise BadSample(qid, "bad_value", f"unknown {name} {value!r}")
        except BadSample as e:
            check.bad(qrels, n, e.reason, f"{e.id}: {e.detail}")
            continue
        task.qrels[queries[qid]][pages[cid]] = float(score)
    return task


def load_embed_data(
    data: str | os.PathLike, *, limit: int | None = None, skip_bad: bool = False
) -> EmbedData:
    """Read every task of ``data`` — a folder of tasks, one ``*.jsonl`` MMEB task or one
    page-retrieval folder (see the module docstring; docs/method.md §3 "Evaluation")."""
    given = Path(data)
    files = ("queries.jsonl", "corpus.jsonl", "qrels.jsonl")
    if given.is_file() and given.suffix.lower() != ".jsonl":
        raise ValueError(
            f"--data {given}: expected a folder of *.jsonl MMEB tasks / page-retrieval folders, one "
            "*.jsonl MMEB task file or one page-retrieval folder (queries/corpus/qrels.jsonl)"
        )
    if not given.exists():
        raise FileNotFoundError(
            f"{given} does not exist: pass a folder of *.jsonl MMEB tasks / page-retrieval folders, "
            "one *.jsonl MMEB task file or one page-retrieval folder"
        )
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    root = given.parent if given.is_file() else given  # MMEB image paths are relative to it
    if given.is_file():  # one MMEB task
        mmeb_files, page_dirs = [given], []
    elif all((given / f).is_file() for f in files):  # one page-retrieval task
        mmeb_files, page_dirs = [], [given]
    else:
        mmeb_files, page_dirs = sorted(root.glob("*.jsonl")), sorted(p for p in root.iterdir() if p.is_dir())
    for sub in page_dirs:
        present = [f for f in files if (sub / f).is_file()]
        if present and len(present) < 3:
            raise FileNotFoundError(f"{sub} has {', '.join(present)} but not all of {', '.join(files)}")
    page_dirs = [sub for sub in page_dirs if all((sub / f).is_file() for f in files)]

    def read(check_of: Callable[[EmbedData], _Checker]) -> tuple[EmbedData, _Checker]:
        out = EmbedData(root, path=given)
        check = check_of(out)
        out.mmeb = [_load_mmeb(path, out, check, limit) for path in mmeb_files]
        out.pages = [_load_pages(sub, out, check, limit) for sub in page_dirs]
        return out, check

    # a survey pass, then its images decoded in parallel; when anything is bad, a second pass with
    # what the survey learnt raises or skips exactly as one pass decoding each image in turn
    out, check = read(lambda d: _Checker(d, skip_bad, survey=True))
    decoded = _decode_all(check.unverified)
    if out.bad or any(decoded.values()):
        out, _ = read(lambda d: _Checker(d, skip_bad, known={**check.images, **decoded}))
    if not out.mmeb and not out.pages:
        raise FileNotFoundError(
            f"{root} holds no task: expected *.jsonl MMEB files and/or folders with {', '.join(files)}"
        )
    for t in [*out.mmeb, *out.pages]:
        t.skipped = sum(1 for b in out.bad if Path(b["file"]).is_relative_to(t.path))
    return out
