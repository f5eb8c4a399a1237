"""Any checkpoint step as a model directory: ``cmpt export RUN/checkpoints/step_N --out DIR`` (a
command over a recipe and the trainer's checkpoints, so it lives beside them, not in ``train/``,
which never knows its recipe).

The run's recipe is rebuilt from ``RUN/config.yaml`` (the same starting point: its ``model.init``
must still exist), the checkpoint's weights are read into it — DCP reshards, so DDP and FSDP2
checkpoints of any world size load in one process — and the recipe's own ``save_final`` writes
``DIR`` exactly as it writes ``final/`` (a VLM / CoMP-VFM directory, an Embedder directory, ...),
atomically. The checkpoint is verified first; nothing but checkpoint data is unpickled. Every model
directory written gets a model card naming the run, the recipe and the step (:mod:`cmpt.model_card`);
the completion marker records the run and step too. A checkpoint that a training start set aside as
``step_N.damaged`` is named as such (:func:`cmpt.train.verify.set_aside_note`; docs/method.md §4
"Verified checkpoints").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from .io_atomic import atomic_directory
from .model_card import CARD_NAME, RunFacts, write_model_card
from .train.checkpoint import CheckpointError, save_final_weights
from .train.safe_load import safe_dcp_load
from .train.verify import set_aside_note, verify_checkpoint

__all__ = ["export_checkpoint", "is_checkpoint"]


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training checkpoint directory (``RUN/checkpoints/step_N``)."""
    p = Path(path)
    return (p / ".metadata").is_file() and (p / "trainer_state.json").is_file()


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write checkpoint ``ckpt`` as its recipe's final output into ``out``; returns ``out``."""
    from .recipes import load_recipe

    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(set_aside_note(ckpt) or f"checkpoint {ckpt} does not exist")
    verdict = verify_checkpoint(ckpt)
    if not verdict.ok:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {verdict.reason}")
    run_dir = ckpt.parent.parent
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: cannot tell which recipe wrote {ckpt}")
    cfg, task_cls = load_recipe(str(cfg_file))
    torch.manual_seed(cfg.run.seed)
    task = task_cls(cfg)
    options = StateDictOptions(ignore_frozen_params=True)
    state = {"model": get_model_state_dict(task.model, options=options)}
    safe_dcp_load(ckpt, state)
    result = set_model_state_dict(
        task.model, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False)
    )
    frozen = {n for n, p in task.model.named_parameters() if not p.requires_grad}
    missing = [k for k in getattr(result, "missing_keys", []) if k not in frozen]
    if missing:  # frozen weights come from the recipe's starting point; trained ones must be there
        raise CheckpointError(f"checkpoint {ckpt} lacks trained weights {missing[:5]} of {cfg_file}'s recipe")
    step = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["counters"]["step"]
    run = RunFacts(run_dir.absolute(), int(step), str(ckpt.absolute()))
    out = Path(out)
    info = {"checkpoint": run.checkpoint, "run_dir": str(run.run_dir), "step": run.step}
    with atomic_directory(out, "cmpt export", **info) as tmp:
        save_final_weights(task, task.model, tmp, is_main=True)
        for d in [tmp, *sorted(p for p in tmp.iterdir() if p.is_dir())]:  # final/vit (CoMP-VFM) too
            if (d / CARD_NAME).is_file():
                write_model_card(d, run)
    return out
