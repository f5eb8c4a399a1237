"""Token-budget batching: budgets, coverage, determinism, resume, rank split (docs/method.md §4)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cmpt.data.batching import BatchLoader, TokenBudgetBatcher, worker_loader


def _lengths(n: int = 300, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    vision = rng.integers(0, 400, n) * (rng.random(n) < 0.8)  # 20% text-only
    text = rng.integers(20, 900, n)
    out = list(zip(vision.tolist(), text.tolist()))
    out[3], out[7], out[11] = (5000, 100), (10, 9000), (0, 0)  # two oversize samples, one empty
    return out


def _batcher(**kw) -> TokenBudgetBatcher:
    args = dict(lengths=_lengths(), vision_budget=1024, text_budget=2048, max_samples=8, seed=1)
    args.update(kw)
    return TokenBudgetBatcher(**args)


@pytest.mark.parametrize("oversize", ["skip", "truncate"])
def test_budgets_and_coverage(oversize):
    b = _batcher(oversize=oversize)
    lengths = _lengths()
    for epoch in range(3):
        batches = b.epoch_batches(epoch)
        for mb in batches:
            v = sum(lengths[i][0] for i in mb)
            t = sum(lengths[i][1] for i in mb)
            assert len(mb) <= 8
            if v > 1024 or t > 2048:  # only an oversize sample alone, in truncate mode
                assert oversize == "truncate" and len(mb) == 1 and mb[0] in (3, 7)
        seen = sorted(itertools.chain.from_iterable(batches))
        if oversize == "skip":
            assert b.oversize_skipped == 2 and b.oversize_indices == [3, 7]
            assert seen == [i for i in range(300) if i not in (3, 7)]
        else:
            assert b.oversize_skipped == 0 and seen == list(range(300))


def test_greedy_fill_closes_only_when_the_next_sample_does_not_fit():
    lengths = _lengths()
    b = _batcher()
    batches = b.epoch_batches(0)
    for mb, nxt in itertools.pairwise(batches):
        v = sum(lengths[i][0] for i in mb) + lengths[nxt[0]][0]
        t = sum(lengths[i][1] for i in mb) + lengths[nxt[0]][1]
        assert v > 1024 or t > 2048 or len(mb) == 8


def test_deterministic_by_seed_and_epochs_differ():
    a, b = _batcher(), _batcher()
    assert a.epoch_batches(0) == b.epoch_batches(0) and a.epoch_batches(5) == b.epoch_batches(5)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert _batcher(seed=2).epoch_batches(0) != a.epoch_batches(0)
    plain = _batcher(shuffle=False).epoch_batches(0)
    assert list(itertools.chain.from_iterable(plain)) == [i for i in range(300) if i not in (3, 7)]
    assert plain == _batcher(shuffle=False).epoch_batches(1)


def test_resume_from_state_dict_mid_epoch():
    a = _batcher()
    it = iter(a)
    n0 = len(a.epoch_batches(0))
    head = [next(it) for _ in range(n0 - 3)]
    state = a.state_dict()
    assert state["epoch"] == 0 and state["position"] == n0 - 3
    tail = [next(it) for _ in range(10)]  # crosses into epoch 1
    assert a.state_dict()["epoch"] == 1
    b = _batcher()
    b.load_state_dict(state)
    assert [mb for mb, _ in zip(b, range(10))] == tail
    assert head[0] == a.epoch_batches(0)[0]
    with pytest.raises(ValueError, match="seed"):
        _batcher(seed=9).load_state_dict(state)


def test_rank_split_is_one_global_stream():
    """Rank r takes the r-th of each group of W consecutive micro-batches of the global stream (epochs
    concatenated): 1 rank × accumulation W sees exactly the W ranks' micro-batches, across epochs."""
    b = _batcher()
    per_epoch = len(b.epoch_batches(0))
    n = per_epoch + 3  # cross an epoch boundary
    for world in (2, 3):
        single = [mb for _, _, mb in itertools.islice(b.global_stream(0, 0), world * n)]
        ranks = [
            [mb for _, _, mb, _ in itertools.islice(b.iter_rank(r, world, 0, 0), n)] for r in range(world)
        ]
        assert [mb for group in zip(*ranks) for mb in group] == single
        ids = [{i for mb in r[: per_epoch // world] for i in mb} for r in ranks]
        assert not set.intersection(*ids)


def test_rank_iteration_positions_and_empty_epoch():
    b = _batcher()
    got = list(itertools.islice(b.iter_rank(1, 2, epoch=0, start=2), 3))
    assert [(e, k, nxt) for e, k, _, nxt in got] == [(0, 3, (0, 4)), (0, 5, (0, 6)), (0, 7, (0, 8))]
    assert got[0][2] == b.epoch_batches(0)[3]
    oversize = TokenBudgetBatcher([(100, 1)] * 3, 10, 10, 4)
    with pytest.raises(ValueError, match="no micro-batch"):
        next(oversize.iter_rank(0, 2, 0, 0))
    with pytest.raises(ValueError):
        TokenBudgetBatcher([(1, 1)], 0, 10, 4)


def test_worker_batches_are_pinned_when_cuda_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers' batches go to page-locked memory when CUDA is available (the trainer's non-blocking
    copy then does not wait for the GPU), not on a CPU-only machine; an explicit choice wins."""
    import torch

    data = [{"x": torch.zeros(2)}]
    assert not worker_loader(data, 1, seed=0).pin_memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert worker_loader(data, 1, seed=0).pin_memory
    assert not worker_loader(data, 1, seed=0, pin_memory=False).pin_memory


def test_a_micro_batch_may_fill_its_budget_exactly():
    """Two samples of 5 vision tokens fill a budget of 10 exactly; the third starts a new batch."""
    b = TokenBudgetBatcher([(5, 1), (5, 1), (5, 1)], 10, 100, 8, shuffle=False)
    assert b.epoch_batches(0) == [[0, 1], [2]]


def test_batch_loader_refuses_the_state_of_another_seed():
    lengths = [(1, 1)] * 10
    a = BatchLoader(None, None, TokenBudgetBatcher(lengths, 4, 4, 2, seed=1))
    b = BatchLoader(None, None, TokenBudgetBatcher(lengths, 4, 4, 2, seed=2))
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(a.state_dict())
