"""Frozen-weight digests: a resumed run must sit on the frozen weights it was trained on
(docs/method.md §4 "Verified checkpoints").

Checkpoints leave frozen parameters out (a frozen LLM in CoMP stage I, the untied LM head in MoCa
CL, a LoRA base): on resume they come from the task's initialisation again (``model.init``,
``model.vision``, ``model.llm``, a backbone path). If that source now holds other weights — a
re-downloaded hub revision, an edited file, another path — the trainable weights of the checkpoint
would continue on top of a different model without any error. So every checkpoint stores a digest
of each frozen parameter (:mod:`cmpt.weights_digest`: ``[numel, Σx, Σx², Σw·x]`` in float64),
computed once per launch by rank 0 from the full weights before they are sharded, and a resume
compares them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from cmpt.weights_digest import digest_mismatch, parameter_digest

__all__ = ["FROZEN_KEY", "check_frozen", "frozen_digest", "frozen_mismatch"]

#: the ``trainer_state.json`` key, and the ``--allow-change`` name that accepts other frozen weights
FROZEN_KEY = "frozen_weights"


@torch.no_grad()
def frozen_digest(module: nn.Module) -> dict[str, list[float]]:
    """``{name: [numel, Σx, Σx², Σw·x]}`` of every parameter of ``module`` that does not require a
    gradient (full tensors: call it before the model is sharded). Empty when everything trains."""
    return parameter_digest(module, frozen_only=True)


def frozen_mismatch(saved: dict[str, list[float]], now: dict[str, list[float]]) -> list[str]:
    """Names of frozen parameters whose digests differ (one side absent counts), sorted."""
    return digest_mismatch(saved, now)


def _sources(config: dict) -> str:
    from .config_diff import flatten

    keys = [
        k for k, v in flatten(config).items() if k.startswith("model.") and isinstance(v, str) and "/" in v
    ]
    return ", ".join(keys) or "the model section"


def check_frozen(
    checkpoint: str | Path, digest: dict[str, list[float]], config: dict, allow: Iterable[str]
) -> str | None:
    """Rank 0, before a resume loads ``checkpoint``: compare its stored frozen-weight digest with
    ``digest`` (this launch's, :func:`frozen_digest`). Returns a warning to log (differences accepted
    by ``--allow-change frozen_weights``, or a checkpoint from before the digest existed) or None;
    raises :class:`~cmpt.train.resume.ResumeError` naming the parameters and the config keys that
    load them."""
    from .config_diff import covered
    from .resume import ResumeError

    path = Path(checkpoint) / "trainer_state.json"
    saved = json.loads(path.read_text(encoding="utf-8")).get(FROZEN_KEY)
    if saved is None:
        return (
            f"{checkpoint} stores no digest of the frozen weights (an older cmpt): they were not compared"
            if digest
            else None
        )
    bad = frozen_mismatch(saved, digest)
    if not bad:
        return None
    names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    what = f"{len(bad)} frozen parameter(s) differ from those the checkpoint was trained with ({names})"
    if covered(FROZEN_KEY, allow):
        return f"{what}: continuing on the new ones (--allow-change {FROZEN_KEY})"
    raise ResumeError(
        f"cannot resume from {checkpoint}: {what}. Checkpoints do not store frozen weights: they are "
        f"loaded again from the config ({_sources(config)}), which now gives other values. Point it at "
        f"the weights the run started from (run.dir/history/ holds its first config), or add "
        f"--allow-change {FROZEN_KEY} to continue on these"
    )
