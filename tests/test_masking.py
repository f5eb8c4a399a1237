"""MoCa's pure masking functions: MLM token masks, MAE window masks (docs/method.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

from cmpt.data.masking import apply_mlm, mlm_mask, window_mask
from cmpt.vlm.chat import IGNORE_INDEX


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _within(k: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("p", [0.15, 0.4, 0.8])
def test_mlm_rate_and_protected_tokens(p):
    ids = torch.randint(0, 50, (5000,), generator=_gen(0))
    protected = [0, 1, 2, 49]
    m = mlm_mask(ids, protected, p, _gen(1))
    assert m.dtype == torch.bool and m.shape == ids.shape
    assert not m[torch.isin(ids, torch.tensor(protected))].any()
    eligible = int((~torch.isin(ids, torch.tensor(protected))).sum())
    assert _within(int(m.sum()), eligible, p)


def test_mlm_edge_probabilities_and_determinism():
    ids = torch.arange(100) % 10
    assert not mlm_mask(ids, [3], 0.0, _gen(0)).any()
    assert torch.equal(mlm_mask(ids, [3], 1.0, _gen(0)), ids != 3)
    assert torch.equal(mlm_mask(ids, torch.tensor([]), 1.0, _gen(0)), torch.ones(100, dtype=torch.bool))
    a, b = mlm_mask(ids, [3], 0.4, _gen(7)), mlm_mask(ids, [3], 0.4, _gen(7))
    assert torch.equal(a, b) and not torch.equal(a, mlm_mask(ids, [3], 0.4, _gen(8)))
    # one draw per position whatever is protected: the unprotected positions keep their draws
    assert torch.equal(mlm_mask(ids, [3, 4], 0.4, _gen(7)), a & (ids != 4))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        mlm_mask(ids, [], 1.5)


def test_apply_mlm_labels_are_unshifted_originals():
    ids = torch.tensor([5, 6, 7, 8, 9])
    mask = torch.tensor([False, True, False, True, False])
    corrupted, labels = apply_mlm(ids, mask, 99)
    assert corrupted.tolist() == [5, 99, 7, 99, 9] and ids.tolist() == [5, 6, 7, 8, 9]  # input untouched
    assert labels.tolist() == [IGNORE_INDEX, 6, IGNORE_INDEX, 8, IGNORE_INDEX]
    with pytest.raises(ValueError, match="bool tensor"):
        apply_mlm(ids, mask.long(), 99)


def test_window_mask_rate_length_and_determinism():
    m = window_mask(5000, 0.5, _gen(3))
    assert m.dtype == torch.bool and m.shape == (5000,) and _within(int(m.sum()), 5000, 0.5)
    assert torch.equal(m, window_mask(5000, 0.5, _gen(3)))
    assert window_mask(0, 0.5).shape == (0,)
    assert window_mask(10, 1.0).all() and not window_mask(10, 0.0).any()
    with pytest.raises(ValueError):
        window_mask(-1, 0.5)
