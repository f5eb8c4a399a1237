"""One bad-sample policy, decided on counts summed over all ranks (docs/method.md §4).

Single process: the decision of :class:`~cmpt.train.bad_data.BadDataPolicy` and
:class:`~cmpt.train.bad_data.BadDataGuard`, the trainer on data that are all bad (no hang), the
loaders reporting all-bad stretches as empty micro-batches instead of aborting, and the old
``data.max_bad_fraction`` key read as ``train.max_bad_fraction``. Two processes (``torchrun``,
gloo): bad data on one rank only stop both ranks with the same error (tests/bad_data_worker.py).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from broken_corpus import conv, tiny_processor, tiny_tokenizer
from cmpt.config import ConfigError, load_config
from cmpt.data.batching import MAX_CARRIED_BAD, BatchLoader, TokenBudgetBatcher, empty_batch
from cmpt.data.config import DataConfig
from cmpt.data.llava_source import LlavaSource
from cmpt.data.pipeline import LengthIndex, SampleBuilder
from cmpt.recipes import CONFIG_ROOT, load_recipe
from cmpt.train import BadDataError, OptimConfig, RunConfig, TrainConfig, Trainer
from cmpt.train.bad_data import BadDataGuard, BadDataPolicy, is_empty
from toy_task import ToyTask, make_micro_batch

WORKER = Path(__file__).resolve().parent / "bad_data_worker.py"


# ----------------------------------------------------------------------------- the decision
def test_policy_checks_the_fraction_from_the_minimum_on() -> None:
    p = BadDataPolicy(max_fraction=0.1, min_samples=100)
    assert not p.exceeded(50, 99)  # too few samples yet
    assert not p.exceeded(10, 100)  # exactly the limit is allowed
    assert p.exceeded(11, 100)
    assert not p.exceeded(0, 0)
    assert not BadDataPolicy(1.0, 0).exceeded(5, 5)  # 1.0: never on the fraction
    assert BadDataPolicy(0.0, 0).exceeded(1, 1000)


def test_error_names_fraction_limit_keys_and_where_to_look() -> None:
    msg = str(BadDataPolicy(0.05, 200).fraction_error(30, 250, step=7, per_rank=[(0, 120), (30, 130)]))
    for part in ("30 of the 250", "12.00% > train.max_bad_fraction = 5.00%", "at step 7",
                 "train.bad_check_min_samples = 200", "cmpt data check", "skipping bad sample",
                 "rank 1: 30/130, rank 0: 0/120"):  # fmt: skip
        assert part in msg, (part, msg)
    single = str(BadDataPolicy(0.05, 200).fraction_error(30, 250, step=7, per_rank=[(30, 250)]))
    assert "by rank" not in single


def test_guard_drops_empty_batches_counts_them_and_decides() -> None:
    full = {"num_samples": 3, "num_bad": 1, "x": 0}
    guard = BadDataGuard(BadDataPolicy(0.5, 10))
    it = iter([full, empty_batch(4), dict(full), dict(full)])
    batches, bad, good = guard.take(it, 2, step=1, bad_before=0, seen_before=0)  # two rounds
    assert [is_empty(b) for b in batches] == [False, False] and (bad, good) == (6, 6)
    assert (guard.local_bad, guard.local_seen) == (6, 12)
    # earlier steps count: 7 of 16 is below the limit, then 16 of 25 is above it
    batches, bad, good = guard.take(iter([full]), 1, step=2, bad_before=6, seen_before=12)
    assert (bad, good) == (1, 3)
    with pytest.raises(BadDataError, match=r"16 of the 25 samples .* at step 3"):
        guard.take(iter([empty_batch(9), full]), 1, step=3, bad_before=7, seen_before=16)


def test_guard_gives_up_when_a_step_cannot_be_filled() -> None:
    guard = BadDataGuard(BadDataPolicy(1.0, 0, max_rounds=5))  # the fraction never fails
    with pytest.raises(BadDataError, match=r"rank\(s\) \[0\] read only bad samples for 5 rounds"):
        guard.take(itertools.repeat(empty_batch(64)), 2, step=1, bad_before=0, seen_before=0)


def _lockstep_worker(rank: int, init_file: str, out: str) -> None:
    """Rank 0's slice of global batch 1 is empty (all its pairs bad), rank 1's is not."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    slices = [{"num_samples": 4, "num_bad": 0, "batch_index": k} for k in range(8)]
    slices[1] = {**empty_batch(4), "batch_index": 1} if rank == 0 else slices[1]
    guard = BadDataGuard(BadDataPolicy(0.5, 100), lockstep=True)
    it = iter(slices)
    steps = [[b["batch_index"] for b in guard.take(it, 2, step, 0, 0)[0]] for step in (1, 2, 3)]
    torch.save(steps, f"{out}.{rank}")
    dist.destroy_process_group()


def test_lockstep_guard_drops_a_global_batch_on_every_rank(tmp_path: Path) -> None:
    """MoCa stage 2: one rank's empty slice drops that global batch on both ranks, which stay on
    the same global batches (replacing it on that rank alone shifts it by one for good)."""
    import torch
    import torch.multiprocessing as mp

    out = str(tmp_path / "steps")
    mp.spawn(_lockstep_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in (0, 1)]
    assert ranks[0] == ranks[1] == [[0, 2], [3, 4], [5, 6]], ranks


class AllBadToyTask(ToyTask):
    """Its loader only ever reports skipped samples (a rank whose share is all broken)."""

    def build_loader(self, rank: int, world_size: int):
        class Loader:
            def __iter__(self):
                return itertools.repeat(empty_batch(MAX_CARRIED_BAD))

            def state_dict(self) -> dict:
                return {}

            def load_state_dict(self, d: dict) -> None:
                pass

        return Loader()


def _fit(run_dir: Path, task: ToyTask, **train_kw) -> dict:
    kw = {"steps": 5, "log_every": 1, "progress": False, "tensorboard": False, **train_kw}
    return Trainer(RunConfig(dir=str(run_dir)), OptimConfig(lr=1e-3), TrainConfig(**kw), task).fit()


def test_trainer_stops_on_data_that_are_all_bad(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match=r"64 of the 64 samples .* at step 1"):
        _fit(tmp_path / "a", AllBadToyTask(), bad_check_min_samples=50)
    with pytest.raises(BadDataError, match="read only bad samples"):  # even with the check off
        _fit(tmp_path / "b", AllBadToyTask(), max_bad_fraction=1.0)
    assert not (tmp_path / "a" / "final").exists()


def test_per_rank_counts_survive_resume(tmp_path: Path) -> None:
    _fit(tmp_path, ToyTask(bad_every=2), steps=3, save_every=3)
    cfg = TrainConfig(steps=4, progress=False, tensorboard=False, allow_change=["train.steps"])
    again = Trainer(RunConfig(dir=str(tmp_path)), OptimConfig(lr=1e-3), cfg, ToyTask())
    summary = again.fit()
    assert summary["resumed_from"] == 3
    assert again.bad_data.local_bad == summary["bad_samples"] == 2  # micro-batches 0 and 2
    assert again.bad_data.local_seen == summary["bad_samples"] + summary["samples"]


# ----------------------------------------------------------------------------- the loaders only report
def _all_bad_loader(tmp_path: Path, n: int) -> BatchLoader:
    rows = [{"id": f"bad{i}", "image": "missing.png", "conversations": conv()} for i in range(n)]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src, proc, tok = LlavaSource(path), tiny_processor(), tiny_tokenizer()
    batcher = TokenBudgetBatcher(LengthIndex.build(src, proc, tok).lengths, 64, 512, 1, shuffle=False)
    return BatchLoader(src, SampleBuilder(proc, tok, max_text_tokens=64), batcher)


def test_batch_loader_reports_an_all_bad_stretch_as_an_empty_batch(tmp_path: Path) -> None:
    loader = _all_bad_loader(tmp_path, 10)
    first, second = itertools.islice(loader, 2)  # 64 bad samples each, over several epochs
    assert first == second == empty_batch(MAX_CARRIED_BAD)
    assert loader.bad_seen == 2 * MAX_CARRIED_BAD and loader.samples_seen == 0
    assert loader.state_dict()["epoch"] == 2 * MAX_CARRIED_BAD // 10  # resumes after the last one


def test_streaming_loader_reports_unreadable_shards_as_empty_batches(tmp_path: Path) -> None:
    from cmpt.data.convert import write_tar_samples
    from cmpt.data.streaming import StreamConfig, StreamingLoader
    from cmpt.data.webdataset import ShardList

    samples = [(f"{i:03d}", {"json": b'{"id": ', "png": b""}) for i in range(5)]  # all invalid JSON
    write_tar_samples(str(tmp_path / "s-0.tar"), samples)
    tok = tiny_tokenizer()
    builder = SampleBuilder(tiny_processor(), tok, max_text_tokens=64)
    loader = StreamingLoader(ShardList(str(tmp_path / "s-0.tar")), builder, StreamConfig(64, 512, 1))
    batch = next(iter(loader))  # used to raise "read no usable sample" on this rank alone
    assert batch == empty_batch(MAX_CARRIED_BAD) and loader.bad_seen == MAX_CARRIED_BAD


# ----------------------------------------------------------------------------- one config key
def test_old_data_key_is_read_as_the_train_key_with_a_warning(tmp_path: Path) -> None:
    import cmpt.config_schema as C

    C._WARNED_MOVES.clear()
    base = yaml.safe_load((CONFIG_ROOT / "tiny" / "comp_stage1.yaml").read_text())
    cfg_path = tmp_path / "old.yaml"
    cfg_path.write_text(yaml.safe_dump({"base": str(CONFIG_ROOT / "tiny" / "comp_stage1.yaml"),
                                        "data": {"max_bad_fraction": 0.2}}))  # fmt: skip
    with pytest.warns(FutureWarning, match=r"'data\.max_bad_fraction' .* read as 'train\.max_bad_fraction'"):
        cfg, _ = load_recipe(str(cfg_path))
    assert cfg.train.max_bad_fraction == 0.2 and not hasattr(cfg.data, "max_bad_fraction")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        cfg, _ = load_recipe(str(cfg_path), ["data.max_bad_fraction=0.3"])
    assert cfg.train.max_bad_fraction == 0.3
    # a saved run config holds both keys: equal values are fine, different ones are an error
    both = {**base, "data": {**base["data"], "max_bad_fraction": 0.01}, "train": {**base["train"]}}
    both["train"]["max_bad_fraction"] = 0.01
    cfg_path.write_text(yaml.safe_dump(both))
    assert load_recipe(str(cfg_path))[0].train.max_bad_fraction == 0.01
    both["train"]["max_bad_fraction"] = 0.05
    cfg_path.write_text(yaml.safe_dump(both))
    with pytest.raises(ConfigError, match=r"'data\.max_bad_fraction' .* moved to 'train\.max_bad_fraction'"):
        load_recipe(str(cfg_path))
    with pytest.raises(ConfigError, match=r"moved to 'train\.max_bad_fraction'"):
        load_config(DataConfig, {"max_bad_fraction": 0.1})  # no train section to map it to


def test_packaged_recipes_use_only_the_train_key() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in sorted(CONFIG_ROOT.rglob("*.yaml")):
            cfg, _ = load_recipe(str(path))
            assert 0 <= cfg.train.max_bad_fraction <= 1 and cfg.train.bad_check_min_samples == 200


# ----------------------------------------------------------------------------- two ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected_toy_step(min_samples: int, limit: float) -> tuple[int, int, int]:
    """(step, bad, seen) at which the toy run must stop: rank 1 takes the odd global micro-batches,
    each with one bad sample; rank 0 the even ones, clean (see bad_data_worker.py)."""
    bad = seen = 0
    for step in itertools.count(1):
        for index in (2 * step - 2, 2 * step - 1):
            n_bad = index % 2
            bad, seen = bad + n_bad, seen + n_bad + make_micro_batch(0, index)["num_samples"]
        if seen >= min_samples and bad / seen > limit:
            return step, bad, seen
    raise AssertionError


@pytest.mark.slow
def test_bad_data_on_one_rank_stops_every_rank_with_one_error(tmp_path: Path) -> None:
    from bad_data_worker import CORPUS, TOY

    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(str(tok_dir))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={_free_port()}", str(WORKER), str(tmp_path), str(tok_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # no hang
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode != 0, log  # the corpus run's error ends the launch
    step, bad, seen = _expected_toy_step(TOY["bad_check_min_samples"], TOY["max_bad_fraction"])
    for run in ("toy", "corpus"):
        messages = [(tmp_path / f"{run}_rank{r}.txt").read_text() for r in (0, 1)]
        assert messages[0] == messages[1], messages  # the same decision, at the same step
        assert "train.max_bad_fraction" in messages[0] and "cmpt data check" in messages[0]
        assert "rank 1: " in messages[0].split("Bad/read by rank:")[1].split(",")[0]  # the worst rank
    toy = (tmp_path / "toy_rank0.txt").read_text()
    assert f"{bad} of the {seen} samples" in toy and f"at step {step}." in toy, toy
    assert ", rank 0: 0/" in toy  # rank 0's own data are clean: only the global count crossed
    corpus = (tmp_path / "corpus_rank1.txt").read_text()
    assert "at step 1." in corpus and f"rank 1: {MAX_CARRIED_BAD}/{MAX_CARRIED_BAD}" in corpus
    assert f"> train.max_bad_fraction = {CORPUS['max_bad_fraction']:.2%}" in corpus
    assert "BadDataError" in log
