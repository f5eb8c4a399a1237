"""Task-homogeneous global batches of pairs: one task per batch, rank split, weights, exact resume
(docs/method.md §3 "Stage 2", §4)."""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import numpy as np
import pytest

from cmpt.data.task_sampler import TaskBatchSampler

SIZES = {"caption2image": 41, "vqa": 27, "page": 18, "tiny": 3}  # "tiny" < one global batch of 6


def _tasks(seed: int = 0) -> list[str]:
    tasks = [t for t, n in SIZES.items() for _ in range(n)]
    np.random.default_rng(seed).shuffle(tasks)  # records of a task are not contiguous
    return tasks


def _global_stream(s: TaskBatchSampler, n: int, epoch: int = 0, pos: int = 0) -> list[tuple]:
    return [(e, k, t) for e, k, t, _, _ in itertools.islice(s.iter_from(epoch, pos), n)]


def test_every_global_batch_is_one_task_and_ranks_are_disjoint(caplog):
    tasks = _tasks()
    with caplog.at_level(logging.WARNING, logger="cmpt.data"):
        ranks = [TaskBatchSampler(tasks, 2, 3, seed=5, rank=r) for r in range(3)]
    assert "tiny" in caplog.text  # too small for one global batch: named, never sampled
    s = ranks[0]
    assert s.per_pass == {"caption2image": 6, "page": 3, "vqa": 4} and len(s) == 13
    streams = [list(itertools.islice(r.iter_from(0, 0), 3 * len(s))) for r in ranks]
    for items in zip(*streams):
        (e, k, task, _, _), slices = items[0], [x[3] for x in items]
        assert {x[2] for x in items} == {task} and len({(x[0], x[1]) for x in items}) == 1
        flat = [i for sl in slices for i in sl]
        assert all(len(sl) == 2 for sl in slices) and len(set(flat)) == 6  # disjoint rank slices
        assert {tasks[i] for i in flat} == {task}  # the whole global batch is of that task
        assert flat == s.global_batch(e, k)[1].tolist()  # rank r = slice [r·B, (r+1)·B)
    for epoch in range(3):  # default weights: one pass per task per epoch, no record twice
        order = s.epoch_order(epoch)
        assert Counter(order) == Counter(s.per_pass)
        seen = [i for k in range(len(s)) for i in s.global_batch(epoch, k)[1].tolist()]
        assert len(seen) == len(set(seen)) == 6 * 13
    assert s.epoch_order(0) != s.epoch_order(1)  # reshuffled per epoch, and so are the passes
    assert s._perm("vqa", 0).tolist() != s._perm("vqa", 1).tolist()


def test_the_stream_depends_on_the_global_batch_not_its_split():
    tasks = _tasks(1)
    a = TaskBatchSampler(tasks, 6, 1, seed=3)
    b = TaskBatchSampler(tasks, 3, 2, seed=3)
    c = TaskBatchSampler(tasks, 2, 3, seed=3)
    for e, k in itertools.product(range(2), range(len(a))):
        ta, ba = a.global_batch(e, k)
        assert (ta, ba.tolist()) == (b.global_batch(e, k)[0], b.global_batch(e, k)[1].tolist())
        assert ba.tolist() == c.global_batch(e, k)[1].tolist()
    assert _global_stream(a, 20) != _global_stream(TaskBatchSampler(tasks, 6, 1, seed=4), 20)


@pytest.mark.parametrize("weights", [None, {"caption2image": 1.0, "vqa": 3.0, "page": 0.5, "tiny": 1.0}])
def test_resume_continues_the_exact_sequence(weights):
    tasks = _tasks(2)
    ref = TaskBatchSampler(tasks, 2, 2, seed=9, weights=weights, rank=1)
    expected = list(itertools.islice(iter(ref), 40))  # over several epochs
    for stop in (0, 1, 7, len(ref), len(ref) + 3, 25):
        s = TaskBatchSampler(tasks, 2, 2, seed=9, weights=weights, rank=1)
        got = list(itertools.islice(iter(s), stop))
        state = s.state_dict()
        fresh = TaskBatchSampler(tasks, 2, 2, seed=9, weights=weights, rank=1)
        fresh.load_state_dict(state)
        assert got + list(itertools.islice(iter(fresh), 40 - stop)) == expected, stop
    # another rank split of the same global batch resumes from the same state
    other = TaskBatchSampler(tasks, 4, 1, seed=9, weights=weights)
    other.load_state_dict(state)
    assert (other.epoch, other.position) == (state["epoch"], state["position"])
    for bad in ({"seed": 1}, {"global_batch_size": 8}, {"num_records": 3}):
        with pytest.raises(ValueError, match="different stream"):
            TaskBatchSampler(tasks, 2, 2, seed=9, weights=weights).load_state_dict({**state, **bad})


def test_weights_are_respected_in_expectation():
    tasks = [t for t, n in (("a", 400), ("b", 400), ("c", 100)) for _ in range(n)]
    w = {"a": 6.0, "b": 3.0, "c": 1.0}
    s = TaskBatchSampler(tasks, 4, 2, seed=0, weights=w)  # 50 + 50 + 12 batches per pass
    n = len(s)
    assert n == 112 and s.per_epoch == {"a": 67, "b": 34, "c": 11}  # largest remainder of 112·w/Σw
    counts = Counter(t for e in range(20) for t in s.epoch_order(e))
    for t in w:
        assert counts[t] / (20 * n) == pytest.approx(w[t] / 10, abs=0.01)
    # the share holds in windows too (orders are random permutations of the epoch's multiset)
    first = Counter(s.epoch_order(e)[k] for e in range(200) for k in range(10))
    assert first["a"] / 2000 == pytest.approx(0.6, abs=0.03)
    # a task drawn more often than its pass repeats it, reshuffled; none repeats within a pass
    a_batches = [s.global_batch(0, k)[1].tolist() for k, t in enumerate(s.epoch_order(0)) if t == "a"]
    first_pass = [i for b in a_batches[:50] for i in b]
    assert len(first_pass) == len(set(first_pass)) == 400
    assert a_batches[50] != a_batches[0]
    # default weights: proportional to the number of batches
    d = TaskBatchSampler(tasks, 4, 2, seed=0)
    assert d.per_epoch == d.per_pass == {"a": 50, "b": 50, "c": 12}
    with pytest.raises(ValueError, match="missing task"):
        TaskBatchSampler(tasks, 4, 2, weights={"a": 1.0})
    with pytest.raises(ValueError, match="unknown task"):
        TaskBatchSampler(tasks, 4, 2, weights={**w, "zzz": 1.0})


def test_drop_last_false_completes_the_last_batch_and_spares_are_outside():
    tasks = ["x"] * 10 + ["y"] * 4
    s = TaskBatchSampler(tasks, 2, 2, seed=1, drop_last=False)
    assert s.per_pass == {"x": 3, "y": 1}
    xs = [s.global_batch(0, k)[1].tolist() for k, t in enumerate(s.epoch_order(0)) if t == "x"]
    flat = [i for b in xs for i in b]
    assert all(len(b) == 4 for b in xs) and set(flat) == set(range(10)) and len(flat) == 12
    ranks = [TaskBatchSampler(tasks, 2, 2, seed=1, drop_last=False, rank=r) for r in range(2)]
    for k in range(len(s)):
        _, batch = s.global_batch(0, k)
        sp = [r.spares(0, k) for r in ranks]
        assert not set(sp[0]) & set(sp[1]) and not (set(sp[0]) | set(sp[1])) & set(batch.tolist())
        task = s.epoch_order(0)[k]
        assert {tasks[i] for i in sp[0] + sp[1]} <= {task}
    with pytest.raises(ValueError, match="no task has a full global batch"):
        TaskBatchSampler(["x"] * 3, 2, 2)


def test_weighted_passes_continue_across_epochs():
    """Weights 6:3:1 on 400/400/100 records: a task's batches continue its passes across epochs, so
    every complete pass (50 batches of "a", 12 of "c") holds each record at most once."""
    tasks = [t for t, n in (("a", 400), ("b", 400), ("c", 100)) for _ in range(n)]
    s = TaskBatchSampler(tasks, 4, 2, seed=0, weights={"a": 6.0, "b": 3.0, "c": 1.0})
    for task, per_pass in (("a", 50), ("c", 12)):
        order = [(e, k) for e in range(3) for k, t in enumerate(s.epoch_order(e)) if t == task]
        seq = [s.global_batch(e, k)[1].tolist() for e, k in order]
        assert len(seq) >= 2 * per_pass
        for r in range(len(seq) // per_pass):
            flat = [i for b in seq[r * per_pass : (r + 1) * per_pass] for i in b]
            assert len(flat) == len(set(flat)), (task, r)
