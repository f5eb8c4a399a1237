"""Benchmark scorers, reproduced exactly (docs/method.md §5). Every score is a fraction in [0, 1].

Decisions on points the benchmark definitions leave open (each mirrors the reference scorer
unless stated otherwise):

* ``relaxed_accuracy`` (ChartQA, pix2struct ``relaxed_correctness``): no whitespace stripping;
  ``float()`` itself ignores surrounding whitespace, the string fallback compares
  ``pred.lower() == target.lower()`` verbatim. A zero (or unparsable) target always falls back to
  the string comparison, so ``"0.0"`` vs ``"0"`` is wrong.
* ``anls`` canonical (DocVQA): ``score = 1 − NL if NL < threshold else 0`` on normalized strings.
  ``variant="lmms-eval"`` mirrors lmms-eval's ``anls``: the distance is taken on the normalized
  strings but the denominator is ``max(len(gold.upper()), len(pred.upper()))`` of the *raw*
  strings, and the question score ``1 − min NL`` is zeroed only when it is ``< threshold``
  (so NL = 0.5 keeps 0.5). Both variants give NL = 0 when both strings are empty.
* ``vqa_accuracy`` (VQAv2): the official script normalizes only when the gold answers disagree
  and then normalizes the gold answers with punctuation handling only; here prediction and gold
  answers are *always* both fully normalized (punctuation, digits, articles, contractions),
  which is what every gold answer in VQAv2 already satisfies. A question with a single gold
  answer would always score 0 under leave-one-out, so it is scored by exact match instead.
* Retrieval ranks are *optimistic* under ties (a negative only outranks a positive when its
  score is strictly higher), consistent with MMEB Precision@1 where ties count as correct.
  Queries without any positive count as misses. ``ndcg_at_k`` orders by score with a stable
  sort (ties: lower candidate index first); queries with no relevant item contribute 0.
* ``miou``: classes absent from both prediction and label give NaN IoU and are excluded
  (nanmean); an image set with no valid pixel at all gives NaN.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "SegMeter",
    "anls",
    "anls_score",
    "confusion_matrix",
    "iou_per_class",
    "levenshtein",
    "miou",
    "ndcg_at_k",
    "normalize_vqa_answer",
    "precision_at_1",
    "recall_at_k",
    "relaxed_accuracy",
    "relaxed_accuracy_score",
    "vqa_accuracy",
    "vqa_accuracy_score",
]


def _to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if len(values) else 0.0


# ----------------------------------------------------------------------------- ChartQA
def _to_float(s: str) -> float | None:
    """``float(s)``, or ``float(s[:-1]) / 100`` when ``s`` ends with ``%``; None on failure."""
    try:
        if s.endswith("%"):
            return float(s[:-1]) / 100.0
        return float(s)
    except ValueError:
        return None


def relaxed_accuracy(pred: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed correctness: 5% relative tolerance for numbers, else case-insensitive match."""
    p, t = _to_float(pred), _to_float(target)
    if p is not None and t:  # t is neither None nor 0.0
        return abs(p - t) / abs(t) <= max_relative_change
    return pred.lower() == target.lower()


def relaxed_accuracy_score(preds: Sequence[str], targets: Sequence[str]) -> float:
    """Mean relaxed accuracy over questions."""
    _check_len(preds, targets)
    return _mean([float(relaxed_accuracy(p, t)) for p, t in zip(preds, targets)])


def _check_len(a: Sequence[Any], b: Sequence[Any]) -> None:
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} predictions but {len(b)} references")


# ----------------------------------------------------------------------------- DocVQA ANLS
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert / delete / substitute, unit costs), O(len(a)·len(b)) DP."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_normalize(s: str) -> str:
    return " ".join(s.strip().lower().split())


def anls(pred: str, answers: Sequence[str], variant: str = "canonical", threshold: float = 0.5) -> float:
    """ANLS of one prediction against its gold answers (max over answers); see module docstring."""
    if variant not in ("canonical", "lmms-eval"):
        raise ValueError(f"unknown ANLS variant {variant!r}; expected 'canonical' or 'lmms-eval'")
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        return 0.0
    p = _anls_normalize(pred)
    nls = []
    for gold in answers:
        g = _anls_normalize(gold)
        dist = levenshtein(p, g)
        if variant == "canonical":
            length = max(len(p), len(g))
        else:
            length = max(len(gold.upper()), len(pred.upper()))
        nls.append(0.0 if length == 0 else dist / length)
    nl = min(nls)
    if variant == "canonical":
        return 1.0 - nl if nl < threshold else 0.0
    score = 1.0 - nl
    return 0.0 if score < threshold else score


def anls_score(
    preds: Sequence[str],
    answers_list: Sequence[Sequence[str]],
    variant: str = "canonical",
    threshold: float = 0.5,
) -> float:
    """Mean ANLS over questions (0.0 for an empty set)."""
    _check_len(preds, answers_list)
    return _mean([anls(p, a, variant, threshold) for p, a in zip(preds, answers_list)])


# ----------------------------------------------------------------------------- VQAv2
_VQA_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_NUMBER_WORDS = {"none": "0", **{w: str(i) for i, w in enumerate(_DIGIT_WORDS)}}
_ARTICLES = frozenset({"a", "an", "the"})
# Spellings → canonical form: the official VQAv2 evaluation's table as it acts. It looks words up after
# lower-casing them, so its capitalised keys ("Im", "Ive", "Id've", ...) never match and are left out.
_CONTRACTIONS = {
    "'ow'sat": "'ow's'at", "'ows'at": "'ow's'at", "aint": "ain't", "arent": "aren't", "cant": "can't",
    "couldn'tve": "couldn't've", "couldnt": "couldn't", "couldnt've": "couldn't've", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadn'tve": "hadn't've", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "he'dve": "he'd've", "hed": "he'd",
    "hed've": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "isnt": "isn't", "it'dve": "it'd've", "itd": "it'd", "itd've": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightn'tve": "mightn't've", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "shant": "shan't", "she'dve": "she'd've", "she's": "she's",
    "shed've": "she'd've", "shouldn'tve": "shouldn't've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldve": "should've", "somebody'd": "somebodyd",
    "somebody'dve": "somebody'd've", "somebodyd've": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someone'dve": "someone'd've", "someoned": "someone'd",
    "someoned've": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "something'dve": "something'd've", "somethingd": "something'd", "somethingd've": "something'd've",
    "somethingll": "something'll", "thats": "that's", "there'dve": "there'd've", "thered": "there'd",
    "thered've": "there'd've", "therere": "there're", "theres": "there's", "they'dve": "they'd've",
    "theyd": "they'd", "theyd've": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "we'dve": "we'd've", "wed've": "we'd've",
    "werent": "weren't", "weve": "we've", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "who'dve": "who'd've", "whod": "who'd", "whod've": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldn'tve": "wouldn't've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldve": "would've",
    "y'all'dve": "y'all'd've", "y'alld've": "y'all'd've", "y'allll": "y'all'll", "yall": "y'all",
    "yall'd've": "y'all'd've", "yall'll": "y'all'll", "you'dve": "you'd've", "youd": "you'd",
    "youd've": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip


def _vqa_punctuation(text: str) -> str:
    # A punctuation mark next to a space (or any digit,digit comma in the answer) is deleted;
    # otherwise it becomes a space. Periods are removed unless followed by a digit (decimals).
    delete = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        out = out.replace(p, "" if delete or (p + " " in text or " " + p in text) else " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """VQAv2 answer normalization: whitespace, punctuation, number words, articles, contractions."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(answer))


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy: mean over leave-one-out subsets of ``min(1, #matches / 3)``."""
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        return 0.0
    p = normalize_vqa_answer(pred)
    golds = [normalize_vqa_answer(a) for a in answers]
    if len(golds) == 1:
        return float(p == golds[0])
    matches = sum(g == p for g in golds)
    # Leaving out answer i removes one match iff answer i itself matches.
    return _mean([min(1.0, (matches - (g == p)) / 3.0) for g in golds])


def vqa_accuracy_score(preds: Sequence[str], answers_list: Sequence[Sequence[str]]) -> float:
    """Mean VQA accuracy over questions."""
    _check_len(preds, answers_list)
    return _mean([vqa_accuracy(p, a) for p, a in zip(preds, answers_list)])


# ----------------------------------------------------------------------------- retrieval
def _positive_masks(positives: Any, num_queries: int, num_candidates: int) -> np.ndarray:
    """(Q, C) bool mask from an int array (Q,), a bool mask (Q, C) or a list of index sets."""
    if isinstance(positives, (torch.Tensor, np.ndarray)):
        arr = _to_numpy(positives)
        if arr.dtype == bool and arr.ndim == 2:
            mask = arr.copy()
        elif arr.ndim == 1:
            mask = np.zeros((num_queries, num_candidates), dtype=bool)
            mask[np.arange(len(arr)), arr.astype(np.int64)] = True
        else:
            raise ValueError(f"positives must be (Q,) indices or a (Q, C) bool mask, got shape {arr.shape}")
    else:
        mask = np.zeros((num_queries, num_candidates), dtype=bool)
        if len(positives) != num_queries:
            raise ValueError(f"got {len(positives)} positive entries for {num_queries} queries")
        for q, pos in enumerate(positives):
            idx = [pos] if isinstance(pos, (int, np.integer)) else list(pos)
            mask[q, idx] = True
    if mask.shape != (num_queries, num_candidates):
        raise ValueError(f"positives give shape {mask.shape}, expected {(num_queries, num_candidates)}")
    return mask


def recall_at_k(sim: Any, positives: Any, k: int) -> float:
    """Fraction of queries with a positive among the top-``k`` candidates (ties optimistic).

    ``sim`` is a (Q, C) similarity matrix; ``positives`` an int array (Q,) of the correct
    candidate, a list of sets of positive indices, or a (Q, C) bool mask.
    """
    s = _to_numpy(sim, np.float64)
    if s.ndim != 2:
        raise ValueError(f"sim must be (Q, C), got shape {s.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    mask = _positive_masks(positives, *s.shape)
    has_pos = mask.any(axis=1)
    best_pos = np.where(mask, s, -np.inf).max(axis=1)
    higher = (np.where(mask, -np.inf, s) > best_pos[:, None]).sum(axis=1)
    hits = has_pos & (higher < k)
    return float(hits.mean()) if len(hits) else 0.0


def precision_at_1(scores: Any) -> float:
    """MMEB Precision@1: the positive is candidate 0; correct iff its score ≥ every other score."""
    s = _to_numpy(scores, np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (Q, C), got shape {s.shape}")
    if s.shape[0] == 0:
        return 0.0
    if s.shape[1] == 1:
        return 1.0
    return float((s[:, 0] >= s[:, 1:].max(axis=1)).mean())


def ndcg_at_k(scores: Any, relevance: Any, k: int = 5) -> float:
    """Mean nDCG@k with linear gains (gain = rel, discount 1 / log2(rank + 1))."""
    s = _to_numpy(scores, np.float64)
    rel = _to_numpy(relevance, np.float64)
    if s.ndim != 2 or s.shape != rel.shape:
        raise ValueError(f"scores {s.shape} and relevance {rel.shape} must both be (Q, C)")
    if s.shape[0] == 0:
        return 0.0
    k = min(k, s.shape[1])
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    dcg = (np.take_along_axis(rel, order, axis=1) * discounts).sum(axis=1)
    ideal = -np.sort(-rel, axis=1)[:, :k]
    idcg = (ideal * discounts).sum(axis=1)
    ndcg = np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)
    return float(ndcg.mean())


# ----------------------------------------------------------------------------- segmentation
def confusion_matrix(pred: Any, label: Any, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(K, K) int64 confusion (rows = label, cols = prediction) over pixels with label ≠ ignore."""
    p = _to_numpy(pred).astype(np.int64).ravel()
    t = _to_numpy(label).astype(np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} pixels but label has {t.size}")
    valid = t != ignore_index
    p, t = p[valid], t[valid]
    for name, v in (("label", t), ("pred", p)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} values must lie in [0, {num_classes}) or equal {ignore_index}")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def _iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(axis=0) + conf.sum(axis=1) - tp
    iou = np.full(tp.shape, np.nan)
    np.divide(tp, denom, out=iou, where=denom > 0)
    return iou


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def iou_per_class(pred: Any, label: Any, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN); NaN for classes absent from prediction and label."""
    return _iou_from_confusion(confusion_matrix(pred, label, num_classes, ignore_index))


def miou(pred: Any, label: Any, num_classes: int, ignore_index: int = 255) -> float:
    """Mean IoU over classes present in prediction or label (nanmean)."""
    return _nanmean(iou_per_class(pred, label, num_classes, ignore_index))


class SegMeter:
    """Accumulates one confusion matrix over many images; mIoU over the whole set."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: Any, label: Any) -> None:
        """Add one image (or a batch of the same shape) of predicted and true class ids."""
        self.confusion += confusion_matrix(pred, label, self.num_classes, self.ignore_index)

    def iou_per_class(self) -> np.ndarray:
        """Per-class IoU of everything seen so far (NaN for absent classes)."""
        return _iou_from_confusion(self.confusion)

    def compute(self) -> float:
        """mIoU of everything seen so far."""
        return _nanmean(self.iou_per_class())

    def pixel_accuracy(self) -> float:
        """Fraction of valid pixels predicted correctly."""
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else float("nan")

    def reset(self) -> None:
        self.confusion[:] = 0
