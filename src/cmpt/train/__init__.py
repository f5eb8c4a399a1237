"""The generic trainer (docs/architecture.md ``train/``): a recipe is a :class:`Task`; the loop
knows nothing of CoMP.

``Trainer(run, optim, train, task, full_config).fit()`` trains single-process or under
``torchrun`` (DDP / FSDP2), with globally normalized losses (docs/method.md §6), resumable checkpoints and
metrics. See :mod:`cmpt.train.loop` for the contract.
"""

from .config import OptimConfig, RunConfig, TrainConfig
from .loop import BadDataError, Loader, LossTerms, NonFiniteError, Task, Trainer

__all__ = [
    "BadDataError",
    "Loader",
    "LossTerms",
    "NonFiniteError",
    "OptimConfig",
    "RunConfig",
    "Task",
    "TrainConfig",
    "Trainer",
]
