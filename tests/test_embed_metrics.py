"""MMEB Precision@1, its per-category / per-split means and nDCG@k (docs/method.md §3 "Evaluation",
§5) on hand-built lists, scores and rankings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmpt.eval import metrics
from cmpt.eval.embed_metrics import (
    MMEB_CATEGORIES,
    MMEB_DATASETS,
    MMEB_SPLITS,
    dcg_at_k,
    mmeb_group_means,
    mmeb_predictions,
    ndcg_at_k,
    ndcg_at_k_qrels,
    ndcg_per_query,
    precision_at_1,
)

# Each query has its own candidate list (ragged), the positive first.
LISTS = [
    [0.5, 0.2, 0.1],  # positive strictly best → 0
    [0.3, 0.3],  # tie positive/negative → lowest index → correct
    [0.1, 0.4, 0.4],  # tie between two negatives → index 1 → wrong
    [0.2],  # a single candidate → correct
    [0.2, 0.9, 0.1, 0.0],  # negative best → wrong
]


def test_precision_at_1_candidate_lists_with_ties() -> None:
    assert mmeb_predictions(LISTS).tolist() == [0, 0, 1, 0, 1]
    assert precision_at_1(LISTS) == pytest.approx(3 / 5)
    assert precision_at_1([torch.tensor(s) for s in LISTS]) == pytest.approx(0.6)
    assert precision_at_1([]) == 0.0


def test_precision_at_1_rectangular_matches_metrics_module() -> None:
    s = np.array([[1.0, 1.0, 0.0], [0.2, 0.7, 0.7], [0.9, -1.0, 0.8], [0.0, 0.0, 0.0]])
    assert precision_at_1(s) == 0.75  # rows 0 and 3 are ties won by the positive
    assert precision_at_1(s) == metrics.precision_at_1(s)
    assert precision_at_1(torch.tensor(s, dtype=torch.bfloat16)) == 0.75


def test_precision_at_1_rejects_empty_lists_and_nan() -> None:
    with pytest.raises(ValueError, match="query 1 has no candidates"):
        precision_at_1([[1.0], []])
    with pytest.raises(ValueError, match="NaN"):
        precision_at_1([[float("nan"), 0.0]])


def test_dcg_linear_gains() -> None:
    # ranks 1..3: 2/log2(2) + 0/log2(3) + 3/log2(4) = 2 + 0 + 1.5
    assert dcg_at_k([2, 0, 3], k=5) == pytest.approx(3.5)
    assert dcg_at_k([2, 0, 3], k=1) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="k must be"):
        dcg_at_k([1], k=0)


def test_ndcg_from_ranked_relevances() -> None:
    # DCG = 1/log2(3) + 1/log2(4) = 1.1309297536; IDCG = 1 + 1/log2(3) = 1.6309297536
    assert ndcg_at_k([[0, 1, 1, 0, 0]], k=5) == pytest.approx(0.6934264036)
    # graded: DCG = 3.5; IDCG from [3, 2, 0] = 3 + 2/log2(3) = 4.2618595071
    assert ndcg_at_k([[2, 0, 3]], k=5) == pytest.approx(0.8212377705)
    # the relevant document ranked 6th is cut at k = 5
    assert ndcg_at_k([[0, 0, 0, 0, 0, 1]], k=5) == 0.0
    # ideal from the qrels: three relevant documents, only one retrieved (at rank 1)
    # DCG = 1; IDCG = 1 + 1/log2(3) + 1/log2(4) = 2.1309297536
    assert ndcg_at_k([[1, 0]], k=5, ideal_relevances=[[1, 1, 1]]) == pytest.approx(0.4692787260)
    # mean over queries; a perfect ranking scores 1
    assert ndcg_at_k([[1, 0], [0, 0, 0, 0, 0, 1]], k=5) == pytest.approx(0.5)


def test_ndcg_from_scores_and_qrels() -> None:
    scores = np.array(
        [
            [0.1, 0.9, 0.5, 0.5],  # ranking 1, 2, 3, 0 (tie 2/3 → lower index first)
            [0.4, 0.3, 0.2, 0.1],  # no qrels → left out
            [0.4, 0.3, 0.2, 0.1],  # only a zero-relevance qrel → left out
            [0.0, 0.0, 1.0, 0.0],  # relevant candidate 2 ranked first → 1
        ]
    )
    qrels = [{2: 1, 3: 2}, {}, {0: 0}, {2: 1}]
    # query 0 at k=2: top-2 = [1, 2] → gains [0, 1]: DCG = 1/log2(3) = 0.6309297536
    # IDCG from {2, 1} = 2 + 1/log2(3) = 2.6309297536 → 0.2398124666
    per = ndcg_per_query(scores, qrels, k=2)
    assert per[0] == pytest.approx(0.2398124666)
    assert math.isnan(per[1]) and math.isnan(per[2]) and per[3] == 1.0
    assert ndcg_at_k_qrels(scores, qrels, k=2) == pytest.approx((0.2398124666 + 1.0) / 2)
    # k = 5 covers all four: ranking 1, 2, 3, 0 → gains [0, 1, 2, 0]
    # DCG = 1/log2(3) + 2/log2(4) = 1.6309297536; IDCG = 2.6309297536 → 0.6199...
    assert ndcg_per_query(scores, qrels, k=5)[0] == pytest.approx(1.6309297536 / 2.6309297536)
    assert math.isnan(ndcg_at_k_qrels(scores[1:3], qrels[1:3]))


def test_ndcg_qrels_agrees_with_dense_metric() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 9))
    rel = (rng.random((6, 9)) < 0.3) * rng.integers(1, 3, size=(6, 9))
    rel[:, 0] = np.maximum(rel[:, 0], 1)  # every query has a positive
    qrels = [{c: int(r) for c, r in enumerate(row) if r} for row in rel]
    assert ndcg_at_k_qrels(scores, qrels, k=5) == pytest.approx(metrics.ndcg_at_k(scores, rel, k=5))


def test_ndcg_qrels_errors() -> None:
    with pytest.raises(ValueError, match="candidate 4 of 2"):
        ndcg_per_query(np.zeros((1, 2)), [{4: 1}])
    with pytest.raises(ValueError, match="2 qrels entries for 1 queries"):
        ndcg_per_query(np.zeros((1, 2)), [{0: 1}, {}])


def test_mmeb_datasets_table() -> None:
    assert len(MMEB_DATASETS) == 36
    cells = list(MMEB_DATASETS.values())
    assert {c for c, _ in cells} == set(MMEB_CATEGORIES) and {s for _, s in cells} == set(MMEB_SPLITS)
    assert [sum(s == split for _, s in cells) for split in MMEB_SPLITS] == [20, 16]
    assert [sum(c == cat for c, _ in cells) for cat in MMEB_CATEGORIES] == [10, 10, 12, 4]
    # IND per category: 5 classification, 6 VQA, 8 retrieval, 1 grounding (MSCOCO)
    assert [sum(cell == (cat, "IND") for cell in cells) for cat in MMEB_CATEGORIES] == [5, 6, 8, 1]
    assert MMEB_DATASETS["MSCOCO"] == ("Grounding", "IND")
    assert MMEB_DATASETS["MSCOCO_t2i"] == ("Retrieval", "IND")
    assert MMEB_DATASETS["Visual7W-Pointing"] == ("Grounding", "OOD")
    assert MMEB_DATASETS["Visual7W"] == ("VQA", "IND")


def test_mmeb_group_means_over_the_datasets_present() -> None:
    scores = {
        "ImageNet-1K": 1.0,  # Classification, IND
        "Place365": 0.5,  # Classification, OOD
        "OK-VQA": 0.25,  # VQA, IND
        "GQA": 0.0,  # VQA, OOD
        "VizWiz": math.nan,  # VQA, OOD, no score → left out
        "imagenet-1k": 0.0,  # not a subset name (matched exactly) → unknown
    }
    res = mmeb_group_means(scores)
    cat, split = res["mmeb_category_means"], res["mmeb_split_means"]
    assert list(cat) == ["Classification", "VQA", "Retrieval", "Grounding"]
    assert cat["Classification"] == {"mean_precision_at_1": 0.75, "n_present": 2, "n_datasets": 10}
    assert cat["VQA"] == {"mean_precision_at_1": 0.125, "n_present": 2, "n_datasets": 10}
    for name, total in (("Retrieval", 12), ("Grounding", 4)):
        assert math.isnan(cat[name]["mean_precision_at_1"])
        assert (cat[name]["n_present"], cat[name]["n_datasets"]) == (0, total)
    assert list(split) == ["IND", "OOD"]
    assert split["IND"] == {"mean_precision_at_1": 0.625, "n_present": 2, "n_datasets": 20}
    assert split["OOD"] == {"mean_precision_at_1": 0.25, "n_present": 2, "n_datasets": 16}
    assert res["mmeb_unknown_tasks"] == ["imagenet-1k"]
    empty = mmeb_group_means({})
    assert empty["mmeb_unknown_tasks"] == [] and math.isnan(
        empty["mmeb_split_means"]["IND"]["mean_precision_at_1"]
    )
