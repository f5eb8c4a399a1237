"""Mixtures of data sources from a YAML file, reproducible by seed (docs/method.md §4).

::

    seed: 0                        # selection seed (optional, default 0)
    datasets:
      - path: coco/llava.jsonl     # any source kind; relative to this file's directory
        sampling: all              # all | first:N | random:N | random:P%
        weight: 2                  # how many times the selected records appear per epoch
      - path: ocr/hf_dataset
        image_root: ocr/images     # optional (default: the source's own)
        split: train               # optional: a Hugging Face dataset's split
        sampling: random:25%
        weight: 0.5
        id_prefix: "ocr/"          # optional: prepended to the member's ids

**Sampling** chooses which records of a member are used, once, when the mixture is opened:
``all``; ``first:N`` (the first ``N``, or all when fewer); ``random:N`` / ``random:P%`` (``N`` or
``round(P/100 · n)`` records drawn without replacement by a generator seeded with
``(seed, member position)``, kept in file order). The same file and seed select the same records.

**Weight** ``w > 0`` is the member's rate relative to its selection: the selected records appear
``floor(w)`` times per epoch, plus a seeded subset of ``round(frac(w) · n_selected)`` of them (drawn
without replacement; ``w = 0.5``: half the selection). Member ``i`` is therefore
``w_i · n_i / Σ_j w_j n_j`` of every epoch, exactly up to rounding, and its records repeat rather
than being drawn with replacement (the token-budget batcher shuffles each epoch). A repeated record
keeps its id, with ``"#k"`` appended for its ``k``-th extra copy, so ids stay unique and stable. A
member left with no record (or shard) by its sampling and weight is an error naming it and the
weight or sampling it needs, never a member silently dropped.

**Result.** A mixture with map-style members (LLaVA JSON/JSONL, Hugging Face datasets, nested
mixtures) is one map-style :class:`MixtureSource`: the length index, batcher, rank split and exact
resume apply unchanged. Its tar-shard members (and nested all-tar mixtures) are opened as
:class:`~cmpt.data.tar_index.TarIndexSource` — shards indexed once by byte offset, cached — so
they mix with the others at record granularity, ``sampling`` included. A mixture whose members are
*all* tar shards stays one streaming :class:`~cmpt.data.webdataset.ShardList`, mixed at shard
granularity: only ``sampling: all`` is accepted, and the weight repeats the member's shard list
``floor(w)`` times plus a seeded subset of ``round(frac(w) · shards)`` shards. It is a
:class:`MixtureShards`: every listed shard carries its member's ``id_prefix`` and a copy number
(its earlier listings with that prefix), so the samples' ids are prefixed and copies get ``"#k"``
as above; a default id ``<shard>/<key>`` names the shard by its base name, or by as much of its
path as tells it from another member's shard of that name (``a/000.tar``, ``b/000.tar``).

``split`` (Hugging Face datasets only, as ``PATH#SPLIT``): the split of a ``DatasetDict`` or of a
directory of parquet files (:mod:`cmpt.data.hub_layout`).

Members may hold MoCa documents and passages as well as LLaVA conversations (docs/method.md §3):
records pass through unchanged (``Record.text`` included), only their ids get the prefix / copy
suffix.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import yaml

from cmpt.data.open import open_source, source_kind
from cmpt.data.sources import BadSample, Record
from cmpt.data.tar_index import TarIndexSource
from cmpt.data.tar_reader import iter_tar
from cmpt.data.webdataset import ShardList, expand_shards

__all__ = [
    "MixtureMember",
    "MixtureShards",
    "MixtureSource",
    "load_mixture",
    "map_style",
    "parse_sampling",
    "select_indices",
    "weighted",
]

_SAMPLING = re.compile(r"\s*(all|first:(\d+)|random:(\d+)|random:(\d+(?:\.\d*)?)\s*%)\s*")


@dataclass
class MixtureMember:
    """One entry of ``datasets:`` (see the module docstring)."""

    path: str
    sampling: str = "all"
    weight: float = 1.0
    image_root: str = ""
    id_prefix: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        parse_sampling(self.sampling)
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(
                f"mixture member {self.path!r}: weight must be a number > 0, got {self.weight!r}"
            )


def parse_sampling(spec: str) -> tuple[str, float]:
    """``"all" -> ("all", 0)``, ``"first:N" -> ("first", N)``, ``"random:N" -> ("random", N)``,
    ``"random:P%" -> ("percent", P)``; ``ValueError`` otherwise."""
    m = _SAMPLING.fullmatch(str(spec))
    if m is None:
        raise ValueError(f"sampling must be all, first:N, random:N or random:P%, got {spec!r}")
    if m.group(2) is not None:
        return "first", int(m.group(2))
    if m.group(3) is not None:
        return "random", int(m.group(3))
    if m.group(4) is not None:
        p = float(m.group(4))
        if not 0 < p <= 100:
            raise ValueError(f"sampling percentage must be in (0, 100], got {spec!r}")
        return "percent", p
    return "all", 0


def select_indices(n: int, spec: str, rng: np.random.Generator) -> np.ndarray:
    """The record indices of a source of ``n`` records chosen by sampling ``spec``, in file order."""
    kind, value = parse_sampling(spec)
    if kind == "all":
        return np.arange(n, dtype=np.int64)
    if kind == "first":
        return np.arange(min(n, int(value)), dtype=np.int64)
    k = min(n, int(value)) if kind == "random" else min(n, round(value / 100 * n))
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def weighted(selected: np.ndarray, weight: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, copy numbers)`` of ``selected`` repeated ``floor(weight)`` times plus a seeded
    subset of ``round(frac(weight) · len)`` of them (copy number ``floor(weight)``)."""
    whole = math.floor(weight)
    frac = round((weight - whole) * len(selected))
    idx = [selected] * whole
    copies = [np.full(len(selected), k, dtype=np.int64) for k in range(whole)]
    if frac:
        idx.append(np.sort(rng.choice(selected, size=frac, replace=False)))
        copies.append(np.full(frac, whole, dtype=np.int64))
    if not idx:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(idx).astype(np.int64), np.concatenate(copies)


class MixtureSource:
    """Map-style mixture of map-style sources (docs/method.md §4); ``source[i] -> Record`` with a stable id.

    ``members``: the entries; ``sources``: already opened sources in the same order (optional).
    ``member[i]`` / ``record_index[i]`` / ``copy[i]``: where entry ``i`` comes from.
    """

    def __init__(
        self,
        members: list[MixtureMember],
        *,
        seed: int = 0,
        base_dir: str | os.PathLike = "",
        sources: list[Any] | None = None,
        path: str = "",
    ) -> None:
        if not members:
            raise ValueError("a mixture needs at least one member in 'datasets'")
        self.members, self.seed, self.path = list(members), int(seed), path or "<mixture>"
        base = os.fspath(base_dir)
        if sources is None:
            sources = [
                _open_member(base, m, f"{self.path}: datasets[{k}].path") for k, m in enumerate(members)
            ]
        self.sources = sources
        member, index, copy = [], [], []
        for k, (m, src) in enumerate(zip(members, sources)):
            sel = select_indices(len(src), m.sampling, np.random.default_rng([self.seed, k]))
            idx, cp = weighted(sel, float(m.weight), np.random.default_rng([self.seed, k, 1]))
            if not len(idx):
                raise ValueError(_no_records(f"{self.path}: datasets[{k}]", m, len(src), len(sel)))
            member.append(np.full(len(idx), k, dtype=np.int32))
            index.append(idx)
            copy.append(cp)
        self.member = np.concatenate(member)
        self.record_index = np.concatenate(index)
        self.copy = np.concatenate(copy)

    def __len__(self) -> int:
        return len(self.member)

    def member_counts(self) -> list[int]:
        """Entries per member in one epoch of the mixture."""
        return np.bincount(self.member, minlength=len(self.members)).tolist()

    def _id(self, k: int, rid: str, copy: int) -> str:
        return f"{self.members[k].id_prefix}{rid}" + (f"#{copy}" if copy else "")

    def __getitem__(self, i: int) -> Record:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record index {i} out of range for {n} records in {self.path}")
        i %= n
        k, j, c = int(self.member[i]), int(self.record_index[i]), int(self.copy[i])
        try:
            rec = self.sources[k][j]
        except BadSample as e:
            raise BadSample(self._id(k, e.id, c), e.reason, e.detail) from None
        rec.id, rec.index = self._id(k, rec.id, c), i
        return rec

    def fingerprint(self) -> dict[str, Any]:
        """The members' fingerprints, their settings and the seed."""
        return {
            "seed": self.seed,
            "members": [{**asdict(m), "source": s.fingerprint()} for m, s in zip(self.members, self.sources)],
        }

    def __repr__(self) -> str:
        return f"MixtureSource({self.path!r}, members={len(self.members)}, records={len(self)})"


def _no_records(where: str, m: MixtureMember, n: int, selected: int, unit: str = "record") -> str:
    """Why member ``m`` (``n`` records or shards, ``selected`` of them sampled) gets none per epoch,
    and what it needs."""
    what = f"{where} ({m.path}, weight {m.weight:g}, sampling {m.sampling}) gets no {unit} per epoch"
    if n == 0:
        return f"{what}: it has none (an empty file, or only empty tar shards); fix or remove the member"
    if selected == 0:
        return f"{what}: its sampling selects none of its {n}; select ≥ 1 (N ≥ 1, or P ≥ {100 / n:.3g}%)"
    per = " (tar shards mix per shard; convert it to JSON to weight per record)" if unit == "shard" else ""
    return (
        f"{what}: round({m.weight:g} × {selected} {unit}(s)) = 0; it needs weight ≥ {1 / selected:.3g}{per}"
    )


def _short_names(paths: list[str]) -> list[str]:
    """Each path's shortest trailing part that no other file shares: its base name unless another
    directory has a file of that name (``a/000.tar``, ``b/000.tar``)."""
    parts = {p: p.split(os.sep) for p in paths}
    names: dict[str, str] = {}
    todo, n = set(parts), 1
    while todo:
        tail = {p: "/".join(parts[p][-n:]) for p in todo}
        count = Counter(tail.values())
        for p in list(todo):
            if count[tail[p]] == 1 or n >= len(parts[p]):
                names[p] = tail[p]
                todo.discard(p)
        n += 1
    return [names[p] for p in paths]


class MixtureShards(ShardList):
    """The shard list of an all-tar mixture (see the module docstring, docs/method.md §4): entry
    ``k`` gives its samples the id ``prefixes[k] + id``, plus ``"#c"`` for copy ``c = copies[k] > 0``.
    :meth:`~cmpt.data.webdataset.ShardList.decode` applies them."""

    def __init__(self, paths: list[str], prefixes: list[str], copies: list[int], path: str = "") -> None:
        super().__init__(paths)
        if not len(prefixes) == len(copies) == len(self.paths):
            raise ValueError(f"{len(self.paths)} shards need as many id prefixes and copy numbers")
        self.prefixes, self.copies = list(prefixes), [int(c) for c in copies]
        self.names = _short_names(self.paths)
        self.path = path or self.path

    def label(self, shard: int, rid: str) -> str:
        """The mixture's id for a sample of entry ``shard`` whose own id is ``rid``."""
        c = self.copies[shard]
        return f"{self.prefixes[shard]}{rid}" + (f"#{c}" if c else "")


class _MixtureIndex(TarIndexSource):
    """An all-tar mixture nested in a map-style one, read by offset, with the ids the stream gives."""

    shards: MixtureShards

    def _label(self, i: int, rid: str) -> str:
        return self.shards.label(self.shard_of(i % len(self)), rid)

    def __getitem__(self, i: int) -> Record:
        try:
            record = super().__getitem__(i)
        except BadSample as e:
            raise BadSample(self._label(i, e.id), e.reason, e.detail) from None
        record.id = self._label(i, record.id)
        return record

    def iter_records(self) -> Iterator[Record | BadSample]:
        for i in range(len(self)):
            try:
                yield self[i]
            except BadSample as e:
                yield e


_KEYS = {"path", "sampling", "weight", "image_root", "id_prefix", "split"}


def _resolve(base: str, p: str) -> str:
    if not p:
        return ""
    p = os.path.expandvars(os.path.expanduser(str(p)))
    return p if os.path.isabs(p) or not base else os.path.join(base, p)


def map_style(src: Any) -> Any:
    """``src`` with random access: tar shards as a ``TarIndexSource`` (an all-tar mixture's keeping
    its ids), any other source as it is."""
    if isinstance(src, MixtureShards):
        return _MixtureIndex(src)
    return TarIndexSource(src) if isinstance(src, ShardList) else src


def _open_member(base: str, m: MixtureMember, key: str) -> Any:
    """The member's source, map-style (:func:`map_style`); ``key`` (``MIXTURE: datasets[N].path``)
    names the member when its path does not exist."""
    root = _resolve(base, m.image_root) or None
    return map_style(open_source(_resolve(base, m.path), root, split=m.split or None, key=key))


def _tar_mixture(members: list[MixtureMember], seed: int, base: str, path: str) -> MixtureShards:
    """The shards of an all-tar mixture; a member without a sample, or given no shard by its weight,
    is an error naming ``datasets[N]``."""
    paths: list[str] = []
    prefixes: list[str] = []
    for k, m in enumerate(members):
        if m.split:
            raise ValueError(f"mixture member {m.path!r}: 'split' applies only to Hugging Face datasets")
        if parse_sampling(m.sampling)[0] != "all":
            raise ValueError(
                f"mixture member {m.path!r}: tar shards support only 'sampling: all' (use the weight, "
                "applied per shard, or convert the member to JSON / a Hugging Face dataset)"
            )
        shards = np.asarray(expand_shards(_resolve(base, m.path)), dtype=object)
        if not any(sum(1 for _ in iter_tar(s, read_data=False, limit=1)) for s in shards):
            raise ValueError(_no_records(f"{path}: datasets[{k}]", m, 0, 0, "sample"))
        idx, _ = weighted(np.arange(len(shards)), float(m.weight), np.random.default_rng([seed, k, 1]))
        if not len(idx):
            raise ValueError(_no_records(f"{path}: datasets[{k}]", m, len(shards), len(shards), "shard"))
        paths += shards[idx].tolist()
        prefixes += [m.id_prefix] * len(idx)
    seen: Counter[tuple[str, str]] = Counter()
    copies = []
    for entry in zip(prefixes, paths):  # copy number: earlier listings of the shard with this prefix
        copies.append(seen[entry])
        seen[entry] += 1
    return MixtureShards(paths, prefixes, copies, path)


def _yaml_error(path: str, e: yaml.YAMLError) -> ValueError:
    """One line naming the file and, where the parser knows it, the line and column."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        what = f"{e.problem} at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}"
    else:
        what = " ".join(str(e).split())
    return ValueError(f"{path}: not valid YAML ({what}); fix the mixture file (its format: docs/data.md)")


def load_mixture(path: str | os.PathLike) -> Any:
    """Open a mixture YAML: a :class:`MixtureSource`, or a ``ShardList`` when every member is tar
    shards. Invalid YAML, a bad entry (``sampling``, ``weight``) or a member path that does not
    exist is one ``ValueError`` / ``FileNotFoundError`` naming the file and ``datasets[N]``."""
    p = os.fspath(path)
    with open(p, encoding="utf-8") as fh:
        try:
            doc = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            raise _yaml_error(p, e) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), list):
        raise ValueError(f"{p}: a mixture YAML needs a 'datasets:' list (and optionally 'seed:')")
    unknown = set(doc) - {"datasets", "seed"}
    if unknown:
        raise ValueError(f"{p}: unknown top-level key(s) {sorted(unknown)}; expected 'datasets' and 'seed'")
    members = []
    for n, entry in enumerate(doc["datasets"]):
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"{p}: datasets[{n}] must be a mapping with a 'path'")
        bad = set(entry) - _KEYS
        if bad:
            raise ValueError(f"{p}: datasets[{n}] has unknown key(s) {sorted(bad)}; expected {sorted(_KEYS)}")
        try:
            members.append(MixtureMember(**{k: entry[k] for k in entry if entry[k] is not None}))
        except ValueError as e:  # sampling or weight
            raise ValueError(f"{p}: datasets[{n}]: {e}") from None
    try:
        seed = int(doc.get("seed") or 0)
    except (TypeError, ValueError):
        raise ValueError(f"{p}: seed must be an integer, got {doc['seed']!r}") from None
    if not members:
        raise ValueError(f"{p}: a mixture needs at least one member in 'datasets'")
    base = os.path.dirname(os.path.abspath(p))
    kinds = [source_kind(_resolve(base, m.path), f"{p}: datasets[{n}].path") for n, m in enumerate(members)]
    if all(k == "tar" for k in kinds):
        return _tar_mixture(members, seed, base, os.path.abspath(p))
    return MixtureSource(members, seed=seed, base_dir=base, path=os.path.abspath(p))
