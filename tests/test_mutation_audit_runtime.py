"""Behaviours pinned by a mutation audit (round 3) of the atomic-output, run-directory, history,
mixture, launch and pooling modules.

Each test was written against a single-point mutant of the source (a flipped comparison, a dropped
condition, a changed default, ...) that the rest of the suite let through: it passes on the code as
it is and fails on that mutant. Each docstring names the module and the line or behaviour it guards.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import cmpt.train.disk as disk
from cmpt.config import write_yaml
from cmpt.data.mixture import (
    MixtureMember,
    MixtureSource,
    load_mixture,
    parse_sampling,
    select_indices,
    weighted,
)
from cmpt.data.sources import Record
from cmpt.io_atomic import (
    COMPLETE_MARKER,
    WRITING_MARKER,
    IncompleteOutputError,
    atomic_directory,
    check_loadable,
)
from cmpt.launch import (
    EXIT_DIR_ENV,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_RESUMABLE,
    EXIT_USAGE,
    SHUTDOWN_TIMEOUT_S,
    combine_codes,
    exit_code_for,
)
from cmpt.launch import main as launch_main
from cmpt.pooling import masked_mean, segment_mean
from cmpt.train.config import TrainConfig
from cmpt.train.disk import (
    RunDirLock,
    SpaceGuard,
    claim_run_dir,
    describe_failure,
    fmt_bytes,
    free_bytes,
    out_of_space,
    tensor_nbytes,
)
from cmpt.train.distributed import WorldInfo
from cmpt.train.history import (
    continued_from,
    finished_summary,
    launch_summary,
    previous_results,
    record_start,
    write_summary,
)
from cmpt.train.loop import NonFiniteError
from cmpt.train.resume import ResumeError, ResumePlan
from cmpt.train.step import StepResult
from cmpt.train.verify import CheckpointSaveError


# ----------------------------------------------------------------------------- io_atomic
def _writing(tmp: Path, **info) -> Path:
    tmp.mkdir()
    if info:
        (tmp / WRITING_MARKER).write_text(json.dumps(info), encoding="utf-8")
    return tmp


def _complete(d: Path, text: str) -> Path:
    with atomic_directory(d) as out:
        (out / "x.txt").write_text(text)
    return d


def test_loadable_refuses_a_sibling_of_a_live_pid_without_marker(tmp_path: Path) -> None:
    """io_atomic.py:107: a temporary sibling whose writer has not written its marker yet is judged
    by the pid in its name: a live pid blocks loading (it is not taken for a dead writer)."""
    out = _complete(tmp_path / "m", "old")
    _writing(tmp_path / f"m.tmp-{os.getpid()}-abc123")
    with pytest.raises(IncompleteOutputError, match="being written by a running process"):
        check_loadable(out)


def test_loadable_refuses_a_writer_on_another_host(tmp_path: Path) -> None:
    """io_atomic.py:108 and :135: a sibling written from another host (liveness unknown) blocks
    loading with a message naming it, whatever its pid means here."""
    out = _complete(tmp_path / "m", "old")
    _writing(tmp_path / "m.tmp-1-abc123", writer="t", host=f"not-{socket.gethostname()}", pid=999_999_999)
    with pytest.raises(IncompleteOutputError, match="a process on another host"):
        check_loadable(out)


def test_loadable_refuses_a_torn_in_progress_marker(tmp_path: Path) -> None:
    """io_atomic.py:127: a directory whose in-progress marker exists but is not valid JSON (torn by
    a crash) is still refused."""
    d = tmp_path / "m"
    d.mkdir()
    (d / WRITING_MARKER).write_text('{"writer": "x", "pi', encoding="utf-8")
    with pytest.raises(IncompleteOutputError, match="incomplete output directory"):
        check_loadable(d)


def test_loadable_ignores_a_file_named_like_a_temporary(tmp_path: Path) -> None:
    """io_atomic.py:118 (only directories are temporaries): a stray *file* named like a temporary
    of a live pid does not block loading."""
    out = _complete(tmp_path / "m", "old")
    (tmp_path / f"m.tmp-{os.getpid()}-abc123").write_text("not a directory")
    check_loadable(out)


def test_write_keeps_a_live_writers_temporary(tmp_path: Path) -> None:
    """io_atomic.py:249 (``_recover`` removes only a dead writer's temporaries): writing a target
    leaves the temporary of a live writer (here: this test's parent process) alone."""
    live = _writing(tmp_path / "m.tmp-1-abc123", writer="t", host=socket.gethostname(), pid=os.getppid())
    dead = _writing(tmp_path / "m.tmp-2-def456", writer="t", host=socket.gethostname(), pid=999_999_999)
    _complete(tmp_path / "m", "new")
    assert (live / WRITING_MARKER).is_file() and not dead.exists()


def test_write_restores_an_old_copy_left_by_an_interrupted_swap(tmp_path: Path) -> None:
    """io_atomic.py:253-255: a writer that died between the two renames of the fallback left
    ``<name>.old-*`` and no target; the next write restores it first, so a failing write still
    leaves the old content in place."""
    old = _complete(tmp_path / "m.old-1-abc123", "old")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(tmp_path / "m") as d:
        (d / "x.txt").write_text("half")
        raise RuntimeError("boom")
    assert (tmp_path / "m" / "x.txt").read_text() == "old" and not old.exists()
    assert (tmp_path / "m" / COMPLETE_MARKER).is_file()


def test_write_through_a_symlink_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    """io_atomic.py:263 (no exchange with a symlink): a target that is a symlink to a cmpt output
    becomes the new directory; the directory it pointed to is left as it was."""
    real = _complete(tmp_path / "real", "old")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    _complete(link, "new")
    assert not link.is_symlink() and (link / "x.txt").read_text() == "new"
    assert (real / "x.txt").read_text() == "old"


# ----------------------------------------------------------------------------- data/mixture
class _Numbered:
    """A map-style source of ``n`` records with ids ``<tag><j>``."""

    def __init__(self, n: int, tag: str) -> None:
        self.n, self.tag = n, tag

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> Record:
        return Record(id=f"{self.tag}{j}", images=[], conversations=None)

    def fingerprint(self) -> dict:
        return {"n": self.n, "tag": self.tag}


def test_sampling_percent_bounds_and_rounding() -> None:
    """data/mixture.py:116 (``random:100%`` is valid, the upper bound included) and :129 (``P%`` of ``n``
    is rounded to nearest, not truncated: 50% of 7 is 4 records)."""
    assert parse_sampling("random:100%") == ("percent", 100.0)
    rng = np.random.default_rng(0)
    assert len(select_indices(7, "random:100%", rng)) == 7
    assert len(select_indices(7, "random:50%", rng)) == round(3.5) == 4


def test_fractional_weight_is_rounded_to_nearest() -> None:
    """data/mixture.py:137: weight 1.5 on 7 records adds round(0.5 · 7) = 4 extra copies (not 3)."""
    idx, copies = weighted(np.arange(7), 1.5, np.random.default_rng(0))
    assert len(idx) == 11 and copies.tolist().count(1) == 4


def test_members_draw_from_their_own_seeded_generators() -> None:
    """data/mixture.py:175 (generator seeded with ``(seed, member position)``): two members sampling the
    same source with ``random:N`` draw as documented, independently of each other."""
    members = [MixtureMember("a", sampling="random:4"), MixtureMember("b", sampling="random:4")]
    mix = MixtureSource(members, seed=3, sources=[_Numbered(20, "a"), _Numbered(20, "b")])
    for k, tag in enumerate("ab"):
        want = select_indices(20, "random:4", np.random.default_rng([3, k]))
        assert [mix[i].id for i in range(len(mix)) if mix.member[i] == k] == [f"{tag}{j}" for j in want]


def test_mixture_index_bounds() -> None:
    """data/mixture.py:198: ``mix[len(mix)]`` is an IndexError, not entry 0 again; ``mix[-1]``
    is the last entry."""
    mix = MixtureSource([MixtureMember("a")], sources=[_Numbered(3, "a")])
    assert mix[-1].id == "a2" and mix[2].index == 2
    with pytest.raises(IndexError, match="out of range"):
        mix[3]


def test_member_weight_must_be_positive() -> None:
    """data/mixture.py:98 (``weight <= 0`` refused): weight 0 is an error about the weight, when the entry
    is read, not a member that later 'gets no record per epoch'."""
    with pytest.raises(ValueError, match="weight must be a number > 0, got 0"):
        MixtureMember("a.json", weight=0)


def test_null_entries_in_a_mixture_file_take_the_defaults(tmp_path: Path) -> None:
    """data/mixture.py:380: ``weight: null`` / ``sampling: null`` in a mixture YAML mean the defaults
    (weight 1, all records), as if the key were absent."""
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    rows = [{"id": f"r{j}", "conversations": conv} for j in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    entry = {"path": "a.json", "weight": None, "sampling": None, "id_prefix": None}
    mix = load_mixture(write_yaml({"datasets": [entry]}, tmp_path / "mix.yaml"))
    assert [mix[i].id for i in range(len(mix))] == ["r0", "r1", "r2"]


def test_mixture_fingerprint_includes_the_seed() -> None:
    """data/mixture.py:212: the fingerprint (compared on resume) changes with the selection seed, which
    changes which records a ``random:N`` member uses."""
    members = [MixtureMember("a", sampling="random:2")]
    one, two = (MixtureSource(members, seed=s, sources=[_Numbered(9, "a")]) for s in (0, 1))
    assert one.fingerprint() != two.fingerprint()
    assert one.fingerprint() == MixtureSource(members, seed=0, sources=[_Numbered(9, "a")]).fingerprint()


# ----------------------------------------------------------------------------- pooling
def test_masked_mean_checks_shapes_and_gives_zero_for_an_empty_row() -> None:
    """pooling.py:27 (mask must be (B, T)) and :34 (a row without a valid position is a zero
    vector, not NaN)."""
    hidden = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert torch.equal(masked_mean(hidden, mask), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"mask \(B, T\)"):
        masked_mean(hidden, torch.ones(2, 2))


def test_pooling_accumulates_low_precision_in_float32() -> None:
    """pooling.py:31 and :54: bf16 inputs are averaged in float32 and returned as float32 (a bf16
    mean of 1000 ones and a 1/256 offset would round)."""
    x = torch.full((1000, 1), 1.0 + 1 / 128, dtype=torch.bfloat16)
    x[::2] = 1.0
    want = torch.tensor([[1.0 + 1 / 256]], dtype=torch.float32)
    seg = segment_mean(x, [1000])
    assert seg.dtype == torch.float32 and torch.equal(seg, want)
    pooled = masked_mean(x.reshape(1, 1000, 1), torch.ones(1, 1000))
    assert pooled.dtype == torch.float32 and torch.equal(pooled, want)


def test_segment_mean_checks_its_lengths() -> None:
    """pooling.py:45-52 (tokens must be (N, D); lengths non-negative, even when they still sum to
    N; their sum must be N) and :59 (a zero-length segment is a zero vector)."""
    tokens = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    assert torch.equal(segment_mean(tokens, [1, 0, 3]), torch.tensor([[0.0, 1.0], [0.0, 0.0], [4.0, 5.0]]))
    with pytest.raises(ValueError, match="non-negative"):
        segment_mean(tokens, [3, -1, 2])
    with pytest.raises(ValueError, match="does not match"):
        segment_mean(tokens, [1, 2])
    with pytest.raises(ValueError, match=r"must be \(N, D\)"):
        segment_mean(tokens.reshape(1, 4, 2), [4])


# ----------------------------------------------------------------------------- launch
def test_combined_exit_code_is_the_most_severe() -> None:
    """launch.py:40 and :55-61: 1 > 2 > 75 > 0; a worker that reported nothing counts as 1; codes that
    are all unknown are a failure; no worker at all is 0."""
    assert combine_codes([0, 75, 2, 0]) == EXIT_USAGE
    assert combine_codes([75, 0]) == EXIT_RESUMABLE
    assert combine_codes([0, None]) == EXIT_FAILED
    assert combine_codes([3]) == EXIT_FAILED
    assert combine_codes([0, 3]) == EXIT_FAILED  # a code cmpt's workers never write is a failure
    assert combine_codes([]) == EXIT_OK


def test_exit_code_for_user_errors_and_bugs() -> None:
    """launch.py:48-52: non-finite losses and bad data are user errors (2), so are ValueError and
    OSError, but not an exception that is also a RuntimeError (a bug: 1)."""

    class Both(ValueError, RuntimeError):
        pass

    assert exit_code_for(NonFiniteError("loss is nan")) == EXIT_USAGE
    assert exit_code_for(FileNotFoundError("x")) == EXIT_USAGE
    assert exit_code_for(Both("x")) == EXIT_FAILED
    assert exit_code_for(KeyError("x")) == EXIT_FAILED


# ----------------------------------------------------------------------------- train/disk
def _ckpts(root: Path, n: int, size: int = 1000) -> list[tuple[int, Path]]:
    """``n`` checkpoint-like directories of ``size`` bytes each under ``root``, oldest first."""
    out = []
    for step in range(1, n + 1):
        p = root / f"step_{step:06d}"
        p.mkdir(parents=True)
        (p / "w.bin").write_bytes(b"x" * size)
        out.append((step, p))
    return out


def test_refused_final_releases_the_run_dir_lock(tmp_path: Path) -> None:
    """train/disk.py:155: when ``run.dir/final`` is a user's folder the claim is refused and the lock it
    took is released (a corrected start in the same process is not 'in use')."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "mine.txt").write_text("precious")
    world = WorldInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(ResumeError, match="did not write"):
        claim_run_dir(run, world)
    lock = RunDirLock(run)
    assert lock.acquire() is None
    lock.release()


def test_space_needed_follows_the_last_checkpoint(tmp_path: Path) -> None:
    """train/disk.py:194-195: the next checkpoint needs the last one's size (once known, else the state's
    tensors, lists included) + 2 % + 64 kB."""
    guard = SpaceGuard(tmp_path, keep_last=2, listing=list)
    state = {"a": torch.zeros(250), "opt": [torch.zeros(10), (torch.zeros(5, dtype=torch.float64),)]}
    assert tensor_nbytes(state) == 1000 + 40 + 40
    assert guard.needed(state) == int(1080 * 1.02) + (64 << 10)
    guard.last_nbytes = 10_000
    assert guard.needed(state) == int(10_000 * 1.02) + (64 << 10)


@pytest.mark.parametrize(
    ("keep_last", "prunable"),
    [(0, []), (1, ["step_000001", "step_000002"]), (2, ["step_000001", "step_000002"]), (3, ["step_000001"])],
)
def test_prunable_never_takes_the_newest(tmp_path: Path, keep_last: int, prunable: list[str]) -> None:
    """train/disk.py:199-202: ``keep_last: 0`` keeps everything; otherwise what pruning after this save
    deletes, but never the newest checkpoint before it (nor the one being written)."""
    found = _ckpts(tmp_path, 3)
    final = tmp_path / "step_000004"
    guard = SpaceGuard(tmp_path, keep_last, lambda: [*found, (4, final)])
    assert [p.name for p in guard.prunable(final)] == prunable


def test_make_room_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train/disk.py:208 and :212: exactly enough free space needs no deletion; deleting the prunable
    checkpoints is enough when it frees exactly what is missing."""
    found = _ckpts(tmp_path, 3)
    guard = SpaceGuard(tmp_path, 1, lambda: found)
    monkeypatch.setattr(disk, "free_bytes", lambda root: 5000)
    assert guard.make_room(tmp_path / "step_000004", 5000) == []
    assert all(p.is_dir() for _, p in found)
    assert guard.make_room(tmp_path / "step_000004", 7000) == [found[0][1], found[1][1]]
    assert not found[0][1].exists() and not found[1][1].exists() and found[2][1].is_dir()


def test_recover_prunes_only_once_and_only_when_full(tmp_path: Path) -> None:
    """train/disk.py:242: after a failed write, prunable checkpoints are deleted (for a retry) only when
    the disk is full and only on the first attempt; else the error is raised and they stay."""
    found = _ckpts(tmp_path, 3)
    guard = SpaceGuard(tmp_path, 1, lambda: found)
    final, tmp = tmp_path / "step_000004", tmp_path / "step_000004.tmp"
    full = {"error": "OSError: full", "rank": 0, "errno": errno.ENOSPC}
    other = {"error": "OSError: gone", "rank": 0, "errno": errno.ENOENT}
    for failure, attempt in ((full, 2), (other, 1)):
        tmp.mkdir()
        with pytest.raises(CheckpointSaveError, match="The previous checkpoint step_000003 is intact"):
            guard.recover(final, tmp, 100, failure, attempt)
        assert all(p.is_dir() for _, p in found) and not tmp.exists()


def test_out_of_space_rules() -> None:
    """train/disk.py:346-348: ENOSPC and EDQUOT are full; without an errno, less free space than the
    checkpoint needs, capped at 64 MiB, is full."""
    assert out_of_space({"errno": errno.EDQUOT}, 1 << 40, 1)
    assert not out_of_space({"errno": errno.EIO}, 0, 1)
    assert not out_of_space({"errno": None}, 100 << 20, 1 << 30)
    assert out_of_space({"errno": None}, 1000, 2000)


def test_describe_failure_finds_the_errno_of_a_wrapped_error() -> None:
    """train/disk.py:334: the errno of an ``OSError`` that caused (or was being handled by) the error
    counts, so a wrapped ENOSPC is classified as a full disk."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("write failed") from e
    except RuntimeError as e:
        failure = describe_failure(e, 3)
    assert failure == {"rank": 3, "error": "RuntimeError: write failed", "errno": errno.ENOSPC}


def test_fmt_bytes_units_and_free_bytes_of_a_missing_dir(tmp_path: Path) -> None:
    """train/disk.py:352-355 (a unit from exactly 1 of it) and :320 (free space of a directory not
    created yet is its nearest existing parent's)."""
    assert fmt_bytes(1000) == "1.00 kB (1000 bytes)" and fmt_bytes(999) == "999 bytes"
    assert fmt_bytes(10**9) == "1.00 GB (1000000000 bytes)"
    assert free_bytes(tmp_path / "a" / "b") == free_bytes(tmp_path) > 0


# ----------------------------------------------------------------------------- train/history
def _counters(step: int) -> dict:
    return {"step": step, "skipped_steps": 0, "bad_samples": 0, "samples": 40, "tokens": 400}


def test_continued_from_reads_only_recorded_checkpoints(tmp_path: Path) -> None:
    """train/history.py:52: entries without a checkpoint (a fresh start; ``checkpoint: null``) and
    unreadable ones add nothing."""
    hist = tmp_path / "history"
    hist.mkdir()
    write_yaml({"resumed_from": None}, hist / "0001-a.yaml")
    write_yaml({"resumed_from": {"checkpoint": None, "step": 0}}, hist / "0002-b.yaml")
    write_yaml({"resumed_from": {"checkpoint": "checkpoints/step_000004", "step": 4}}, hist / "0003-c.yaml")
    (hist / "0004-d.yaml").write_text("resumed_from: [unclosed\n", encoding="utf-8")
    assert continued_from(tmp_path) == {"checkpoints/step_000004"}


def test_previous_results_only_for_the_same_step(tmp_path: Path) -> None:
    """train/history.py:73-75: the last step's loss, losses, grad norm and elapsed time are kept only
    when the summary on disk describes that step."""
    old = {"step": 8, "loss": 0.5, "losses": {"lm": 0.5}, "grad_norm": 1.5, "elapsed_s": 12.0, "tokens": 9}
    write_summary(tmp_path, old)
    assert previous_results(tmp_path, 8) == {
        "loss": 0.5,
        "losses": {"lm": 0.5},
        "grad_norm": 1.5,
        "elapsed_s": 12.0,
    }
    assert previous_results(tmp_path, 6) == {}


def test_finished_summary_keeps_the_runs_results(tmp_path: Path) -> None:
    """train/history.py:110-125: a launch with nothing to do reports the checkpoint's counters and the
    previous summary's results, ``resumed_from: None`` and ``nothing_to_do``."""
    ckpt = tmp_path / "checkpoints" / "step_000008"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"counters": {**_counters(8), "elapsed_s": 3.0}}))
    write_summary(
        tmp_path, {"step": 8, "loss": 0.25, "losses": {"lm": 0.25}, "grad_norm": 2.0, "elapsed_s": 3.0}
    )
    counters, summary = finished_summary(tmp_path, TrainConfig(), ckpt)
    assert counters["samples"] == 40 and counters["step"] == 8
    assert summary["resumed_from"] is None and summary["nothing_to_do"] is True
    assert (summary["step"], summary["samples"], summary["tokens"]) == (8, 40, 400)
    assert (summary["loss"], summary["losses"], summary["grad_norm"]) == (0.25, {"lm": 0.25}, 2.0)
    assert summary["status"] == "finished" and summary["checkpoint"] == str(ckpt)


def test_launch_summary_of_a_step_does_not_take_old_results(tmp_path: Path) -> None:
    """train/history.py:110: a launch that ran steps reports its own last step, not the summary on disk."""
    write_summary(tmp_path, {"step": 8, "loss": 9.0, "losses": {"lm": 9.0}, "grad_norm": 9.0})
    last = StepResult(
        losses={"lm": 0.5},
        loss=0.5,
        grad_norm=1.0,
        nonfinite=False,
        stop=False,
        bad=0,
        samples=4,
        tokens=40,
        metrics={},
    )
    summary, _ = launch_summary(tmp_path, _counters(8), TrainConfig(), last, False, None, None, 1.0)
    assert (summary["loss"], summary["losses"], summary["grad_norm"]) == (0.5, {"lm": 0.5}, 1.0)


def test_record_start_numbers_entries_and_records_the_plan(tmp_path: Path) -> None:
    """train/history.py:142-156: each start is the next number; a fresh start records ``resumed_from:
    null``, a resumed one the checkpoint and step; config.yaml is the current config."""
    first = record_start(tmp_path, {"v": 1}, ResumePlan(mode="auto"))
    plan = ResumePlan(mode="auto", checkpoint="checkpoints/step_000002", step=2)
    second = record_start(tmp_path, {"v": 2}, plan)
    assert (first.name[:5], second.name[:5]) == ("0001-", "0002-")
    assert yaml.safe_load(first.read_text())["resumed_from"] is None
    resumed = yaml.safe_load(second.read_text())["resumed_from"]
    assert resumed == {"checkpoint": "checkpoints/step_000002", "step": 2}
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"v": 2}


def test_record_start_keeps_the_config_from_before_the_history(tmp_path: Path) -> None:
    """train/history.py:133-139: a run from before the history gets its old config.yaml as entry 0000,
    once: later starts do not overwrite it with their own config."""
    write_yaml({"v": 0}, tmp_path / "config.yaml")
    record_start(tmp_path, {"v": 1}, ResumePlan(mode="auto"))
    record_start(tmp_path, {"v": 2}, ResumePlan(mode="auto"))
    before = yaml.safe_load((tmp_path / "history" / "0000-before-history.yaml").read_text())
    assert before["config"] == {"v": 0}
    names = sorted(p.name[:5] for p in (tmp_path / "history").glob("*.yaml"))
    assert names == ["0000-", "0001-", "0002-"]  # numbered on from entry 0 (was: 0000, 0002, 0003)


def test_launcher_counts_a_silent_worker_as_failed_and_restores_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """launch.py:87-88 (torchrun's shutdown timeout defaults to 600 s), :106 (a local worker that
    left no code counts as 1) and :109-112 (``CMPT_EXIT_DIR`` is restored afterwards). torchrun's
    launcher is replaced by one whose rank 0 reports 0 and whose rank 1 dies silently."""
    from torch.distributed import run as torchrun

    seen = {}

    def run(args) -> None:
        seen["timeout"] = args.shutdown_timeout
        Path(os.environ[EXIT_DIR_ENV], "rank_00000").write_text("0\n")

    monkeypatch.setattr(torchrun, "run", run)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.delenv(EXIT_DIR_ENV, raising=False)
    assert launch_main(["--nproc-per-node", "2", str(tmp_path / "train.py")]) == EXIT_FAILED
    assert seen["timeout"] == SHUTDOWN_TIMEOUT_S and EXIT_DIR_ENV not in os.environ
    monkeypatch.setenv(EXIT_DIR_ENV, "outer")
    assert launch_main(["--nproc-per-node", "1", str(tmp_path / "train.py")]) == EXIT_OK
    assert os.environ[EXIT_DIR_ENV] == "outer"
