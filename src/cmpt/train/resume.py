"""Explicit resume rules: which checkpoint a run continues from, which config changes it accepts,
and the run's config history (docs/architecture.md ``train/``; docs/method.md §6 for what a step consumes).

**Which checkpoint** (``train.resume`` / ``cmpt train --resume``): ``auto`` = the newest complete
checkpoint of ``run.dir`` (none: start fresh); ``never`` = refuse when ``run.dir`` has checkpoints;
otherwise a checkpoint directory (possibly of another run) or a run directory (its newest
checkpoint). Continuing from a checkpoint that is older than checkpoints already in ``run.dir``
is refused (the next ``auto`` resume would jump to those).

**Which changes.** Every checkpoint stores the run's config and a fingerprint of its data
(``trainer_state.json``: ``config``, ``data_fingerprint``). On resume, both are compared with the
current ones key by key (dotted keys; ``name[content]`` / ``name[member]`` for data content). A key
that differs — present on one side only counts — is refused, listed old → new, unless it is in
:data:`~cmpt.train.config_diff.IGNORED_KEYS` (keys that do not change the model, the data stream or
the optimization; the comparison is :mod:`cmpt.train.config_diff`) or covered by
``train.allow_change`` (a prefix covers its sub-keys: ``stage.lr`` covers
``stage.lr.vision``; ``data.path`` covers ``data.path[content]``). Allowed changes take effect: the
optimizer's hyper-parameters and the learning-rate schedule are rebuilt from the current config
(:func:`restore_schedule`), not taken from the checkpoint.

**Data** is compared by content (:mod:`cmpt.train.fingerprint`): a reordered or edited data file is
refused like a changed key, a moved ``run.dir`` or a touched file is not.

**Whose run.dir** (docs/method.md §4 "Verified checkpoints"): :func:`check_run_dir_owner` refuses,
before anything is built, a ``run.dir`` that holds files but no cmpt run (none of
:data:`RUN_ENTRIES`): a user's folder is not trained into. A checkpoint of another recipe or stage
(``recipe``, ``stage.name`` of the saved config) is refused with one line naming both, not the
key-by-key list.

**Finished runs**: when ``auto`` picks a checkpoint of this ``run.dir`` at ``train.steps`` and
``run.dir/final/`` is complete for that step, the plan says ``nothing_to_do``: the trainer logs one
line, loads nothing, records no start in ``history/``, leaves ``final/`` as it is and exits 0
(docs/method.md §4 "Verified checkpoints"). A missing or incomplete ``final/`` is written again.

**History**: every start that loaded its checkpoint is recorded in ``run.dir/history/``
(:mod:`cmpt.train.history`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..io_atomic import read_marker
from .config_diff import _ABSENT, IGNORED_KEYS, covered, diff_configs, flatten
from .frozen import FROZEN_KEY
from .history import continued_from
from .optim import restore_schedule, snapshot_groups
from .verify import set_aside_note, verify_final

__all__ = ["RUN_ENTRIES", "ResumeError", "ResumePlan", "check_run_dir_owner", "load_and_reschedule"]
__all__ += ["plan_resume", "start_run"]

logger = logging.getLogger("cmpt.train")

#: what only a cmpt run writes into run.dir (:mod:`cmpt.train.history`, the checkpoints, the lock of
#: :mod:`cmpt.train.disk`): a folder holding one of them holds a run
RUN_ENTRIES: tuple[str, ...] = ("checkpoints", "history", "config.yaml", "summary.json", ".lock")


class ResumeError(ValueError):
    """The run cannot start as asked (a user error: ``cmpt train`` exits 2, naming the fix)."""


@dataclass
class ResumePlan:
    """What :func:`plan_resume` decided: continue from ``checkpoint`` (at ``step``) or start fresh."""

    mode: str
    checkpoint: str | None = None
    step: int | None = None
    changes: dict[str, list[Any]] = field(default_factory=dict)  # allowed: key -> [old, new]
    notes: list[str] = field(default_factory=list)
    nothing_to_do: bool = False  # run.dir finished at train.steps with final/ complete (module docstring)

    def describe(self) -> str:
        if self.nothing_to_do:
            return (
                f"run.dir already finished (step {self.step}/{self.step}, final/ complete): nothing to do; "
                "raise train.steps to continue or use a new run.dir"
            )
        if self.checkpoint is None:
            return f"starting fresh (--resume {self.mode}: no checkpoint to continue from)"
        what = f"resuming from step {self.step} of {self.checkpoint} (--resume {self.mode})"
        return what + (f"; allowed changes: {', '.join(self.changes)}" if self.changes else "")


def check_run_dir_owner(run_dir: Path) -> None:
    """:class:`ResumeError` when ``run_dir`` holds files but no cmpt run (none of :data:`RUN_ENTRIES`):
    a user's folder, which training would fill with checkpoints and logs. Absent, empty, or an
    earlier run (finished, stopped or refused at its start): accepted. Local and cheap: checked
    before anything is built."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):  # absent (created later), or a file (check_run_dir)
        return
    if not names or any(name.rstrip("/") in RUN_ENTRIES for name in names):
        return
    shown = ", ".join(names[:4]) + (f", ... ({len(names)} entries)" if len(names) > 4 else "")
    raise ResumeError(
        f"run.dir {run_dir} holds files cmpt did not write and no cmpt run ({shown}): training would "
        "put its checkpoints and logs among them; choose a new or empty run.dir (--set run.dir=...)"
    )


# ----------------------------------------------------------------------------- the decision
def _checkpoint_of(spec: str, complete_in: Callable[[Path], list[tuple[int, Path]]]) -> tuple[int, Path]:
    from ..paths import expand_path

    path = Path(expand_path(spec))
    if not path.exists():
        raise ResumeError(
            f"--resume {spec}: {set_aside_note(path) or f'{path} does not exist'} (--resume takes auto, "
            "never, a checkpoint directory RUN/checkpoints/step_NNNNNN, or a run directory RUN)"
        )
    if (path / "checkpoints").is_dir():  # a run directory: its newest checkpoint
        found = complete_in(path / "checkpoints")
        if not found:
            raise ResumeError(f"--resume {spec}: the run directory {path} has no complete checkpoint")
        return found[-1]
    for step, p in complete_in(path.parent):
        if p.resolve() == path.resolve():
            return step, p
    raise ResumeError(
        f"--resume {spec}: {path} is not a complete checkpoint (--resume takes auto, never, a "
        "checkpoints/step_NNNNNN directory with its completion marker, or a run directory)"
    )


def _step_of(path: Path) -> int:
    digits = "".join(c for c in path.name if c.isdigit())
    return int(digits) if digits else -1


def _saved_config(ckpt: Path, run_dir: Path) -> tuple[dict | None, dict | None, list[str]]:
    """(config, data fingerprint, notes) stored with checkpoint ``ckpt``; older checkpoints have no
    config: ``run.dir/config.yaml`` stands in for those of this run."""
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    if "config" in state:
        return state["config"], state.get("data_fingerprint"), []
    legacy = run_dir / "config.yaml"
    if ckpt.resolve().parent.parent == run_dir.resolve() and legacy.is_file():
        note = f"{ckpt} stores no config (written by an older cmpt): compared with {legacy}, data not checked"
        return yaml.safe_load(legacy.read_text(encoding="utf-8")) or {}, None, [note]
    return None, None, [f"{ckpt} stores no config (written by an older cmpt): changes cannot be checked"]


def _refusal(
    run_dir: Path, ckpt: Path, step: int, refused: dict[str, list[Any]], unused: list[str]
) -> ResumeError:
    lines = [
        f"  {k}: {json.dumps(o, default=str)} → {json.dumps(n, default=str)}" for k, (o, n) in refused.items()
    ]
    keys = ",".join(refused)
    return ResumeError(
        f"cannot resume {run_dir} from {ckpt} (step {step}): the config differs from the checkpoint's in "
        f"{len(refused)} key(s) that change the model, the data stream or the optimization:\n"
        + "\n".join(lines)
        + f"\nto continue with these changes, add --allow-change {keys} (or --set "
        f"train.allow_change=[...]); to start over, choose a new run.dir"
        + (
            f"\n(--allow-change entries that match no change, mistyped?: {', '.join(unused)})"
            if unused
            else ""
        )
    )


def _run_kind(cfg: dict) -> str:
    """``a comp run (stage1)``: the recipe and stage a config trains."""
    flat = flatten(cfg)
    recipe, stage = flat.get("recipe"), flat.get("stage.name")
    return (f"a {recipe} run" if recipe else "a run without a recipe name") + (f" ({stage})" if stage else "")


def _other_run(mode: str, run_dir: Path, ckpt: Path, old: dict, new: dict) -> ResumeError:
    """The one-line refusal of a checkpoint written by another recipe or stage."""
    theirs, ours = _run_kind(old), _run_kind(new)
    if ckpt.resolve().parent.parent == run_dir.resolve():
        return ResumeError(f"{run_dir} holds {theirs}; this is {ours}: use a new run.dir (--set run.dir=...)")
    return ResumeError(
        f"--resume {mode}: {ckpt} is a checkpoint of {theirs}; this is {ours}: a checkpoint continues its "
        "own recipe and stage only (a next stage starts from the previous one's final/, model.init)"
    )


def plan_resume(
    spec: str,
    run_dir: Path,
    complete_in: Callable[[Path], list[tuple[int, Path]]],
    config: dict,
    fingerprint: dict[str, str],
    allow: Iterable[str] = (),
    ignored: Iterable[str] = IGNORED_KEYS,
    latest: Path | None = None,
    world_size: int | None = None,
    batch_key: str = "train.grad_accum",
) -> ResumePlan:
    """Decide where the run starts (see the module docstring); :class:`ResumeError` when it may not.
    ``complete_in(root)`` lists the complete checkpoints ``(step, path)`` under ``root``, oldest first;
    ``latest``: the checkpoint ``auto`` continues from (the newest one that verifies, found by the
    caller: :meth:`cmpt.train.checkpoint.CheckpointManager.latest`); ``world_size``: this job's, compared
    with the checkpoint's as ``train.world_size`` (:func:`cmpt.train.reshard.world_size_change`; with
    ``batch_key``, the key that times the world size makes the global batch)."""
    mode, allow = spec.strip(), [a.strip() for a in allow if a.strip()]
    start = _start_point(mode, run_dir, complete_in, latest)
    if start is None:
        return ResumePlan(mode)
    step, ckpt, pre = start
    changes, accepted, notes = _changes(ckpt, run_dir, config, fingerprint, ignored, world_size, batch_key)
    refused = {k: v for k, v in sorted(changes.items()) if not covered(k, [*allow, *accepted])}
    # frozen_weights is checked later, against the weights the model loads (cmpt.train.frozen)
    unused = [a for a in allow if a != FROZEN_KEY and not any(covered(k, [a]) for k in changes)]
    if refused and {"recipe", "stage.name"} & set(refused):
        raise _other_run(mode, run_dir, ckpt, _saved_config(ckpt, run_dir)[0], config)
    if refused:
        raise _refusal(run_dir, ckpt, step, refused, unused)
    if unused:
        notes.append(f"train.allow_change entries that match no change: {', '.join(unused)}")
    return ResumePlan(mode, str(ckpt.resolve()), step, dict(sorted(changes.items())), [*pre, *notes])


def _start_point(
    mode: str, run_dir: Path, complete_in: Callable[[Path], list[tuple[int, Path]]], latest: Path | None
) -> tuple[int, Path, list[str]] | None:
    """The checkpoint ``mode`` continues, as (step, path, notes); None for a fresh start
    (:func:`plan_resume`)."""
    own = complete_in(run_dir / "checkpoints")
    if mode == "never":
        if own:
            raise ResumeError(
                f"{run_dir} already has checkpoints ({', '.join(p.name for _, p in own)}) and --resume "
                f"never was given: continue them with --resume auto, or choose a new run.dir "
                f"(--set run.dir=...), or remove {run_dir / 'checkpoints'}"
            )
        return None
    if mode == "auto":
        if latest is None:
            return None
        step, ckpt = next(
            ((s, p) for s, p in own if p == Path(latest)), (_step_of(Path(latest)), Path(latest))
        )
        return step, ckpt, []
    step, ckpt = _checkpoint_of(mode, complete_in)
    newer = [p.name for s, p in own if s > step]
    if newer and str(ckpt.resolve()) in continued_from(run_dir):  # the same command, rerun
        early = f"{ckpt} (step {step})"
        step, ckpt = own[-1]
        return (
            step,
            ckpt,
            [f"this run.dir already continued from {early}: continuing from its newest checkpoint"],
        )
    if newer:
        raise ResumeError(
            f"--resume {mode} continues from step {step}, but {run_dir} has newer checkpoints "
            f"({', '.join(newer)}) that a later --resume auto would pick up: move them away or "
            "choose a new run.dir"
        )
    return step, ckpt, []


def _changes(
    ckpt: Path,
    run_dir: Path,
    config: dict,
    fingerprint: dict[str, str],
    ignored: Iterable[str],
    world_size: int | None,
    batch_key: str,
) -> tuple[dict[str, list[Any]], tuple[str, ...], list[str]]:
    """What differs between ``ckpt``'s saved config and data fingerprint and this run's, as
    (changes ``{key: [old, new]}``, keys accepted without ``--allow-change``, notes)
    (:func:`plan_resume`)."""
    old, old_fp, notes = _saved_config(ckpt, run_dir)
    changes: dict[str, list[Any]] = {}
    if old is not None:
        changes = diff_configs(old, config, ignored)
    if old_fp is not None:
        fp_keys = sorted(set(old_fp) | set(fingerprint))
        changes.update(
            {
                k: [old_fp.get(k, _ABSENT), fingerprint.get(k, _ABSENT)]
                for k in fp_keys
                if old_fp.get(k) != fingerprint.get(k)
            }
        )
    elif old is not None and not notes:
        notes.append(f"{ckpt} stores no data fingerprint: the data content was not compared")
    accepted: tuple[str, ...] = ()
    if world_size is not None:  # the same global batch at another world size needs no --allow-change
        from .reshard import world_size_change

        moved, accepted, more = world_size_change(ckpt, old, config, world_size, batch_key)
        changes.update(moved)
        notes.extend(more)
    return changes, accepted, notes


def _finished(run_dir: Path, plan: ResumePlan, steps: int) -> bool:
    """Whether ``plan`` continues this ``run_dir``'s own checkpoint at ``steps`` and ``run_dir/final``
    is complete for that step (its completion marker names the step, :func:`cmpt.train.verify.verify_final`
    accepts it): a finished run, nothing to do (module docstring)."""
    if plan.checkpoint is None or plan.step != steps:
        return False
    if Path(plan.checkpoint).parent.parent != run_dir.resolve():
        return False
    final = run_dir / "final"
    return (read_marker(final) or {}).get("step") == steps and verify_final(final).ok


def start_run(
    ckpt: Any,
    run_dir: Path,
    train: Any,
    config: dict,
    ignored: Iterable[str],
    batch_key: str = "train.grad_accum",
) -> tuple[ResumePlan, dict[str, str] | None]:
    """Collective. ``ckpt``: the run's :class:`~cmpt.train.checkpoint.CheckpointManager`; ``train``:
    its :class:`~cmpt.train.config.TrainConfig` (``resume``, ``allow_change``, ``steps``). Rank 0
    fingerprints the data, decides (:func:`plan_resume`; ``auto`` takes ``ckpt.latest()``, the
    newest checkpoint that verifies; ``nothing_to_do`` for a finished run, :func:`_finished`) and
    logs the decision (one INFO line); every rank gets the
    plan — or raises the refusal. The trainer records the start
    (:func:`cmpt.train.history.record_start`) once the checkpoint is loaded. Returns (plan, data
    fingerprint on rank 0 / None elsewhere)."""
    from ..launch import EXIT_USAGE, exit_code_for
    from . import distributed as D
    from .fingerprint import data_fingerprint

    world, spec = ckpt.world, train.resume.strip()
    latest = ckpt.latest() if spec == "auto" else None  # collective

    def complete_in(root: Path) -> list[tuple[int, Path]]:
        return type(ckpt)(root, world).complete()

    outcome: tuple | None = None
    error, fingerprint = None, None
    if world.is_main:
        try:
            fingerprint = data_fingerprint(config, ignored)
            args = (config, fingerprint, train.allow_change, ignored, latest, world.world_size, batch_key)
            plan = plan_resume(spec, run_dir, complete_in, *args)
            plan.nothing_to_do = _finished(run_dir, plan, train.steps)
            outcome = ("ok", dataclasses.asdict(plan))
        except Exception as e:
            error, outcome = e, ("error", f"{type(e).__name__}: {e}", exit_code_for(e))
    if D.is_dist():
        outcome = D.all_gather_object(outcome)[0]
    if error is not None:
        raise error
    if outcome[0] == "error":
        kind = ResumeError if outcome[2] == EXIT_USAGE else RuntimeError
        raise kind(f"rank 0 could not start the run: {outcome[1]}")
    plan = ResumePlan(**outcome[1])
    if world.is_main:
        for note in plan.notes:
            logger.warning("%s", note)
        logger.info("%s", plan.describe())
    return plan, fingerprint


def load_and_reschedule(
    ckpt: Any, plan: ResumePlan, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``ckpt.load`` of ``plan.checkpoint`` (collective), then
    :func:`cmpt.train.optim.restore_schedule`; returns (trainer state, this rank's state)."""
    fresh = snapshot_groups(optimizer)  # as built from the config, before the load replaces them
    tstate, rstate = ckpt.load(Path(plan.checkpoint), module, optimizer)
    restore_schedule(optimizer, scheduler, tstate["scheduler"], fresh)
    return tstate, rstate
