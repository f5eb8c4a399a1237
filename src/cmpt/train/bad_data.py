"""One bad-sample policy per run, decided on counts summed over all ranks (docs/method.md §4).

Loaders skip bad samples and report them with the micro-batches they yield: ``num_bad`` skipped
samples next to ``num_samples`` usable ones. A stretch of a rank's data with no usable sample
arrives as an *empty* micro-batch (``num_samples == 0``, only ``num_bad``), so that rank keeps
reaching the collectives however broken its share is.

Before each optimizer step, :meth:`BadDataGuard.take` gathers ``grad_accum`` non-empty
micro-batches on every rank. Each round all-reduces the bad and usable counts and the number of
micro-batches each rank still misses; empty ones are dropped and replaced. Every rank therefore
sees the same totals and applies the one limit, ``train.max_bad_fraction`` (from
``train.bad_check_min_samples`` samples on), at the same step: when it is exceeded all ranks raise
the same :class:`BadDataError`, and no rank aborts alone while the others wait in a collective.
A run that ends before ``train.bad_check_min_samples`` samples were read is never stopped by the
limit; if its bad fraction is above it, it ends with a warning and ``bad_fraction_exceeded`` in
``summary.json`` instead (:meth:`BadDataPolicy.at_end`; exit code 0: the minimum exists so that
early noise does not stop a run).

A *lockstep* loader (``loader.lockstep``: MoCa stage 2, whose ranks' i-th micro-batches are the
slices of one global batch) must not be replaced rank by rank: that would pair one rank's slice
of global batch k+1 with another's of batch k for the rest of the run. There every round
all-reduces which positions are empty on any rank, and those positions are dropped on every rank
(the good pairs of the other ranks' slices included: counted as read, never trained on).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import distributed as D

__all__ = ["BadDataError", "BadDataGuard", "BadDataPolicy", "is_empty"]

LIMIT_KEY = "train.max_bad_fraction"
MIN_SAMPLES_KEY = "train.bad_check_min_samples"
_WORST_RANKS = 4  # ranks named in the error message


class BadDataError(RuntimeError):
    """Skipped bad samples exceeded ``train.max_bad_fraction`` of the samples read by all ranks, or
    some rank read nothing usable for too long (docs/method.md §4)."""


def is_empty(batch: dict) -> bool:
    """A micro-batch that only reports skipped samples (``num_samples == 0``): never trained on."""
    return "num_samples" in batch and int(batch["num_samples"]) == 0


@dataclass(frozen=True)
class BadDataPolicy:
    """``max_fraction`` of bad samples tolerated, checked once ``min_samples`` (bad + usable) were
    read; ``max_rounds``: refill rounds one step may take before the run fails anyway (it cannot
    fill a step, e.g. a rank's data are all bad while ``max_fraction = 1``)."""

    max_fraction: float
    min_samples: int
    max_rounds: int = 1000

    def exceeded(self, bad: int, seen: int) -> bool:
        """Whether ``bad`` of ``seen`` samples (summed over ranks) break the limit."""
        return seen > 0 and seen >= self.min_samples and bad / seen > self.max_fraction

    def fraction_error(self, bad: int, seen: int, step: int, per_rank: list[tuple[int, int]]) -> BadDataError:
        """The message every rank raises: the fraction, the limit, the keys, where to look."""
        frac = bad / seen
        return BadDataError(
            f"too many bad samples: {bad} of the {seen} samples read so far were bad and skipped "
            f"({frac:.2%} > {LIMIT_KEY} = {self.max_fraction:.2%}; summed over {len(per_rank)} "
            f"rank(s), checked from {MIN_SAMPLES_KEY} = {self.min_samples} samples on), at step "
            f"{step}.{_by_rank(per_rank)} Each skipped sample is logged by the loader with its id and "
            "reason ('rank R: skipping bad sample ID: REASON'); `cmpt data check DATA --out bad.jsonl` lists "
            f"them all. Fix or drop them, or raise {LIMIT_KEY}."
        )

    def at_end(self, bad: int, seen: int) -> tuple[dict[str, Any], str | None]:
        """At the end of a run, on the global counts: ``summary.json``'s ``bad_fraction`` (None
        before any sample) and ``bad_fraction_exceeded``, and the warning to log when the fraction is
        above the limit (a run that read fewer than ``min_samples`` was never stopped by it)."""
        frac = bad / seen if seen else None
        over = frac is not None and frac > self.max_fraction
        fields = {"bad_fraction": frac, "bad_fraction_exceeded": over}
        if not over:
            return fields, None
        short = seen < self.min_samples
        why = f", and the run read only {seen} (< {MIN_SAMPLES_KEY} = {self.min_samples})" if short else ""
        return fields, (
            f"{bad} of the {seen} samples read were bad and skipped ({frac:.2%} > {LIMIT_KEY} = "
            f"{self.max_fraction:.2%}); the limit was not applied{why}. The model trained on the rest "
            "only: `cmpt data check DATA --out bad.jsonl` lists the bad samples with their reasons "
            "(summary.json: bad_fraction_exceeded)."
        )

    def stuck_error(self, rounds: int, step: int, missing: list[int]) -> BadDataError:
        ranks = [r for r, m in enumerate(missing) if m]
        return BadDataError(
            f"rank(s) {ranks} read only bad samples for {rounds} rounds while forming step {step}: "
            "no usable micro-batch; see the loader's 'skipping bad sample' lines (ids and reasons) "
            f"or run `cmpt data check DATA` ({LIMIT_KEY} = {self.max_fraction:.2%})."
        )


def _by_rank(per_rank: list[tuple[int, int]]) -> str:
    if len(per_rank) < 2:
        return ""
    order = sorted(range(len(per_rank)), key=lambda r: -per_rank[r][0] / max(1, per_rank[r][1]))
    parts = [f"rank {r}: {per_rank[r][0]}/{per_rank[r][1]}" for r in order[:_WORST_RANKS]]
    more = f", {len(order) - _WORST_RANKS} more" if len(order) > _WORST_RANKS else ""
    return f" Bad/read by rank: {', '.join(parts)}{more}."


class BadDataGuard:
    """Forms each step's micro-batches in lockstep over the ranks and applies a
    :class:`BadDataPolicy` to the global counts (see the module docstring). ``local_bad`` /
    ``local_seen``: this rank's own counts (for the per-rank part of the message; saved with the
    rank's checkpoint state)."""

    def __init__(self, policy: BadDataPolicy, lockstep: bool = False) -> None:
        self.policy = policy
        self.lockstep = lockstep
        self.local_bad = self.local_seen = 0

    def take(
        self, it: Iterator[dict], n: int, step: int, bad_before: int, seen_before: int
    ) -> tuple[list[dict], int, int]:
        """``n`` non-empty micro-batches of this rank for ``step``, and the step's global counts
        ``(bad, usable)``; ``bad_before`` / ``seen_before``: the global counts of earlier steps.
        Raises :class:`BadDataError` on every rank at once."""
        batches: list[dict] = []
        bad = good = rounds = 0
        while True:
            rounds += 1
            new = [next(it) for _ in range(n - len(batches))]
            lbad = sum(int(b.get("num_bad", 0)) for b in new)
            lgood = sum(int(b.get("num_samples", 0)) for b in new)
            self.local_bad, self.local_seen = self.local_bad + lbad, self.local_seen + lbad + lgood
            empty = [int(is_empty(b)) for b in new]
            if self.lockstep:  # a position empty on any rank is dropped on all
                gbad, ggood, *gempty = (round(v) for v in D.all_reduce_sum([lbad, lgood, *empty]))
                batches += [b for b, e in zip(new, gempty) if e == 0]
                gmissing = n - len(batches)
            else:
                batches += [b for b, e in zip(new, empty) if not e]
                gbad, ggood, gmissing = (round(v) for v in D.all_reduce_sum([lbad, lgood, n - len(batches)]))
            bad, good = bad + gbad, good + ggood
            total_bad, total_seen = bad_before + bad, seen_before + bad + good
            if self.policy.exceeded(total_bad, total_seen):
                per_rank = D.all_gather_object((self.local_bad, self.local_seen))
                raise self.policy.fraction_error(total_bad, total_seen, step, per_rank)
            if gmissing == 0:
                return batches, bad, good
            if rounds >= self.policy.max_rounds:
                missing = D.all_gather_object(n - len(batches))
                raise self.policy.stuck_error(rounds, step, missing)

    def state_dict(self) -> dict[str, int]:
        return {"local_bad": self.local_bad, "local_seen": self.local_seen}

    def load_state_dict(self, state: dict) -> None:
        self.local_bad = int(state.get("local_bad", 0))
        self.local_seen = int(state.get("local_seen", 0))
