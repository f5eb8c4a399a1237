"""Hand-worked cases for the benchmark scorers in cmpt.eval.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmpt.eval.metrics import (
    SegMeter,
    anls,
    anls_score,
    iou_per_class,
    levenshtein,
    miou,
    ndcg_at_k,
    normalize_vqa_answer,
    precision_at_1,
    recall_at_k,
    relaxed_accuracy,
    relaxed_accuracy_score,
    vqa_accuracy,
    vqa_accuracy_score,
)


# ----------------------------------------------------------------------------- ChartQA
@pytest.mark.parametrize(
    ("pred", "target", "expected"),
    [
        ("0.12", "12%", True),  # target 12% → 0.12
        ("12%", "0.12", True),
        ("12", "12%", False),  # 12 vs 0.12
        ("104", "100", True),  # 4% off
        ("105", "100", True),  # exactly 5% is inside
        ("106", "100", False),
        ("-95", "-100", True),  # |t| in the denominator
        ("0.0", "0", False),  # zero target → string match
        ("0", "0", True),
        ("Yes", "yes", True),
        ("yes ", "yes", False),  # no stripping in the string fallback
        (" 42", "42", True),  # float() tolerates surrounding whitespace
        ("1,000", "1000", False),  # no comma handling
        ("1000", "1,000", False),
        ("5 kg", "5", False),  # no unit handling
        ("abc", "12", False),
    ],
)
def test_relaxed_accuracy(pred: str, target: str, expected: bool) -> None:
    assert relaxed_accuracy(pred, target) is expected


def test_relaxed_accuracy_score_mean() -> None:
    assert relaxed_accuracy_score(["1", "x", "Yes", "3"], ["1", "y", "yes", "4"]) == 0.5
    with pytest.raises(ValueError):
        relaxed_accuracy_score(["1"], [])


# ----------------------------------------------------------------------------- ANLS
def test_levenshtein() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0


def test_anls_canonical_basic() -> None:
    assert anls("Hello  World ", ["hello world"]) == 1.0
    # "abcd" vs "abce": NL = 1/4 → 0.75
    assert anls("abcd", ["abce"]) == pytest.approx(0.75)
    # max over gold answers
    assert anls("abcd", ["zzzz", "abce", "abcd"]) == 1.0
    assert anls("abcd", ["zzzz", "abce"]) == pytest.approx(0.75)
    assert anls("", [""]) == 1.0  # both empty → NL 0
    assert anls("abc", []) == 0.0


def test_anls_boundary_both_variants() -> None:
    # "ab" vs "ac": distance 1, length 2 → NL exactly 0.5
    assert anls("ab", ["ac"]) == 0.0
    assert anls("ab", ["ac"], variant="lmms-eval") == 0.5
    # just past the boundary in both variants: "abc" vs "axy", NL = 2/3
    assert anls("abc", ["axy"]) == 0.0
    assert anls("abc", ["axy"], variant="lmms-eval") == 0.0
    # just inside: NL = 1/3
    assert anls("abc", ["abx"]) == pytest.approx(2 / 3)
    assert anls("abc", ["abx"], variant="lmms-eval") == pytest.approx(2 / 3)


def test_anls_lmms_raw_length_denominator() -> None:
    # normalized: "ab" vs "ac" (NL 0.5); raw pred "  AB  " has length 6 → NL = 1/6 in lmms-eval
    assert anls("  AB  ", ["ac"]) == 0.0
    assert anls("  AB  ", ["ac"], variant="lmms-eval") == pytest.approx(1 - 1 / 6)
    # extra internal whitespace in the gold shrinks nothing canonically but lengthens the raw string
    assert anls("new york", ["New   York"]) == 1.0
    assert anls("new yorx", ["New   York"], variant="lmms-eval") == pytest.approx(1 - 1 / 10)
    assert anls("new yorx", ["New   York"]) == pytest.approx(1 - 1 / 8)


def test_anls_score_and_bad_variant() -> None:
    assert anls_score(["abcd", "x"], [["abcd"], ["y"]]) == 0.5
    assert anls_score([], []) == 0.0
    with pytest.raises(ValueError):
        anls("a", ["a"], variant="nope")


# ----------------------------------------------------------------------------- VQA
@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("A  Dog", "dog"),
        ("3.5", "3.5"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("yes!", "yes"),
        ("black-and-white", "black and white"),
        ("black - white", "black white"),  # "- " present → the dash is deleted
        ("10,000", "10000"),  # digit,digit comma → delete all punctuation
        ("red,blue", "red blue"),
        ("none", "0"),
        ("\tcat\n", "cat"),
        # the official table acts after lower-casing: its capitalised keys never fire ...
        ("Im", "im"),
        ("ive", "ive"),
        ("shes", "shes"),
        # ... and its lower-case ones do, with apostrophes inside the word too
        ("hed've", "he'd've"),
        ("yall'll", "y'all'll"),
        ("somebodyd", "somebodyd"),
        ("someoned", "someone'd"),
    ],
)
def test_vqa_normalization(raw: str, norm: str) -> None:
    assert normalize_vqa_answer(raw) == norm


def test_vqa_contractions_act_as_lmms_evals_port_of_the_official_table() -> None:
    """Every word of lmms-eval's port of the official VQAv2 contraction table (keys, capitalised
    ones included, and values) normalises as its digit/article/contraction step does (its
    EvalAI-only tokenisation step, which splits "'s", is not part of the official evaluation)."""
    metric = pytest.importorskip("lmms_eval.tasks._task_utils.vqa_eval_metric")
    ref = metric.EvalAIAnswerProcessor()
    words = sorted({w for kv in ref.CONTRACTIONS.items() for w in kv})
    for w in words:
        assert normalize_vqa_answer(w) == ref.process_digit_article(ref.process_punctuation(w)), w


def test_vqa_accuracy_leave_one_out() -> None:
    other = ["cat"] * 10
    for m, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["2"] * m + other[m:]
        # leave-one-out by hand: m subsets miss one match, 10-m keep all m
        by_hand = (m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10 if m else 0.0
        assert vqa_accuracy("Two", answers) == pytest.approx(expected)
        assert by_hand == pytest.approx(expected)


def test_vqa_accuracy_normalizes_both_sides() -> None:
    assert vqa_accuracy("the dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("dog", ["The Dog"] * 10) == 1.0
    assert vqa_accuracy("dogs", ["dog"] * 10) == 0.0


def test_vqa_accuracy_few_answers() -> None:
    # 3 answers, 2 match: (2 × 1/3 + 1 × 2/3) / 3 = 4/9
    assert vqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9)
    assert vqa_accuracy("yes", ["yes"]) == 1.0  # single answer: exact match
    assert vqa_accuracy("no", ["yes"]) == 0.0
    assert vqa_accuracy("yes", []) == 0.0
    assert vqa_accuracy_score(["yes", "no"], [["yes"] * 10, ["yes"] * 10]) == 0.5


# ----------------------------------------------------------------------------- retrieval
def test_recall_at_k_indices_and_sets() -> None:
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.5]])
    pos = np.array([0, 1, 2])  # ranks 1, 2, 3
    assert recall_at_k(sim, pos, 1) == pytest.approx(1 / 3)
    assert recall_at_k(sim, pos, 2) == pytest.approx(2 / 3)
    assert recall_at_k(sim, pos, 3) == 1.0
    assert recall_at_k(torch.tensor(sim), torch.tensor(pos), 2) == pytest.approx(2 / 3)
    assert recall_at_k(sim, [0, 1, 2], 1) == pytest.approx(1 / 3)
    # sets: any positive in the top-k counts
    assert recall_at_k(sim, [{1}, {0, 2}, {1, 2}], 1) == pytest.approx(1 / 3)
    assert recall_at_k(sim, [{1}, {0, 2}, {1, 2}], 2) == pytest.approx(2 / 3)
    assert recall_at_k(sim, [{1}, set(), {1, 2}], 3) == pytest.approx(2 / 3)  # empty set = miss
    mask = np.zeros((3, 3), dtype=bool)
    mask[[0, 1, 2], [0, 1, 2]] = True
    assert recall_at_k(sim, mask, 2) == pytest.approx(2 / 3)


def test_recall_at_k_ties_are_optimistic() -> None:
    sim = np.array([[0.5, 0.5, 0.5, 0.1]])
    assert recall_at_k(sim, [2], 1) == 1.0
    sim = np.array([[0.6, 0.5, 0.5, 0.1]])
    assert recall_at_k(sim, [2], 1) == 0.0
    assert recall_at_k(sim, [2], 2) == 1.0


def test_precision_at_1() -> None:
    s = np.array([[0.9, 0.5, 0.1], [0.5, 0.5, 0.1], [0.4, 0.5, 0.1], [0.2, 0.1, 0.2]])
    assert precision_at_1(s) == 0.75  # rows 1 and 3 are ties → correct
    assert precision_at_1(torch.tensor(s, dtype=torch.bfloat16)) == 0.75
    assert precision_at_1(np.ones((2, 1))) == 1.0


def test_ndcg_at_k() -> None:
    # one relevant item (rel 1) ranked 2nd → 1/log2(3)
    scores = np.array([[0.9, 0.8, 0.1]])
    rel = np.array([[0, 1, 0]])
    assert ndcg_at_k(scores, rel, k=5) == pytest.approx(1 / math.log2(3))
    # graded: ranking rel [1, 2, 0] vs ideal [2, 1, 0]
    rel = np.array([[1, 2, 0]])
    dcg = 1 + 2 / math.log2(3)
    idcg = 2 + 1 / math.log2(3)
    assert ndcg_at_k(scores, rel, k=5) == pytest.approx(dcg / idcg)
    # cut at k=1: only the first item counts
    assert ndcg_at_k(scores, rel, k=1) == pytest.approx(1 / 2)
    # relevant item outside the top-k
    assert ndcg_at_k(np.array([[3.0, 2.0, 1.0]]), np.array([[0, 0, 1]]), k=2) == 0.0
    # a query with no relevant item contributes 0 to the mean
    scores2 = np.array([[0.9, 0.1], [0.9, 0.1]])
    rel2 = np.array([[1, 0], [0, 0]])
    assert ndcg_at_k(scores2, rel2) == 0.5
    # ties: stable order (lower index first)
    assert ndcg_at_k(np.array([[1.0, 1.0]]), np.array([[0, 1]]), k=1) == 0.0


# ----------------------------------------------------------------------------- segmentation
def test_miou_hand_example_with_ignore() -> None:
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    # class 0: TP 1, FP 1 (pred 0 on label 2), FN 1 (label 0 pred 1) → 1/3
    # class 1: TP 2, FP 1, FN 0 → 2/3 ; class 2: TP 1, FP 0, FN 1 → 1/2 (ignored pixels dropped)
    # class 3: absent from both → NaN, excluded
    iou = iou_per_class(pred, label, num_classes=4)
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(iou[3])
    assert miou(pred, label, 4) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert miou(torch.tensor(pred), torch.tensor(label), 4) == pytest.approx(0.5)


def test_miou_predicted_only_class_counts_as_zero() -> None:
    label = np.array([0, 0])
    pred = np.array([0, 1])
    np.testing.assert_allclose(iou_per_class(pred, label, 2), [0.5, 0.0])


def test_seg_meter_accumulates_confusion() -> None:
    meter = SegMeter(num_classes=2)
    meter.update(np.array([[0, 1]]), np.array([[0, 0]]))
    meter.update(torch.tensor([1, 1, 0]), torch.tensor([1, 255, 1]))
    # totals: label0 → pred0 ×1, pred1 ×1; label1 → pred1 ×1, pred0 ×1
    np.testing.assert_array_equal(meter.confusion, [[1, 1], [1, 1]])
    assert meter.compute() == pytest.approx(1 / 3)
    assert meter.pixel_accuracy() == 0.5
    meter.reset()
    assert math.isnan(meter.compute())


def test_miou_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        miou(np.array([0, 1]), np.array([0]), 2)
    with pytest.raises(ValueError):
        miou(np.array([0, 1]), np.array([0, 5]), 2)


def test_anls_and_relaxed_accuracy_equal_lmms_evals_where_installed() -> None:
    """cmpt's ``anls(variant="lmms-eval")`` and ChartQA relaxed accuracy give lmms-eval's numbers
    on random predictions and answers (case, spaces, numbers, percentages, empty strings)."""
    metrics = pytest.importorskip("lmms_eval.api.metrics")
    chartqa = pytest.importorskip("lmms_eval.tasks.chartqa.utils")
    rng = np.random.default_rng(0)
    words = ["Total", "total ", " 12", "12.5", "13", "50%", "0.5", "0", "", "a  b", "A B", "-3", "1e3", "x"]

    def text() -> str:
        return " ".join(rng.choice(words, size=int(rng.integers(1, 3))))

    for _ in range(2000):
        pred, golds = text(), [text() for _ in range(int(rng.integers(1, 4)))]
        want = metrics.anls(golds, [pred])["anls"]
        assert anls(pred, golds, "lmms-eval") == pytest.approx(want), (pred, golds)
        gold = golds[0]
        assert relaxed_accuracy(pred, gold) == chartqa.relaxed_correctness(pred, gold), (pred, gold)


def test_ndcg_breaks_ties_by_candidate_order():
    """Four candidates tie at the top score: the stable order is 1, 3, 6, 7, then 2 (score 1) at
    rank 5 holds the relevant one: nDCG@5 = 1 / log2(6)."""
    scores = np.array([[0.0, 2, 1, 2, 1, 1, 2, 2]])
    rel = np.zeros((1, 8))
    rel[0, 2] = 1
    assert ndcg_at_k(scores, rel, k=5) == pytest.approx(1 / math.log2(6))
