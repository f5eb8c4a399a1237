"""The contract between a recipe and the trainer (docs/architecture.md "Trainer ↔ recipe"): a
:class:`Task` gives the model, its parameter groups, FSDP units, a :class:`Loader` and a loss as
:class:`LossTerms` (sums and counts, normalized globally by the trainer, docs/method.md §6)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Protocol

from torch import Tensor, nn

__all__ = ["Loader", "LossTerms", "Task"]


@dataclasses.dataclass
class LossTerms:
    """One micro-batch's loss: un-normalized ``sums`` (scalar tensors) and ``counts`` per term.

    Every micro-batch on every rank must return the same term names (count 0 when a term has
    nothing in this batch: keep its sum connected to the graph, e.g. ``0 · output.sum()``).
    ``weights`` default to 1; ``metrics`` (floats or scalar tensors) are averaged over the
    micro-batches of rank 0 and logged as ``metric/<name>``.
    """

    sums: dict[str, Tensor]
    counts: dict[str, int]
    weights: dict[str, float]
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class Loader(Protocol):
    """This rank's micro-batches, forever. A batch may carry ``num_samples``, ``num_bad`` and
    ``num_tokens`` (ints) for throughput and the bad-sample guard; a batch with ``num_samples == 0``
    only reports skipped samples (a stretch with nothing usable): the trainer counts it and takes
    the next one instead, never calling the task on it (docs/method.md §4). ``state_dict()`` must describe
    the position after the last batch *yielded* and hold only tensors, numbers, strings, lists and
    dicts (it is saved per rank and read back with ``torch.load(weights_only=True)``). An optional
    ``lockstep = True`` says that the ranks' i-th micro-batches belong together (slices of one global
    batch): an empty one then drops that position on every rank (:mod:`cmpt.train.bad_data`)."""

    def __iter__(self) -> Iterator[dict]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, d: dict) -> None: ...


class Task(Protocol):
    """What a recipe gives the trainer. ``compute_loss`` gets the model as trained (DDP wrapper or
    FSDP2 root) and must run the forward through ``model(...)`` — calling submodules directly
    bypasses DDP's and FSDP's hooks. ``param_groups`` is called once, before wrapping; its
    parameters are matched by name. Optional methods: ``loss_counts(batch) -> dict[str, int]``
    (the counts ``compute_loss`` will return, known without a forward: enables streaming
    accumulation), ``save_final(model, out_dir[, state_dict])`` (rank 0 only; ``state_dict`` is
    the full gathered CPU state dict, passed when the method accepts it — under FSDP2 ``model``
    already holds those full weights in place of its shards, :mod:`cmpt.train.final_weights`, so
    the task's own modules can be saved as they are; ``out_dir`` is a temporary sibling of
    ``run.dir/final`` that replaces it once complete), ``resume_ignored_keys`` (config keys, besides
    :data:`cmpt.train.config_diff.IGNORED_KEYS`, whose changes never block a resume) and
    ``world_batch_key`` (the config key that, times the world size, makes the global batch the data
    stream is cut into; ``train.grad_accum`` when absent: :mod:`cmpt.train.reshard`) and
    ``host_keys`` (batch keys the trainer leaves on the host instead of moving them to the device:
    layout metadata, token ids and labels that the recipe reads in Python or indexes by, so that
    reading them never waits for the GPU; the recipe copies what the device needs itself,
    :func:`cmpt.host_tensor.to_device_async`; docs/method.md §7)."""

    model: nn.Module

    def param_groups(self) -> list[dict]: ...
    def fsdp_units(self) -> list[nn.Module]: ...
    def build_loader(self, rank: int, world_size: int) -> Loader: ...
    def compute_loss(self, model: nn.Module, batch: dict) -> LossTerms: ...
