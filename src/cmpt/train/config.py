"""Typed configuration of the generic trainer: the ``run``, ``optim`` and ``train`` sections of a recipe.

Every recipe (CoMP stages, MoCa stages; docs/method.md §2.1, §3) carries these three sections next to its
task-specific ones; they are plain dataclasses read with :func:`cmpt.config.load_config`.
Per-group learning rates (docs/method.md §2.1: ViT 1e-4, merger 5e-3, rest 2e-5, ...) come from the task's
``param_groups()``; ``optim.lr`` is only the default of a group that names none.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["OptimConfig", "RunConfig", "TrainConfig"]


@dataclass
class RunConfig:
    """Where a run lives and how it is seeded.

    ``dir`` holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and ``final/``; rerunning
    the same command on the same ``dir`` resumes. Rank ``r`` seeds torch / ``random`` / numpy
    with ``seed + r`` (so that dropout differs between ranks).
    """

    dir: str = "runs/default"
    seed: int = 0
    name: str = ""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (method.md §2.1: cosine with warmup; MoCa: linear, 10 % warmup).

    The warmup length is ``warmup_steps`` when positive, else ``round(warmup_ratio · train.steps)``.
    The schedule multiplies every group's base lr (formulas of Hugging Face ``transformers``,
    which the official CoMP and MoCa code use): warmup ``s / warmup``, then cosine
    ``min + (1 − min)·½(1 + cos(π·progress))`` or linear ``min + (1 − min)·(1 − progress)``, where
    ``min = min_lr_ratio``. Norms, biases, gains and ``pos_embed``/``cls_token``/
    ``register_tokens``/``probe`` parameters get no weight decay. ``clip_grad: null`` disables
    clipping (the grad norm is still computed and logged).
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    clip_grad: float | None = 1.0

    def __post_init__(self) -> None:
        if self.lr < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ValueError("lr and weight_decay must be >= 0 and eps > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError("warmup_steps must be >= 0 and warmup_ratio in [0, 1]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError("clip_grad must be > 0 (or null to disable clipping)")


@dataclass
class TrainConfig:
    """The optimisation loop (docs/method.md §6 for loss normalization and data-fault limits).

    * ``steps``: optimizer steps in total (a resumed run continues up to it). Skipped
      (non-finite) steps count: they consume data and advance the schedule.
    * ``grad_accum``: micro-batches per rank per optimizer step.
    * ``save_every``: checkpoint period in steps (0: only at the end and on a stop signal);
      ``keep_last``: complete checkpoints kept (0: keep all).
    * ``dist``: ``none`` | ``ddp`` | ``fsdp`` (FSDP2 ``fully_shard``). Under ``torchrun`` with more
      than one process, ``none`` means ``ddp`` (training unsynchronised replicas is never
      wanted); with a single process every mode runs unwrapped.
    * ``precision``: ``auto`` = bf16 autocast on a GPU with native bf16, else fp32; ``bf16`` forces autocast.
      Under FSDP2, bf16 also all-gathers the parameters in bf16 for compute and reduces gradients
      in fp32 (``MixedPrecisionPolicy``); the sharded parameters and the optimizer stay fp32.
    * ``activation_checkpointing``: ``false`` | ``true`` (= ``full``: each checkpointed FSDP unit
      keeps only its inputs) | ``selective`` (it also keeps the outputs of matrix products and
      attention, recomputing norms, activations and element-wise ops: less recomputation for some
      more memory); ``ac_every: k`` checkpoints every k-th unit (the 1st, (1+k)-th, ...; docs/method.md
      §6 "Activation memory").
    * ``max_nonfinite``: non-finite steps tolerated in total (skipped, zero grads); one more
      raises.
    * ``max_bad_fraction``: the one bad-sample limit (docs/method.md §4): every rank stops with the
      same error once the skipped bad samples exceed this fraction of all samples read, both
      summed over ranks, checked before each step from ``bad_check_min_samples`` samples on
      (``1.0`` never fails on the fraction). It replaces ``data.max_bad_fraction`` (still read,
      with a warning, as this key).
    * ``resume`` (``cmpt train --resume``): ``auto`` continues from the newest complete checkpoint
      of ``run.dir`` (or starts fresh without one); ``never`` refuses to start when ``run.dir``
      has checkpoints; anything else is a checkpoint directory (``.../checkpoints/step_000040``,
      possibly of another run) or a run directory (its newest checkpoint) to continue from.
    * ``allow_change`` (``cmpt train --allow-change``): config keys (dotted; a prefix covers its
      sub-keys: ``stage.lr`` covers ``stage.lr.vision``, ``data`` covers the data fingerprint) that
      may differ from the checkpoint's config on resume; any other difference outside
      :data:`cmpt.train.config_diff.IGNORED_KEYS` is refused, listing old → new (:mod:`cmpt.train.resume`).
    """

    steps: int = 100
    grad_accum: int = 1
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 10
    dist: Literal["none", "ddp", "fsdp"] = "none"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool | Literal["full", "selective"] = False
    ac_every: int = 1
    compile: bool = False
    max_nonfinite: int = 10
    max_bad_fraction: float = 0.01
    bad_check_min_samples: int = 200
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    resume: str = "auto"
    allow_change: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not str(self.resume).strip():
            raise ValueError("resume must be 'auto', 'never' or a checkpoint / run directory")
        if self.wandb and importlib.util.find_spec("wandb") is None:  # an error at start, not silence
            raise ValueError(
                "train.wandb=true, but wandb is not installed: pip install wandb (or set train.wandb=false)"
            )
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError("steps and grad_accum must be >= 1")
        if self.save_every < 0 or self.keep_last < 0 or self.log_every < 0:
            raise ValueError("save_every, keep_last and log_every must be >= 0")
        if self.ac_every < 1:
            raise ValueError(f"ac_every must be >= 1 (checkpoint every k-th unit), got {self.ac_every}")
        if self.max_nonfinite < 0:
            raise ValueError("max_nonfinite must be >= 0")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")
        if self.bad_check_min_samples < 0:
            raise ValueError(f"bad_check_min_samples must be >= 0, got {self.bad_check_min_samples}")

    @property
    def ac_mode(self) -> str:
        """``none`` | ``full`` | ``selective``, from ``activation_checkpointing``."""
        ac = self.activation_checkpointing
        return ("full" if ac else "none") if isinstance(ac, bool) else ac
