"""Embedding-evaluation scorers: MMEB Precision@1 and ViDoRe nDCG@k (docs/method.md §3 "Evaluation", §5).

Pure functions over score vectors; every result is a fraction in ``[0, 1]``.

* :func:`precision_at_1`: MMEB. Each query has its *own* candidate list (lists may differ in
  length), the positive at index 0. The prediction is the argmax of the query's scores with ties
  going to the **lowest index**, so a positive tied with a negative counts as correct. Equal to
  :func:`cmpt.eval.metrics.precision_at_1` on rectangular inputs.
* :func:`ndcg_at_k`: nDCG@k with **linear gains** ``rel / log2(rank + 1)`` (rank 1-based), from
  relevances already in ranked order; the ideal DCG comes from ``ideal_relevances`` (the qrels of
  the query) when given, else from the ranked relevances themselves.
* :func:`ndcg_at_k_qrels`: nDCG@k from a ``(Q, C)`` score matrix and per-query qrels
  (``{candidate index: relevance}``). Candidates are ranked by score with a stable sort (ties: the
  lower candidate index first); the ideal DCG is computed from the query's qrels. As in mteb /
  ViDoRe (pytrec_eval), queries without any positive qrel are left out of the mean; a set where no
  query has one gives NaN.
* :data:`MMEB_DATASETS` and :func:`mmeb_group_means`: MMEB's 36 evaluation datasets (VLM2Vec,
  Jiang et al. 2024; HF ``TIGER-Lab/MMEB-eval`` subset names) with their meta-task category and
  split (20 IND, 16 OOD), and the unweighted means of per-dataset P@1 per category and per split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "MMEB_CATEGORIES",
    "MMEB_DATASETS",
    "MMEB_SPLITS",
    "dcg_at_k",
    "mmeb_group_means",
    "mmeb_predictions",
    "ndcg_at_k",
    "ndcg_at_k_qrels",
    "ndcg_per_query",
    "precision_at_1",
]

MMEB_CATEGORIES = ("Classification", "VQA", "Retrieval", "Grounding")
MMEB_SPLITS = ("IND", "OOD")
# MMEB-eval subset name (= the task's file stem, matched exactly) → (meta-task category, split)
MMEB_DATASETS: dict[str, tuple[str, str]] = {
    "ImageNet-1K": ("Classification", "IND"),
    "N24News": ("Classification", "IND"),
    "HatefulMemes": ("Classification", "IND"),
    "VOC2007": ("Classification", "IND"),
    "SUN397": ("Classification", "IND"),
    "Place365": ("Classification", "OOD"),
    "ImageNet-A": ("Classification", "OOD"),
    "ImageNet-R": ("Classification", "OOD"),
    "ObjectNet": ("Classification", "OOD"),
    "Country211": ("Classification", "OOD"),
    "OK-VQA": ("VQA", "IND"),
    "A-OKVQA": ("VQA", "IND"),
    "DocVQA": ("VQA", "IND"),
    "InfographicsVQA": ("VQA", "IND"),
    "ChartQA": ("VQA", "IND"),
    "Visual7W": ("VQA", "IND"),
    "ScienceQA": ("VQA", "OOD"),
    "VizWiz": ("VQA", "OOD"),
    "GQA": ("VQA", "OOD"),
    "TextVQA": ("VQA", "OOD"),
    "VisDial": ("Retrieval", "IND"),
    "CIRR": ("Retrieval", "IND"),
    "VisualNews_t2i": ("Retrieval", "IND"),
    "VisualNews_i2t": ("Retrieval", "IND"),
    "MSCOCO_t2i": ("Retrieval", "IND"),
    "MSCOCO_i2t": ("Retrieval", "IND"),
    "NIGHTS": ("Retrieval", "IND"),
    "WebQA": ("Retrieval", "IND"),
    "OVEN": ("Retrieval", "OOD"),
    "FashionIQ": ("Retrieval", "OOD"),
    "EDIS": ("Retrieval", "OOD"),
    "Wiki-SS-NQ": ("Retrieval", "OOD"),
    "MSCOCO": ("Grounding", "IND"),
    "RefCOCO": ("Grounding", "OOD"),
    "RefCOCO-Matching": ("Grounding", "OOD"),
    "Visual7W-Pointing": ("Grounding", "OOD"),
}


def _vector(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"expected one score vector per query, got shape {v.shape}")
    return v


def _rows(scores: Any) -> list[np.ndarray]:
    """One float64 vector per query from a ``(Q, C)`` array/tensor or a list of (ragged) vectors."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    if isinstance(scores, np.ndarray):
        if scores.ndim != 2:
            raise ValueError(f"scores must be (Q, C) or a list of vectors, got shape {scores.shape}")
        return list(scores.astype(np.float64))
    return [_vector(s) for s in scores]


def mmeb_predictions(scores: Any) -> np.ndarray:
    """Index of the predicted candidate of every query: argmax, ties to the lowest index (method.md §3)."""
    preds = []
    for i, s in enumerate(_rows(scores)):
        if s.size == 0:
            raise ValueError(f"query {i} has no candidates")
        if np.isnan(s).any():
            raise ValueError(f"query {i} has NaN scores")
        preds.append(int(np.argmax(s)))  # np.argmax returns the first maximum
    return np.asarray(preds, dtype=np.int64)


def precision_at_1(scores: Any) -> float:
    """MMEB Precision@1 (docs/method.md §3, §5): the fraction of queries whose prediction is candidate 0.

    ``scores``: ``(Q, C)`` or a list of Q score vectors over each query's own candidates (the
    positive first). An empty set scores 0.0.
    """
    preds = mmeb_predictions(scores)
    return float((preds == 0).mean()) if preds.size else 0.0


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def dcg_at_k(ranked_relevances: Sequence[float] | np.ndarray, k: int = 5) -> float:
    """``Σ_{rank ≤ k} rel_rank / log2(rank + 1)`` (linear gains, rank 1-based; method.md §5)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rel = _vector(ranked_relevances)[:k]
    return float((rel * _discounts(len(rel))).sum())


def _ndcg_one(ranked: np.ndarray, ideal: np.ndarray, k: int) -> float:
    idcg = dcg_at_k(np.sort(ideal)[::-1], k)
    return dcg_at_k(ranked, k) / idcg if idcg > 0 else 0.0


def ndcg_at_k(
    ranked_relevances: Sequence[Sequence[float]] | np.ndarray,
    k: int = 5,
    ideal_relevances: Sequence[Sequence[float]] | None = None,
) -> float:
    """Mean nDCG@k over queries from relevances in ranked order (docs/method.md §5).

    ``ranked_relevances[q][r]`` is the relevance of the document ranked ``r + 1`` for query ``q``.
    ``ideal_relevances[q]``: all relevances of the query's qrels (needed when the ranking is
    truncated or misses relevant documents); default: the ranked relevances themselves. A query
    whose ideal DCG is 0 scores 0 here (use :func:`ndcg_at_k_qrels` to leave such queries out).
    """
    rows = [_vector(r) for r in ranked_relevances]
    if ideal_relevances is not None and len(ideal_relevances) != len(rows):
        raise ValueError(f"{len(ideal_relevances)} ideal lists for {len(rows)} queries")
    if not rows:
        return 0.0
    ideals = rows if ideal_relevances is None else [_vector(r) for r in ideal_relevances]
    return float(np.mean([_ndcg_one(r, i, k) for r, i in zip(rows, ideals)]))


def ndcg_per_query(scores: Any, qrels: Sequence[Mapping[int, float]], k: int = 5) -> np.ndarray:
    """nDCG@k of every query of a ``(Q, C)`` score matrix; NaN for a query without a positive qrel.

    ``qrels[q]``: ``{candidate index: relevance}`` (missing candidates have relevance 0). Ranking:
    score descending, stable (ties: lower candidate index first); ideal DCG from ``qrels[q]``.
    """
    s = _rows(scores)
    if len(qrels) != len(s):
        raise ValueError(f"{len(qrels)} qrels entries for {len(s)} queries")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = np.full(len(s), np.nan)
    for q, (row, rel_map) in enumerate(zip(s, qrels)):
        gains = np.zeros(row.size)
        for c, r in rel_map.items():
            if not 0 <= int(c) < row.size:
                raise ValueError(f"query {q}: qrels name candidate {c} of {row.size}")
            gains[int(c)] = float(r)
        ideal = np.asarray([float(r) for r in rel_map.values()], dtype=np.float64)
        if not (ideal > 0).any():
            continue
        order = np.argsort(-row, kind="stable")[:k]
        out[q] = _ndcg_one(gains[order], ideal, k)
    return out


def ndcg_at_k_qrels(scores: Any, qrels: Sequence[Mapping[int, float]], k: int = 5) -> float:
    """Mean nDCG@k over the queries with at least one positive qrel (see :func:`ndcg_per_query`).

    NaN when no query has one.
    """
    per = ndcg_per_query(scores, qrels, k)
    valid = per[~np.isnan(per)]
    return float(valid.mean()) if valid.size else math.nan


def _group(scores: Mapping[str, float], field: int, value: str) -> dict[str, Any]:
    """Mean over the datasets whose (category, split)[field] is ``value`` and have a score."""
    names = [n for n, group in MMEB_DATASETS.items() if group[field] == value]
    present = [scores[n] for n in names if n in scores and not math.isnan(scores[n])]
    return {
        "mean_precision_at_1": sum(present) / len(present) if present else math.nan,
        "n_present": len(present),
        "n_datasets": len(names),
    }


def mmeb_group_means(scores: Mapping[str, float]) -> dict[str, Any]:
    """Unweighted means of MMEB P@1 per category and per split (docs/method.md §3 "Evaluation").

    ``scores``: P@1 per task, named by its MMEB-eval subset name (exact match with
    :data:`MMEB_DATASETS`; NaN: a task without a score, left out). Returns
    ``{"mmeb_category_means": {category: group}, "mmeb_split_means": {split: group},
    "mmeb_unknown_tasks": [names outside the 36 datasets]}`` where a group is
    ``{"mean_precision_at_1", "n_present", "n_datasets"}``: the mean over the ``n_present`` of its
    ``n_datasets`` datasets that have a score (NaN when none), comparable to the paper's only when
    the two are equal.
    """
    return {
        "mmeb_category_means": {c: _group(scores, 0, c) for c in MMEB_CATEGORIES},
        "mmeb_split_means": {s: _group(scores, 1, s) for s in MMEB_SPLITS},
        "mmeb_unknown_tasks": [n for n in scores if n not in MMEB_DATASETS],
    }
